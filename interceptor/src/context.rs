//! The per-request context a dispatcher hands to a User Worker: which Worker,
//! which incoming request, and the outbound parameters its subrequests carry.
//!
//! The dispatcher signs it with a key only the daemon holds; the Worker runtime
//! attaches the token unchanged to every subrequest (header [`CONTEXT_HEADER`]);
//! the relay verifies it, checks it belongs to the connection's sandbox, and
//! strips it before anything goes upstream. A Worker can therefore neither forge
//! parameters nor borrow another Worker's or tenant's.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::policy::Params;

/// Carries the signed context from the dispatcher to the Worker and from the
/// Worker's subrequests to the relay.
pub const CONTEXT_HEADER: &str = "x-interceptor-context";

/// A context outlives any request it could belong to by this much.
const LIFETIME_SECS: u64 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    pub namespace: String,
    pub worker: String,
    /// Unique per incoming request within this daemon's lifetime.
    pub request_id: u64,
    pub params: Params,
    /// `limits.subrequests` of the namespace, counted by the relay per request.
    pub subrequest_limit: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    #[serde(flatten)]
    context: RequestContext,
    exp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read a random key: {0}")]
    Random(std::io::Error),
    #[error("invalid request context: {0}")]
    Invalid(jsonwebtoken::errors::Error),
}

/// The daemon's secret for signing request contexts; new at every start.
pub struct ContextKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl ContextKey {
    pub fn generate() -> Result<Self, ContextError> {
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .map_err(ContextError::Random)?;
        Ok(Self::from_secret(&secret))
    }

    pub fn from_secret(secret: &[u8]) -> Self {
        ContextKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    pub fn sign(&self, context: &RequestContext) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            context: context.clone(),
            exp: now + LIFETIME_SECS,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with a byte key cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<RequestContext, ContextError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims = ["exp".to_string()].into_iter().collect();
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map(|data| data.claims.context)
            .map_err(ContextError::Invalid)
    }
}

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> RequestContext {
        RequestContext {
            namespace: "customers".into(),
            worker: "acme".into(),
            request_id: 7,
            params: [("customer_name".to_string(), "acme".to_string())]
                .into_iter()
                .collect(),
            subrequest_limit: Some(20),
        }
    }

    #[test]
    fn a_signed_context_verifies_and_a_forged_one_does_not() {
        let key = ContextKey::generate().unwrap();
        let token = key.sign(&context());
        assert_eq!(key.verify(&token).unwrap(), context());

        let other = ContextKey::generate().unwrap();
        assert!(
            other.verify(&token).is_err(),
            "another key's token verified"
        );
        let forged = other.sign(&context());
        assert!(key.verify(&forged).is_err(), "a forged token verified");

        // Changing the payload breaks the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut evil = context();
        evil.params.insert("customer_name".into(), "globex".into());
        let evil_token = other.sign(&evil);
        let evil_payload = evil_token.split('.').nth(1).unwrap();
        parts[1] = evil_payload;
        assert!(key.verify(&parts.join(".")).is_err());
    }
}
