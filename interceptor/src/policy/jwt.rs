//! JWTs minted per request (`jwt = { algorithm, key_file, ttl_seconds, claims }`).

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::inject::{InjectError, Template};
use super::Params;

/// The algorithm names `algorithm` accepts, as written in a JWT header.
pub const ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
    "ES384", "EdDSA",
];

/// Parses an algorithm name (exactly as in a JWT header: `HS256`, `RS256`, `ES256`, `EdDSA`, ...).
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    if ALGORITHMS.contains(&name) {
        name.parse().ok()
    } else {
        None
    }
}

/// Why a signing key could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is empty")]
    Empty { path: String },
    #[error("key file {path} is not {expected}: {reason}")]
    Format {
        path: String,
        expected: &'static str,
        reason: String,
    },
}

/// Loads the signing key for `algorithm` from `path`: for HS* the raw bytes of the file
/// (trailing newlines trimmed), for RS*/PS* an RSA private key PEM (PKCS#1 or PKCS#8), for
/// ES* an EC private key PEM (PKCS#8, or SEC1 as `openssl ecparam -genkey` writes it), for EdDSA a PKCS#8 Ed25519 private key PEM. The key is
/// tried once by signing a throw-away token, so a key that does not fit the algorithm is
/// an error here rather than on every request.
pub fn load_key(algorithm: Algorithm, path: &Path) -> Result<EncodingKey, KeyError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let format_err = |expected: &'static str, reason: String| KeyError::Format {
        path: shown.clone(),
        expected,
        reason,
    };
    use Algorithm::*;
    let (key, expected) = match algorithm {
        HS256 | HS384 | HS512 => {
            let mut secret: &[u8] = &bytes;
            while let [rest @ .., b'\n' | b'\r'] = secret {
                secret = rest;
            }
            if secret.is_empty() {
                return Err(KeyError::Empty { path: shown });
            }
            (EncodingKey::from_secret(secret), "an HMAC secret")
        }
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            let expected = "an RSA private key in PEM";
            let key = EncodingKey::from_rsa_pem(&bytes)
                .map_err(|e| format_err(expected, e.to_string()))?;
            (key, expected)
        }
        ES256 | ES384 => {
            let expected = "an EC private key in PEM (PKCS#8 or SEC1)";
            let key = match pem::parse(&bytes) {
                Ok(block) if block.tag() == "EC PRIVATE KEY" => {
                    let pkcs8 =
                        sec1_to_pkcs8(block.contents()).map_err(|e| format_err(expected, e))?;
                    EncodingKey::from_ec_der(&pkcs8)
                }
                _ => EncodingKey::from_ec_pem(&bytes)
                    .map_err(|e| format_err(expected, e.to_string()))?,
            };
            (key, expected)
        }
        EdDSA => {
            let expected = "a PKCS#8 Ed25519 private key in PEM";
            let key = EncodingKey::from_ed_pem(&bytes)
                .map_err(|e| format_err(expected, e.to_string()))?;
            (key, expected)
        }
    };
    jsonwebtoken::encode(&Header::new(algorithm), &Map::new(), &key).map_err(|e| {
        format_err(
            expected,
            format!("it cannot sign {algorithm:?} tokens ({e})"),
        )
    })?;
    Ok(key)
}

/// Wraps a SEC1 `ECPrivateKey` (RFC 5915) in PKCS#8 (RFC 5208), the only form the
/// signer takes; the curve comes from the key's own parameters.
fn sec1_to_pkcs8(sec1: &[u8]) -> Result<Vec<u8>, String> {
    use simple_asn1::{oid, ASN1Block, ASN1Class, BigInt, BigUint};
    let blocks = simple_asn1::from_der(sec1).map_err(|e| format!("bad SEC1 key: {e}"))?;
    let Some(ASN1Block::Sequence(_, fields)) = blocks.first() else {
        return Err("bad SEC1 key: not a sequence".to_string());
    };
    let curve = fields
        .iter()
        .find_map(|field| match field {
            ASN1Block::Explicit(ASN1Class::ContextSpecific, _, tag, inner)
                if *tag == BigUint::from(0u8) =>
            {
                match inner.as_ref() {
                    ASN1Block::ObjectIdentifier(_, curve) => Some(curve.clone()),
                    _ => None,
                }
            }
            _ => None,
        })
        .ok_or("the SEC1 key does not name its curve")?;
    let ec_public_key = oid!(1, 2, 840, 10045, 2, 1);
    let pkcs8 = ASN1Block::Sequence(
        0,
        vec![
            ASN1Block::Integer(0, BigInt::from(0)),
            ASN1Block::Sequence(
                0,
                vec![
                    ASN1Block::ObjectIdentifier(0, ec_public_key),
                    ASN1Block::ObjectIdentifier(0, curve),
                ],
            ),
            ASN1Block::OctetString(0, sec1.to_vec()),
        ],
    );
    simple_asn1::to_der(&pkcs8).map_err(|e| format!("cannot re-encode the SEC1 key: {e}"))
}

/// A claims value whose strings are templates.
#[derive(Clone)]
pub(crate) enum ClaimTemplate {
    Str(Template),
    Array(Vec<ClaimTemplate>),
    Object(Vec<(String, ClaimTemplate)>),
    Other(Value),
}

impl ClaimTemplate {
    /// Every string template among the claims.
    pub(crate) fn templates<'a>(&'a self, out: &mut Vec<&'a Template>) {
        match self {
            ClaimTemplate::Str(t) => out.push(t),
            ClaimTemplate::Array(items) => items.iter().for_each(|c| c.templates(out)),
            ClaimTemplate::Object(fields) => fields.iter().for_each(|(_, c)| c.templates(out)),
            ClaimTemplate::Other(_) => {}
        }
    }

    pub(crate) fn from_json(value: &Value) -> Result<ClaimTemplate, String> {
        Ok(match value {
            Value::String(s) => ClaimTemplate::Str(Template::parse(s)?),
            Value::Array(a) => ClaimTemplate::Array(
                a.iter()
                    .map(ClaimTemplate::from_json)
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(o) => ClaimTemplate::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), ClaimTemplate::from_json(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => ClaimTemplate::Other(other.clone()),
        })
    }

    fn render(&self, params: &Params) -> Result<Value, InjectError> {
        Ok(match self {
            ClaimTemplate::Str(t) => Value::String(t.render(params)?),
            ClaimTemplate::Array(a) => Value::Array(
                a.iter()
                    .map(|c| c.render(params))
                    .collect::<Result<_, _>>()?,
            ),
            ClaimTemplate::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(params)?)))
                    .collect::<Result<_, InjectError>>()?,
            ),
            ClaimTemplate::Other(v) => v.clone(),
        })
    }
}

/// Mints a token per request. `Debug` shows the algorithm, ttl and claim names only.
#[derive(Clone)]
pub(crate) struct JwtMinter {
    pub(crate) algorithm: Algorithm,
    pub(crate) key: EncodingKey,
    pub(crate) ttl_seconds: u64,
    pub(crate) kid: Option<String>,
    /// Always an `Object`.
    pub(crate) claims: ClaimTemplate,
}

impl JwtMinter {
    /// The configured claims with their templates filled in, plus `iat` = now and
    /// `exp` = `iat + ttl_seconds`, signed.
    pub(crate) fn mint(&self, params: &Params, now: SystemTime) -> Result<String, InjectError> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| InjectError::Clock)?
            .as_secs();
        let mut claims = match self.claims.render(params)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        claims.insert("iat".into(), iat.into());
        claims.insert("exp".into(), iat.saturating_add(self.ttl_seconds).into());
        let mut header = Header::new(self.algorithm);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(InjectError::Jwt)
    }
}

impl fmt::Debug for JwtMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = match &self.claims {
            ClaimTemplate::Object(o) => o.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        };
        f.debug_struct("JwtMinter")
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .field("ttl_seconds", &self.ttl_seconds)
            .field("kid", &self.kid)
            .field("claims", &names)
            .finish()
    }
}
