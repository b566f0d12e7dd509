use super::*;
use std::net::Ipv4Addr;

const FILE: &str = "/etc/interceptor/test.toml";

fn errors(text: &str) -> Vec<String> {
    match parse(text, Path::new(FILE)) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.lines(),
    }
}

fn ok(text: &str) -> Config {
    match parse(text, Path::new(FILE)) {
        Ok(c) => c,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn spec_example(key_file: &Path) -> String {
    format!(
        r#"[interceptor]
relay = "127.0.0.1:15001"        # redirected TCP lands here; [::1] on the same port for IPv6
dns = "127.0.0.1:15053"          # redirected DNS lands here
admin_socket = "/run/interceptor/admin.sock"
log_dir = "/var/log/interceptor"
cgroup = "interceptor"           # subtree under the cgroup2 mount, found from /proc/self/mounts
sandbox_user = "nobody"

[resolve]                        # static names, like /etc/hosts, used by relay and DNS alike
"api.example.com" = ["127.0.0.2"]

[tenants.acme]                   # a tenant for `interceptor exec`
outbound = "egress"
params = {{ customer_name = "acme" }}

[[dispatch_namespaces]]
binding = "dispatcher"
namespace = "customers"
listen = "127.0.0.1:8080"
workers = "/var/lib/interceptor/customers"   # NAME.wasm is the User Worker for NAME.<any domain>
outbound = {{ service = "egress", parameters = ["customer_name", "url"] }}
limits = {{ cpu_ms = 50, memory_mb = 128, subrequests = 50 }}   # per incoming request, like Cloudflare's custom limits

[outbound.egress]                # the built-in outbound Worker
default = "allow"                # "allow" or "block" for hosts on neither list
allow = ["api.example.com", "*.github.com"]
block = ["evil.example.com"]
allow_cidrs = []                 # the guarded ranges of §5 are blocked unless listed here
log = true

[[outbound.egress.inject]]
host = "api.example.com"
header = "Authorization"
jwt = {{ algorithm = "HS256", key_file = "{}", ttl_seconds = 300, claims = {{ sub = "{{customer_name}}" }} }}
# or: value = "Bearer {{env:API_TOKEN}}"
"#,
        key_file.display()
    )
}

#[test]
fn spec_example_parses() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("api.key");
    std::fs::write(&key, "demo-secret\n").unwrap();
    let c = ok(&spec_example(&key));
    assert_eq!(c.path, Path::new(FILE));
    let i = &c.interceptor;
    assert_eq!(i.relay, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(i.relay_v6(), "[::1]:15001".parse().unwrap());
    assert_eq!(i.dns, "127.0.0.1:15053".parse().unwrap());
    assert_eq!(i.admin_socket, Path::new("/run/interceptor/admin.sock"));
    assert_eq!(i.log_dir, Path::new("/var/log/interceptor"));
    assert_eq!(i.cgroup, "interceptor");
    assert_eq!(i.sandbox_user, "nobody");
    assert_eq!(i.log_max_bytes, 64 * 1024 * 1024);
    assert_eq!(i.log_keep, 5);
    assert_eq!(i.max_connections_per_tenant, Some(4096));
    assert_eq!(
        c.resolve_host("API.example.com."),
        Some(&[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))][..])
    );
    let acme = c.tenant("acme").unwrap();
    assert_eq!(acme.outbound.as_deref(), Some("egress"));
    assert_eq!(acme.params["customer_name"], "acme");
    let ns = c.namespace("customers").unwrap();
    assert_eq!(ns.binding, "dispatcher");
    assert_eq!(ns.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(ns.workers, Path::new("/var/lib/interceptor/customers"));
    let o = ns.outbound.as_ref().unwrap();
    assert_eq!(o.service, "egress");
    assert_eq!(o.parameters, ["customer_name", "url"]);
    assert_eq!(
        ns.limits,
        Limits {
            cpu_ms: Some(50),
            memory_mb: Some(128),
            subrequests: Some(50)
        }
    );
    assert_eq!(
        ns.idle_timeout,
        Some(std::time::Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECONDS))
    );
    let e = c.outbound("egress").unwrap();
    assert_eq!(e.default, Action::Allow);
    assert_eq!(e.allow.len(), 2);
    assert_eq!(e.block, [HostPattern::Exact("evil.example.com".into())]);
    assert!(e.allow_cidrs.is_empty());
    assert!(e.log);
    assert_eq!(e.inject.len(), 1);
    assert_eq!(e.inject[0].header, "authorization");
    match &e.inject[0].source {
        InjectSource::Jwt(j) => {
            assert_eq!(j.algorithm, Algorithm::HS256);
            assert_eq!(j.key_file, key);
            assert_eq!(j.ttl_seconds, 300);
            assert_eq!(j.claims["sub"], "{customer_name}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn empty_config_has_defaults() {
    let c = ok("");
    assert_eq!(c.interceptor, InterceptorConfig::default());
    assert!(c.tenants.is_empty() && c.outbound.is_empty() && c.dispatch_namespaces.is_empty());
    let c = ok("[interceptor]\n");
    assert_eq!(c.interceptor, InterceptorConfig::default());
}

#[test]
fn extra_interceptor_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = dir.path().join("c.toml");
    let c = parse(
        "[interceptor]\nupstream_ca = [\"ca.pem\"]\nlog_max_bytes = 1000\nlog_keep = 0\nlog_dir = \"logs\"\nmax_connections_per_tenant = 0\n",
        &path,
    )
    .unwrap();
    assert_eq!(c.interceptor.upstream_ca, [dir.path().join("ca.pem")]);
    assert_eq!(c.interceptor.log_max_bytes, 1000);
    assert_eq!(c.interceptor.log_keep, 0);
    assert_eq!(c.interceptor.max_connections_per_tenant, None);
    assert_eq!(c.interceptor.log_dir, dir.path().join("logs"));
    let errs = parse("[interceptor]\nupstream_ca = [\"missing.pem\"]\n", &path)
        .unwrap_err()
        .lines();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].contains(":2:16: `upstream_ca`: cannot read"),
        "{errs:?}"
    );
}

#[test]
fn state_dir_defaults_and_is_relative_to_the_config_file() {
    assert_eq!(
        ok("").interceptor.state_dir,
        Path::new(DEFAULT_STATE_DIR),
        "default"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let c = parse("[interceptor]\nstate_dir = \"state\"\n", &path).unwrap();
    assert_eq!(c.interceptor.state_dir, dir.path().join("state"));
    let c = parse("[interceptor]\nstate_dir = \"/srv/i\"\n", &path).unwrap();
    assert_eq!(c.interceptor.state_dir, Path::new("/srv/i"));
    std::fs::write(dir.path().join("file"), "").unwrap();
    let errs = parse("[interceptor]\nstate_dir = \"\"\n", &path)
        .unwrap_err()
        .lines();
    assert!(
        errs[0].contains("c.toml:2:13: `state_dir` must not be empty"),
        "{errs:?}"
    );
    let errs = parse("[interceptor]\nstate_dir = \"file\"\n", &path)
        .unwrap_err()
        .lines();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("c.toml:2:13: `state_dir`: ") && errs[0].ends_with("is not a directory"),
        "{errs:?}"
    );
    let errs = parse("[interceptor]\nstate_dir = 1\n", &path)
        .unwrap_err()
        .lines();
    assert!(
        errs[0].contains(":2:13: `state_dir` must be a string"),
        "{errs:?}"
    );
}

#[test]
fn syntax_error_position() {
    let errs = errors("[interceptor]\nrelay = \"127.0.0.1:15001\"\ndns = \n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&format!("{FILE}:3:7: TOML syntax error")),
        "{errs:?}"
    );
    let errs = errors("[a]\nx = 1\nx = 2\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(&format!("{FILE}:3:1: TOML syntax error")),
        "{errs:?}"
    );
}

#[test]
fn unknown_key_position() {
    let errs = errors("[interceptor]\nrelay = \"127.0.0.1:15001\"\n  relya = \"x\"\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(&format!("{FILE}:3:3: unknown key `relya` in [interceptor]")),
        "{errs:?}"
    );
    let errs = errors("[outbound.x]\nallow = []\n[[outbound.x.inject]]\nhost = \"a.com\"\nheader = \"x-a\"\nvalue = \"v\"\nextra = 1\n");
    assert_eq!(errs, [format!("{FILE}:7:1: unknown key `extra` in [[outbound.x.inject]] #1; expected one of: host, header, value, jwt")]);
    let errs = errors("bogus = 1\n");
    assert!(errs[0].starts_with(&format!("{FILE}:1:1: unknown key `bogus` in the top level")));
}

#[test]
fn bad_cidr_position() {
    let errs = errors("[outbound.e]\nallow_cidrs = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with(&format!(
            "{FILE}:2:30: `allow_cidrs`: \"10.0.0.0/33\" is not a CIDR"
        )),
        "{errs:?}"
    );
    let errs = errors("[outbound.e]\nallow_cidrs = [\"10.0.0.1/8\"]\n");
    assert!(errs[0].contains("host bits set"), "{errs:?}");
    let c = ok("[outbound.e]\nallow_cidrs = [\"127.0.0.2\", \"fd00::/8\"]\n");
    assert_eq!(
        c.outbound["e"].allow_cidrs,
        vec![
            "127.0.0.2/32".parse::<IpNet>().unwrap(),
            "fd00::/8".parse().unwrap()
        ]
    );
}

#[test]
fn several_errors_are_collected() {
    let text = r#"[interceptor]
relay = "[::1]:15001"
log_keep = -1

[resolve]
"a.example" = ["not-an-ip"]

[tenants.acme]
outbound = "nope"

[tenants."bad name"]

[[dispatch_namespaces]]
namespace = "ns"
listen = "127.0.0.1:8080"
workers = "w"
outbound = { service = "missing", parameters = ["customer_name", "color"] }

[[dispatch_namespaces]]
namespace = "ns2"
listen = "127.0.0.1:8080"
workers = "w"

[outbound.e]
default = "maybe"
allow = ["*.*.com"]
allow_cidrs = ["x"]

[[outbound.e.inject]]
host = "a.com"
header = "x-a"

[[outbound.e.inject]]
host = "a.com"
header = "x-a"
value = "v"
jwt = { algorithm = "HS256", key_file = "/k" }

[[outbound.e.inject]]
host = "a.com"
header = "Authorization"
jwt = { algorithm = "HS999", key_file = "/nonexistent/interceptor.key" }

[[outbound.e.inject]]
host = "a.com"
header = "Authorization"
jwt = { algorithm = "HS256", key_file = "/nonexistent/interceptor.key" }
"#;
    let errs = errors(text);
    let expect = [
        "2:9: `relay` must be an IPv4 address",
        "3:12: `log_keep` must be between 0 and 10000, not -1",
        "6:16: [resolve]: \"not-an-ip\" is not an IP address",
        "9:12: unknown outbound `nope`",
        "11:10: invalid tenant name `bad name`",
        "17:24: unknown outbound `missing`",
        "17:66: unknown dispatch parameter `color`",
        "21:10: `listen` address 127.0.0.1:8080 is already used by dispatch namespace `ns`",
        "25:11: `default`: `maybe` is neither",
        "26:10: `allow`: `*.*.com`",
        "27:16: `allow_cidrs`: \"x\" is not a CIDR",
        "29:1: [[outbound.e.inject]] #1 needs `value` or `jwt`",
        "37:1: [[outbound.e.inject]] #2 has both `value` and `jwt`",
        "42:21: unknown JWT algorithm `HS999`",
        "47:41: `key_file`: cannot read key file /nonexistent/interceptor.key",
    ];
    for (e, want) in errs.iter().zip(expect.iter()) {
        assert!(
            e.starts_with(&format!("{FILE}:{want}")),
            "got {e:?}, want {want:?}\nall: {errs:#?}"
        );
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
}

#[test]
fn missing_file_is_one_line() {
    let err = load(Path::new("/nonexistent/interceptor.toml")).unwrap_err();
    let lines = err.lines();
    assert_eq!(
        lines,
        ["/nonexistent/interceptor.toml: cannot read config file: No such file or directory (os error 2)"]
    );
    assert_eq!(err.to_string(), lines[0]);
}

#[test]
fn display_joins_lines() {
    let err = parse("a = 1\nb = 2\n", Path::new("x.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.toml:1:1: unknown key `a` in the top level; expected one of: interceptor, resolve, tenants, dispatch_namespaces, outbound\n\
         x.toml:2:1: unknown key `b` in the top level; expected one of: interceptor, resolve, tenants, dispatch_namespaces, outbound"
    );
    let mut buf = Vec::new();
    err.write_to(&mut buf).unwrap();
    assert_eq!(String::from_utf8(buf).unwrap(), format!("{err}\n"));
}

#[test]
fn undeclared_param_in_inject_is_fine() {
    let c = ok("[outbound.e]\n[[outbound.e.inject]]\nhost = \"*.example.com\"\nheader = \"X-Who\"\nvalue = \"{whoever} {env:HOME}\"\n");
    assert_eq!(c.outbound["e"].inject.len(), 1);
}

#[test]
fn inject_checks() {
    let errs = errors("[outbound.e]\ninject = [{ host = \"a.com\", header = \"Host\", value = \"x\" }, { host = \"a.com:80\", header = \"bad header\", value = \"{oops\" }]\n");
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(errs[0].contains("`header`: `Host` is managed by the relay"));
    assert!(errs[1].contains("`host`: `a.com:80`: write the host without a port"));
    assert!(errs[2].contains("not a valid HTTP header name"));
    assert!(errs[3].contains("`value`: unclosed `{`"));
    let errs = errors("[outbound.e]\n[[outbound.e.inject]]\nhost = \"a.com\"\nheader = \"a\"\njwt = { algorithm = \"HS256\", key_file = \"/dev/null\", claims = { exp = 1, sub = \"{x\" } }\n");
    assert!(errs.iter().any(|e| e.contains("is empty")), "{errs:#?}");
    assert!(
        errs.iter()
            .any(|e| e.contains("claim `exp` is set by the interceptor")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("claim template: unclosed")),
        "{errs:#?}"
    );
}

#[test]
fn relative_key_file_and_claim_types() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.key"), "secret").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let path = dir.path().join("sub").join("..").join("c.toml");
    let text = "[outbound.e]\n[[outbound.e.inject]]\nhost = \"a.com\"\nheader = \"authorization\"\n[outbound.e.inject.jwt]\nalgorithm = \"HS512\"\nkey_file = \"k.key\"\nkid = \"v1\"\n[outbound.e.inject.jwt.claims]\nn = 1\nf = 1.5\nb = true\nlist = [\"{a}\", 2]\nnested = { x = \"{b}\" }\n";
    let c = parse(text, &path).unwrap();
    let InjectSource::Jwt(j) = &c.outbound["e"].inject[0].source else {
        panic!()
    };
    assert!(j.key_file.is_absolute());
    assert!(j.key_file.ends_with("k.key"));
    assert_eq!(j.ttl_seconds, DEFAULT_JWT_TTL_SECONDS);
    assert_eq!(j.kid.as_deref(), Some("v1"));
    assert_eq!(
        serde_json::Value::Object(j.claims.clone()),
        serde_json::json!({"n": 1, "f": 1.5, "b": true, "list": ["{a}", 2], "nested": {"x": "{b}"}})
    );
    // Debug never shows claim values
    assert!(!format!("{c:?}").contains("{a}"));
}

#[test]
fn names_and_references() {
    assert!(is_valid_name("acme_1-x"));
    assert!(!is_valid_name("-acme"));
    assert!(!is_valid_name(".acme"));
    assert!(!is_valid_name("a/b"));
    assert!(!is_valid_name(""));
    assert!(!is_valid_name(&"a".repeat(65)));
    assert!(is_valid_name(&"a".repeat(64)));
    // an invalid name is reported once, where it is defined
    let errs = errors("[outbound.\"-x\"]\n[tenants.t]\noutbound = \"-x\"\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains(":1:11: invalid outbound name `-x`"),
        "{errs:#?}"
    );
    let errs = errors("[tenants.t]\noutbound = \"egres\"\n[outbound.egress]\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains(":2:12: unknown outbound `egres` (no [outbound.egres]; defined: egress)"),
        "{errs:#?}"
    );
    // references do not depend on the order in the file
    let c = ok("[tenants.t]\noutbound = \"later\"\n[outbound.later]\ndefault = \"block\"\n");
    assert_eq!(c.tenants["t"].outbound.as_deref(), Some("later"));
    assert_eq!(c.outbound["later"].default, Action::Block);
}

#[test]
fn listen_collisions() {
    let errs = errors("[[dispatch_namespaces]]\nnamespace = \"a\"\nlisten = \"127.0.0.1:15001\"\nworkers = \"/w\"\n");
    assert!(errs[0].contains("already used by the relay"), "{errs:#?}");
    let errs = errors("[[dispatch_namespaces]]\nnamespace = \"a\"\nlisten = \"0.0.0.0:9000\"\nworkers = \"/w\"\n[[dispatch_namespaces]]\nnamespace = \"a\"\nlisten = \"127.0.0.1:9000\"\nworkers = \"/w\"\n");
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains(":6:13: dispatch namespace `a` is defined twice"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains(":7:10: `listen` address 127.0.0.1:9000 is already used"),
        "{errs:#?}"
    );
    let errs = errors("[[dispatch_namespaces]]\nnamespace = \"a\"\n");
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains(":1:1: dispatch namespace `a` is missing `listen`"),
        "{errs:#?}"
    );
    let errs = errors("[interceptor]\nrelay = \"127.0.0.1:53\"\ndns = \"127.0.0.1:53\"\n");
    assert!(
        errs[0].contains(":3:7: `relay` and `dns` are both"),
        "{errs:#?}"
    );
}

#[test]
fn type_errors() {
    let errs = errors("[interceptor]\nrelay = 15001\nlog_max_bytes = \"big\"\n[outbound.e]\nlog = \"yes\"\nallow = \"a.com\"\n[tenants.t]\nparams = { n = 1 }\n");
    let expect = [
        "2:9: `relay` must be a string, not an integer",
        "3:17: `log_max_bytes` must be an integer, not a string",
        "5:7: `log` must be true or false, not a string",
        "6:9: `allow` must be an array of strings, not a string",
        "8:16: `n` must be a string, not an integer",
    ];
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
    for (e, want) in errs.iter().zip(expect) {
        assert!(e.starts_with(&format!("{FILE}:{want}")), "{e} vs {want}");
    }
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/interceptor.toml");
    let c = match load(&path) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(c.tenants.contains_key("acme"));
    let policies = crate::policy::OutboundPolicy::all_from_config(&c).unwrap();
    assert!(policies.contains_key("egress"));
}

#[test]
fn a_namespace_cannot_share_a_tenants_name() {
    let errs = errors("[tenants.acme]\n[[dispatch_namespaces]]\nnamespace = \"acme\"\nlisten = \"127.0.0.1:9000\"\nworkers = \"/w\"\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains(":3:13: dispatch namespace `acme` has the name of a tenant"),
        "{errs:#?}"
    );
}

#[test]
fn idle_timeout_seconds_zero_is_never() {
    let ns = |extra: &str| {
        format!("[[dispatch_namespaces]]\nnamespace = \"n\"\nlisten = \"127.0.0.1:9000\"\nworkers = \"/w\"\n{extra}\n")
    };
    let c = ok(&ns("idle_timeout_seconds = 0"));
    assert_eq!(c.dispatch_namespaces[0].idle_timeout, None);
    let c = ok(&ns("idle_timeout_seconds = 30"));
    assert_eq!(
        c.dispatch_namespaces[0].idle_timeout,
        Some(std::time::Duration::from_secs(30))
    );
    let errs = errors(&ns("idle_timeout_seconds = -1"));
    assert!(
        errs[0].contains(":5:24: `idle_timeout_seconds` must be between 0 and"),
        "{errs:#?}"
    );
}

#[test]
fn sandbox_user_must_exist_and_not_be_root() {
    let uid_of_nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("this host has a nobody user")
        .uid;
    let c = ok(&format!(
        "[interceptor]\nsandbox_user = \"{uid_of_nobody}\"\n"
    ));
    assert_eq!(
        c.interceptor.sandbox_user, "nobody",
        "a uid is taken by its name"
    );
    for (user, why) in [
        ("no-such-user-here", "no such user \"no-such-user-here\""),
        ("root", "\"root\" is root"),
        ("0", "\"0\" is root"),
    ] {
        let errs = errors(&format!("[interceptor]\nsandbox_user = \"{user}\"\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(&format!("{FILE}:2:16: `sandbox_user`: {why}")),
            "{errs:?}"
        );
    }
}

#[test]
fn signing_keys_the_sandbox_user_can_read_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, "secret").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text =
        "[outbound.e]\n[[outbound.e.inject]]\nhost = \"a.example\"\nheader = \"Authorization\"\n\
                jwt = { algorithm = \"HS256\", key_file = \"jwt.key\" }\n";
    let path = dir.path().join("c.toml");
    let c = parse(text, &path).unwrap();
    assert_eq!(c.keys_open_to_sandboxes(), [key.as_path()]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(c.keys_open_to_sandboxes().is_empty());
    // Owned by the sandbox user, 0600 opens it to every sandbox all the same.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&key, Some(nobody.uid.as_raw()), None).unwrap();
        assert_eq!(c.keys_open_to_sandboxes(), [key.as_path()]);
        std::os::unix::fs::chown(&key, Some(0), None).unwrap();
    }
    // Readable, but in a directory others cannot enter.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(c.keys_open_to_sandboxes().is_empty());
}

#[test]
fn a_listener_port_the_kernel_may_hand_out_is_warned_about() {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let c = ok(&format!("[interceptor]\nrelay = \"127.0.0.1:{low}\"\n"));
    let warnings = c.host_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("`relay` port"), "{warnings:?}");
    assert!(ok("[interceptor]\nrelay = \"127.0.0.1:15001\"\n")
        .host_warnings()
        .is_empty());
    let c = ok(&format!("[interceptor]\nmetrics = \"127.0.0.1:{low}\"\n"));
    let warnings = c.host_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("`metrics` port"), "{warnings:?}");
    assert!(ok("[interceptor]\nmetrics = \"127.0.0.1:9464\"\n")
        .host_warnings()
        .is_empty());
}

#[test]
fn dns_forwarders_and_in_flight_limit() {
    let c = ok("");
    assert_eq!(c.interceptor.dns_forwarders, None, "resolv.conf's");
    assert_eq!(c.interceptor.dns_max_in_flight_per_tenant, Some(64));
    let c = ok(
        "[interceptor]\ndns_forwarders = [\"127.0.0.2:5353\", \"::1\"]\ndns_max_in_flight_per_tenant = 0\n",
    );
    assert_eq!(
        c.interceptor.dns_forwarders,
        Some(vec![
            "127.0.0.2:5353".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ])
    );
    assert_eq!(c.interceptor.dns_max_in_flight_per_tenant, None);
    let errs = errors("[interceptor]\ndns_forwarders = [\"resolver\", \"10.0.0.2:0\"]\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].contains(":2:19: `dns_forwarders`: \"resolver\" is not an address"),
        "{errs:?}"
    );
}

#[test]
fn sandbox_uids_and_limits_have_defaults_and_are_read() {
    let c = ok("");
    assert_eq!(c.interceptor.sandbox_uids, None, "sandbox_user for all");
    assert_eq!(
        c.interceptor.sandbox_limits,
        SandboxLimits {
            nofile: 4096,
            nproc: 512
        }
    );
    let c = ok("[interceptor]\nsandbox_uids = \"3000000000-3000000099\"\n\
         sandbox_limits = { nofile = 1024, nproc = 64 }\n\
         [tenants.a]\n[tenants.b]\n");
    let range = c.interceptor.sandbox_uids.unwrap();
    assert_eq!(
        (range.first, range.last, range.size()),
        (3000000000, 3000000099, 100)
    );
    assert_eq!(
        c.interceptor.sandbox_limits,
        SandboxLimits {
            nofile: 1024,
            nproc: 64
        }
    );
    // Only nproc given: nofile keeps its default.
    let c = ok("[interceptor]\nsandbox_limits = { nproc = 100 }\n");
    assert_eq!(c.interceptor.sandbox_limits.nofile, 4096);
}

#[test]
fn a_uid_range_with_root_or_backwards_or_malformed_is_refused_where_it_is_written() {
    for (range, why) in [
        ("0-100", "\"0-100\" includes uid 0, root"),
        ("3000000100-3000000000", "3000000100 is above 3000000000"),
        ("3000000000", "is not a range of uids"),
        ("-5-10", "is not a range of uids"),
        ("a-b", "is not a range of uids"),
        ("3000000000-4294967295", "which is no uid"),
        ("3000000000-99999999999", "is not a range of uids"),
    ] {
        let errs = errors(&format!("[interceptor]\nsandbox_uids = \"{range}\"\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(&format!("{FILE}:2:16: `sandbox_uids`: ")) && errs[0].contains(why),
            "{range}: {errs:?}"
        );
    }
    let errs = errors("[interceptor]\nsandbox_uids = 5\n");
    assert!(
        errs[0].contains(":2:16: `sandbox_uids` must be a string"),
        "{errs:?}"
    );
}

#[test]
fn a_uid_range_holding_a_users_or_groups_id_is_refused() {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("this host has a nobody user")
        .uid
        .as_raw();
    let range = format!("{}-{}", nobody - 1, nobody + 1);
    let errs = errors(&format!("[interceptor]\nsandbox_uids = \"{range}\"\n"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&format!("{FILE}:2:16: `sandbox_uids`: {range} includes ")),
        "{errs:?}"
    );

    let r = UidRange {
        first: 100_000,
        last: 100_999,
    };
    let passwd = "root:x:0:0::/root:/bin/sh\n# comment\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    let group = "root:x:0:\nusers:x:100:\n";
    assert_eq!(parse::ids_in_use(r, passwd, group, "", ""), None);
    assert_eq!(
        parse::ids_in_use(r, "svc:x:100500:1::/:/bin/false\n", group, "", "").as_deref(),
        Some("uid 100500 of user svc (/etc/passwd)")
    );
    assert_eq!(
        parse::ids_in_use(r, passwd, "grp:x:100999:\n", "", "").as_deref(),
        Some("gid 100999 of group grp (/etc/group)")
    );
    // Subordinate ids [start, start + count): touching the range's ends counts,
    // stopping just short of it does not.
    assert_eq!(
        parse::ids_in_use(r, passwd, group, "alice:100000:65536\n", "").as_deref(),
        Some("alice's subordinate ids 100000-165535 (/etc/subuid)")
    );
    assert_eq!(
        parse::ids_in_use(r, passwd, group, "alice:36000:64000\n", ""),
        None
    );
    assert!(parse::ids_in_use(r, passwd, group, "", "bob:36000:64001\n").is_some());
    assert_eq!(
        parse::ids_in_use(r, passwd, group, "", "bob:101000:10\n"),
        None
    );
}

#[test]
fn a_uid_range_smaller_than_the_tenants_is_a_config_error() {
    let errs = errors(
        "[interceptor]\nsandbox_uids = \"3000000000-3000000001\"\n\
         [tenants.a]\n[tenants.b]\n[tenants.c]\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(&format!(
            "{FILE}:2:16: `sandbox_uids` 3000000000-3000000001 holds 2 uid(s), fewer than the 3 tenants configured"
        )),
        "{errs:?}"
    );
    ok("[interceptor]\nsandbox_uids = \"3000000000-3000000002\"\n\
        [tenants.a]\n[tenants.b]\n[tenants.c]\n");
}

#[test]
fn sandbox_limits_are_checked_key_by_key() {
    let errs = errors("[interceptor]\nsandbox_limits = { nofile = 10, nproc = 0, cpu = 1 }\n");
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].contains(":2:29: `nofile` must be between 64 and 1048576, not 10"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains(":2:41: `nproc` must be between 16 and 4194304, not 0"),
        "{errs:?}"
    );
    assert!(
        errs[2].contains(
            ":2:44: unknown key `cpu` in `sandbox_limits`; expected one of: nofile, nproc"
        ),
        "{errs:?}"
    );
    let errs = errors("[interceptor]\nsandbox_limits = 4096\n");
    assert!(
        errs[0].contains(":2:18: `sandbox_limits` must be a table, not an integer"),
        "{errs:?}"
    );
}

#[test]
fn metrics_is_off_by_default_and_takes_an_address_and_port() {
    assert_eq!(ok("").interceptor.metrics, None);
    let c = ok("[interceptor]\nmetrics = \"127.0.0.1:9464\"\n");
    assert_eq!(
        c.interceptor.metrics,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    let c = ok("[interceptor]\nmetrics = \"[::1]:9464\"\n");
    assert_eq!(c.interceptor.metrics, Some("[::1]:9464".parse().unwrap()));
}

#[test]
fn a_bad_metrics_address_is_reported_where_it_is_written() {
    let errs = errors("[interceptor]\nmetrics = \"localhost\"\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains(":2:11: `metrics`: \"localhost\" is not an address and port"),
        "{errs:#?}"
    );
    let errs = errors("[interceptor]\nmetrics = \"127.0.0.1:0\"\n");
    assert!(errs[0].contains(":2:11: `metrics`: port 0"), "{errs:#?}");
    let errs = errors("[interceptor]\nmetrics = 9464\n");
    assert!(
        errs[0].contains(":2:11: `metrics` must be a string"),
        "{errs:#?}"
    );
}

#[test]
fn metrics_cannot_share_a_port_with_the_relay_or_a_dispatcher() {
    let errs = errors("[interceptor]\nrelay = \"127.0.0.1:15001\"\nmetrics = \"0.0.0.0:15001\"\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains(":3:11: `metrics` address 0.0.0.0:15001 is already used by the relay"),
        "{errs:#?}"
    );
    let errs = errors(
        "[interceptor]\nmetrics = \"127.0.0.1:9464\"\n[[dispatch_namespaces]]\nnamespace = \"n\"\nlisten = \"127.0.0.1:9464\"\nworkers = \"/tmp\"\n",
    );
    assert!(
        errs.iter().any(|e| e
            .contains("`listen` address 127.0.0.1:9464 is already used by the metrics listener")),
        "{errs:#?}"
    );
}
