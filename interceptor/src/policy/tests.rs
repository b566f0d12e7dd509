use super::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/policy/testdata")
        .join(name)
}

fn policy(toml: &str) -> OutboundPolicy {
    let cfg = match crate::config::parse(toml, Path::new("/test/interceptor.toml")) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    OutboundPolicy::from_config(&cfg.outbound["e"]).unwrap()
}

fn params(kv: &[(&str, &str)]) -> Params {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn decide_host_lists_and_default() {
    let p = policy(
        r#"[outbound.e]
allow = ["api.example.com", "*.github.com", "*.example.com"]
block = ["evil.example.com", "*.bad.github.com"]
"#,
    );
    assert_eq!(
        p.decide_host("api.example.com"),
        Decision::allow("allow:api.example.com")
    );
    assert_eq!(
        p.decide_host("API.Example.com."),
        Decision::allow("allow:api.example.com")
    );
    assert_eq!(
        p.decide_host("raw.github.com"),
        Decision::allow("allow:*.github.com")
    );
    assert_eq!(
        p.decide_host("a.b.github.com:443"),
        Decision::allow("allow:*.github.com")
    );
    // block wins over allow, even when allow lists a wildcard that covers it
    assert_eq!(
        p.decide_host("evil.example.com"),
        Decision::block("block:evil.example.com")
    );
    assert_eq!(
        p.decide_host("EVIL.example.com."),
        Decision::block("block:evil.example.com")
    );
    assert_eq!(
        p.decide_host("evil.example.com:8080"),
        Decision::block("block:evil.example.com")
    );
    assert_eq!(
        p.decide_host("x.bad.github.com"),
        Decision::block("block:*.bad.github.com")
    );
    // the apex is not matched by its wildcard
    assert_eq!(
        p.decide_host("github.com"),
        Decision::allow("default:allow")
    );
    assert_eq!(
        p.decide_host("bad.github.com"),
        Decision::allow("allow:*.github.com")
    );
    assert_eq!(p.decide_host("other.org"), Decision::allow("default:allow"));
    assert_eq!(p.decide_host("bad host"), Decision::block("invalid-host"));
    assert_eq!(p.decide_host(""), Decision::block("invalid-host"));
    assert!(p.log_enabled());
    assert_eq!(p.name(), "e");

    let p = policy("[outbound.e]\ndefault = \"block\"\nallow = [\"[::1]\"]\nlog = false\n");
    assert_eq!(p.decide_host("other.org"), Decision::block("default:block"));
    assert_eq!(p.decide_host("[::1]:8080"), Decision::allow("allow:[::1]"));
    assert!(!p.log_enabled());
}

#[test]
fn decide_address_guarded_and_cidrs() {
    let p = policy("[outbound.e]\n");
    assert_eq!(p.decide_address(ip("8.8.8.8")), None);
    assert_eq!(
        p.decide_address(ip("127.0.0.1")),
        Some(Decision::block("guarded:127.0.0.0/8"))
    );
    assert_eq!(
        p.decide_address(ip("::ffff:127.0.0.1")),
        Some(Decision::block("guarded:127.0.0.0/8"))
    );
    assert_eq!(p.decide_address(ip("::ffff:8.8.8.8")), None);
    for guarded in [
        "0.0.0.0",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fc00::1",
        "fe80::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ] {
        let d = p
            .decide_address(ip(guarded))
            .unwrap_or_else(|| panic!("{guarded}"));
        assert_eq!(d.action, Action::Block, "{guarded}");
        assert!(d.rule.starts_with("guarded:"), "{guarded}: {}", d.rule);
        assert_eq!(p.refuse_address(ip(guarded)), Some(d), "{guarded}");
    }
    assert_eq!(p.refuse_address(ip("8.8.8.8")), None);

    let p = policy("[outbound.e]\nallow_cidrs = [\"10.0.0.0/8\", \"127.0.0.2/32\", \"fd00::/8\", \"8.8.8.0/24\"]\n");
    assert_eq!(
        p.decide_address(ip("10.1.2.3")),
        Some(Decision::allow("cidr:10.0.0.0/8"))
    );
    assert_eq!(
        p.decide_address(ip("::ffff:10.1.2.3")),
        Some(Decision::allow("cidr:10.0.0.0/8"))
    );
    assert_eq!(
        p.decide_address(ip("127.0.0.2")),
        Some(Decision::allow("cidr:127.0.0.2/32"))
    );
    // What the relay asks per upstream address: only refusals.
    assert_eq!(p.refuse_address(ip("127.0.0.2")), None);
    assert_eq!(
        p.refuse_address(ip("127.0.0.1")),
        Some(Decision::block("guarded:127.0.0.0/8"))
    );
    assert_eq!(
        p.decide_address(ip("127.0.0.1")),
        Some(Decision::block("guarded:127.0.0.0/8"))
    );
    assert_eq!(
        p.decide_address(ip("fd00::5")),
        Some(Decision::allow("cidr:fd00::/8"))
    );
    assert_eq!(
        p.decide_address(ip("fc00::5")),
        Some(Decision::block("guarded:fc00::/7"))
    );
    assert_eq!(
        p.decide_address(ip("8.8.8.8")),
        Some(Decision::allow("cidr:8.8.8.0/24"))
    );
    // Only the mapped form is admitted by an IPv4 net; NAT64 to 10/8 stays guarded.
    assert_eq!(
        p.decide_address(ip("64:ff9b::a00:1")),
        Some(Decision::block("guarded:10.0.0.0/8"))
    );
}

#[test]
fn decide_opaque_falls_back_to_default() {
    let p = policy(
        "[outbound.e]\ndefault = \"block\"\nallow_cidrs = [\"192.168.0.0/16\", \"1.1.1.1\"]\n",
    );
    assert_eq!(
        p.decide_opaque(ip("9.9.9.9"), 22),
        Decision::block("default:block")
    );
    assert_eq!(
        p.decide_opaque(ip("1.1.1.1"), 53),
        Decision::allow("cidr:1.1.1.1/32")
    );
    assert_eq!(
        p.decide_opaque(ip("192.168.1.1"), 5432),
        Decision::allow("cidr:192.168.0.0/16")
    );
    assert_eq!(
        p.decide_opaque(ip("10.0.0.1"), 5432),
        Decision::block("guarded:10.0.0.0/8")
    );
    let p = policy("[outbound.e]\n");
    assert_eq!(
        p.decide_opaque(ip("9.9.9.9"), 22),
        Decision::allow("default:allow")
    );
    assert_eq!(
        p.decide_opaque(ip("169.254.169.254"), 80),
        Decision::block("guarded:169.254.0.0/16")
    );
    assert_eq!(
        OutboundPolicy::default().decide_opaque(ip("::1"), 80),
        Decision::block("guarded:::1/128")
    );
}

#[test]
fn value_injection() {
    std::env::set_var("INTERCEPTOR_POLICY_TEST_TOKEN", "tok-123");
    let p = policy(
        r#"[outbound.e]
[[outbound.e.inject]]
host = "*.example.com"
header = "Authorization"
value = "Bearer {env:INTERCEPTOR_POLICY_TEST_TOKEN}"
[[outbound.e.inject]]
host = "api.example.com"
header = "X-Customer"
value = "{customer_name}"
"#,
    );
    let now = SystemTime::now();
    assert_eq!(p.injections_for("other.org").count(), 0);
    assert_eq!(p.injections_for("example.com").count(), 0);
    let injs: Vec<_> = p.injections_for("API.example.com.").collect();
    assert_eq!(injs.len(), 2);
    let (name, value) = injs[0].render(&Params::new(), now).unwrap();
    assert_eq!(name, "authorization");
    assert_eq!(value, "Bearer tok-123");
    assert!(matches!(
        injs[1].render(&Params::new(), now),
        Err(InjectError::MissingParameter(p)) if p == "customer_name"
    ));
    let (name, value) = injs[1]
        .render(&params(&[("customer_name", "acme")]), now)
        .unwrap();
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("x-customer", "acme")
    );
    // Debug of the policy shows neither the literal text nor the rendered value
    let dbg = format!("{p:?}");
    assert!(!dbg.contains("Bearer") && !dbg.contains("tok-123"), "{dbg}");
}

fn jwt_policy(alg: &str, key: &Path, ttl: u64) -> OutboundPolicy {
    policy(&format!(
        r#"[outbound.e]
[[outbound.e.inject]]
host = "api.example.com"
header = "Authorization"
jwt = {{ algorithm = "{alg}", key_file = "{}", ttl_seconds = {ttl}, claims = {{ sub = "{{customer_name}}", aud = "api", n = 7, scopes = ["read", "{{customer_name}}:write"] }} }}
"#,
        key.display()
    ))
}

fn bearer(p: &OutboundPolicy, params: &Params, now: SystemTime) -> String {
    let inj = p.injections_for("api.example.com").next().unwrap();
    assert!(inj.is_jwt());
    let (name, value) = inj.render(params, now).unwrap();
    assert_eq!(name, "authorization");
    assert!(value.is_sensitive());
    value
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .expect("Bearer prefix")
        .to_string()
}

fn check_claims(token: &str, alg: Algorithm, key: &DecodingKey, ttl: u64) {
    assert_eq!(decode_header(token).unwrap().alg, alg);
    let mut v = Validation::new(alg);
    v.set_audience(&["api"]);
    let data = decode::<serde_json::Value>(token, key, &v).unwrap();
    let c = data.claims;
    assert_eq!(c["sub"], "acme");
    assert_eq!(c["n"], 7);
    assert_eq!(c["scopes"], serde_json::json!(["read", "acme:write"]));
    let iat = c["iat"].as_u64().unwrap();
    let exp = c["exp"].as_u64().unwrap();
    assert_eq!(exp - iat, ttl);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(iat.abs_diff(now) < 60);
}

#[test]
fn jwt_hs256() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hs.key");
    std::fs::write(&key, "top-secret\n").unwrap();
    let p = jwt_policy("HS256", &key, 300);
    let token = bearer(&p, &params(&[("customer_name", "acme")]), SystemTime::now());
    // the trailing newline of the key file is not part of the secret
    check_claims(
        &token,
        Algorithm::HS256,
        &DecodingKey::from_secret(b"top-secret"),
        300,
    );
    assert!(decode::<serde_json::Value>(
        &token,
        &DecodingKey::from_secret(b"top-secret\n"),
        &Validation::new(Algorithm::HS256)
    )
    .is_err());
    // a missing parameter is an error, not a token with a half-filled claim
    let inj = p.injections_for("api.example.com").next().unwrap();
    assert!(matches!(
        inj.render(&Params::new(), SystemTime::now()),
        Err(InjectError::MissingParameter(n)) if n == "customer_name"
    ));
    // exp - iat == ttl for a fixed clock
    let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let token = bearer(&p, &params(&[("customer_name", "acme")]), t0);
    let mut v = Validation::new(Algorithm::HS256);
    v.validate_exp = false;
    v.validate_aud = false;
    let c = decode::<serde_json::Value>(&token, &DecodingKey::from_secret(b"top-secret"), &v)
        .unwrap()
        .claims;
    assert_eq!(c["iat"], 1_700_000_000u64);
    assert_eq!(c["exp"], 1_700_000_300u64);
    // Debug output never shows the key
    let dbg = format!("{p:?}");
    assert!(!dbg.contains("top-secret"), "{dbg}");
    assert!(dbg.contains("<redacted>"), "{dbg}");
}

#[test]
fn jwt_hs384_hs512() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hs.key");
    std::fs::write(&key, "k").unwrap();
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let p = jwt_policy(&format!("{alg:?}"), &key, 60);
        let token = bearer(&p, &params(&[("customer_name", "acme")]), SystemTime::now());
        check_claims(&token, alg, &DecodingKey::from_secret(b"k"), 60);
    }
}

#[test]
fn jwt_rs256_es256_eddsa() {
    let cases = [
        ("RS256", "rs256", Algorithm::RS256),
        ("ES256", "es256", Algorithm::ES256),
        // SEC1 (`EC PRIVATE KEY`), as `openssl ecparam -genkey` writes it.
        ("ES256", "es256-sec1", Algorithm::ES256),
        ("EdDSA", "ed25519", Algorithm::EdDSA),
    ];
    for (name, file, alg) in cases {
        let p = jwt_policy(name, &testdata(&format!("{file}.pem")), 120);
        let token = bearer(&p, &params(&[("customer_name", "acme")]), SystemTime::now());
        let public = std::fs::read(testdata(&format!("{file}.pub.pem"))).unwrap();
        let key = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&public),
            Algorithm::ES256 => DecodingKey::from_ec_pem(&public),
            _ => DecodingKey::from_ed_pem(&public),
        }
        .unwrap();
        check_claims(&token, alg, &key, 120);
    }
}

#[test]
fn jwt_key_errors() {
    // a SEC1 key that is not DER, or does not name its curve, is refused with why
    let tmp = tempfile::tempdir().unwrap();
    let no_curve = simple_asn1::to_der(&simple_asn1::ASN1Block::Sequence(
        0,
        vec![
            simple_asn1::ASN1Block::Integer(0, 1.into()),
            simple_asn1::ASN1Block::OctetString(0, vec![7; 32]),
        ],
    ))
    .unwrap();
    for (contents, why) in [
        (b"not DER".to_vec(), "bad SEC1 key"),
        (no_curve, "does not name its curve"),
    ] {
        let path = tmp.path().join("ec.pem");
        std::fs::write(
            &path,
            pem::encode(&pem::Pem::new("EC PRIVATE KEY", contents)),
        )
        .unwrap();
        let e = load_key(Algorithm::ES256, &path).err().unwrap();
        assert!(e.to_string().contains(why), "{e}");
    }
    // a key of the wrong kind is refused at load time
    let e = load_key(Algorithm::ES384, &testdata("es256-sec1.pem"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("EC private key"), "{e}");
    let e = load_key(Algorithm::RS256, &testdata("ed25519.pem"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("RSA private key"), "{e}");
    let e = load_key(Algorithm::EdDSA, &testdata("es256.pem"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("Ed25519"), "{e}");
    let e = load_key(Algorithm::HS256, Path::new("/nonexistent/k"))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .starts_with("cannot read key file /nonexistent/k:"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("empty");
    std::fs::write(&k, "\r\n").unwrap();
    assert!(matches!(
        load_key(Algorithm::HS256, &k),
        Err(KeyError::Empty { .. })
    ));
    assert!(parse_algorithm("none").is_none());
    assert!(parse_algorithm("hs256").is_none());
    assert_eq!(parse_algorithm("EdDSA"), Some(Algorithm::EdDSA));
}

#[test]
fn example_config_policies() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/interceptor.toml");
    let cfg = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let p = OutboundPolicy::from_config(&cfg.outbound["egress"]).unwrap();
    assert_eq!(p.decide_host("evil.example.com").action, Action::Block);
    assert_eq!(p.decide_host("api.example.com").action, Action::Allow);
    assert_eq!(
        p.decide_address(ip("127.0.0.2")),
        Some(Decision::allow("cidr:127.0.0.2/32"))
    );
    let tenant = &cfg.tenants["acme"];
    let headers: Vec<_> = p
        .injections_for("api.example.com")
        .map(|i| i.render(&tenant.params, SystemTime::now()).unwrap())
        .collect();
    assert_eq!(headers.len(), 2);
    assert!(headers[0].1.to_str().unwrap().starts_with("Bearer ey"));
    assert_eq!(headers[1].1, "acme");
}

#[test]
fn the_environment_variables_injections_read_are_listed() {
    let p = policy(&format!(
        r#"[outbound.e]
[[outbound.e.inject]]
host = "a.example"
header = "X-A"
value = "Bearer {{env:TOKEN_A}}-{{customer_name}}"

[[outbound.e.inject]]
host = "b.example"
header = "Authorization"
jwt = {{ algorithm = "ES256", key_file = "{}", claims = {{ sub = "{{customer_name}}", nested = {{ team = ["x", "{{env:TEAM}}"] }} }} }}
"#,
        testdata("es256.pem").display()
    ));
    let vars: Vec<&str> = p.injections().iter().flat_map(|i| i.env_vars()).collect();
    assert_eq!(vars, ["TOKEN_A", "TEAM"]);
}
