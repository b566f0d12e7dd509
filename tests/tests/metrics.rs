//! End to end: `[interceptor] metrics` serves Prometheus text at `/metrics`
//! that agrees with the tenants' logs, and sandboxes can neither read it nor
//! take its port. A real daemon, sandboxed curl and python, upstreams on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use interceptor_tests::*;
use prometheus_parse::{Scrape, Value};

const CONFIG: &str = r#"
[resolve]
"api.test" = ["127.0.0.2"]
"blocked.test" = ["127.0.0.2"]

[tenants.acme]
outbound = "egress"

[tenants.beta]
outbound = "egress"

[tenants.loopy]
outbound = "loopback"

[outbound.egress]
default = "allow"
block = ["blocked.test"]
allow_cidrs = ["127.0.0.2/32"]

# Every loopback address allowed: the metrics port must still be out of reach.
[outbound.loopback]
default = "allow"
allow_cidrs = ["127.0.0.0/8"]
"#;

fn daemon(metrics: SocketAddr) -> Daemon {
    Daemon::start_configured(&format!("metrics = \"{metrics}\""), CONFIG, &[])
}

fn metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A plain HTTP/1.0 GET from outside every sandbox: (status line, headers, body).
fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, headers, body) = get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The sum of the samples of `metric` whose labels include `labels` (0 if none).
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            Value::Summary(_) => panic!("no summaries here"),
        })
        .sum()
}

/// Requests of `tenant` with `decision` over http.
fn http(scrape: &Scrape, tenant: &str, decision: &str) -> f64 {
    value(
        scrape,
        "interceptor_requests_total",
        &[
            ("tenant", tenant),
            ("proto", "http"),
            ("decision", decision),
        ],
    )
}

/// curl in `tenant`'s sandbox: (exit code, body, HTTP status).
fn curl(d: &Daemon, tenant: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    cmd.extend_from_slice(args);
    let out = d.exec(tenant, &[], &cmd);
    let text = stdout(&out);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        body.to_string(),
        status.to_string(),
    )
}

fn log_lines(d: &Daemon) -> usize {
    std::fs::read_dir(&d.log_dir)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn requests_are_counted_per_tenant_and_decision_exactly_as_they_are_logged() {
    if !privileged("requests_are_counted_per_tenant_and_decision_exactly_as_they_are_logged") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let addr = metrics_addr();
    let d = daemon(addr);
    let before = scrape(addr);
    // Reloads are not built yet: both results are there, at 0.
    for result in ["success", "failure"] {
        let reloads = before
            .samples
            .iter()
            .find(|s| {
                s.metric == "interceptor_config_reloads_total"
                    && s.labels.get("result") == Some(result)
            })
            .unwrap_or_else(|| panic!("interceptor_config_reloads_total{{result={result}}}"));
        assert_eq!(reloads.value, Value::Counter(0.0));
    }

    let allowed = |host: &str| {
        (
            format!("{host}:{port}:127.0.0.2"),
            format!("http://{host}:{port}/x?size=1000"),
        )
    };
    let (resolve, url) = allowed("api.test");
    for _ in 0..3 {
        // A body of 100 bytes: bytes move both ways.
        let (code, body, status) = curl(
            &d,
            "acme",
            &["--resolve", &resolve, "-d", &"b".repeat(100), &url],
        );
        assert_eq!((code, status.as_str()), (0, "200"), "{body}");
    }
    let (blocked_resolve, blocked_url) = allowed("blocked.test");
    for _ in 0..2 {
        let (_, body, status) = curl(&d, "acme", &["--resolve", &blocked_resolve, &blocked_url]);
        assert_eq!(status, "403", "{body}");
    }
    let (_, body, status) = curl(&d, "beta", &["--resolve", &resolve, &url]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(api.requests().len(), 4, "the blocked ones never reached it");

    let after = scrape(addr);
    let moved = |tenant, decision| http(&after, tenant, decision) - http(&before, tenant, decision);
    assert_eq!(moved("acme", "allow"), 3.0);
    assert_eq!(moved("acme", "block"), 2.0);
    assert_eq!(moved("beta", "allow"), 1.0);
    assert_eq!(moved("beta", "block"), 0.0);
    assert_eq!(
        value(
            &after,
            "interceptor_requests_total",
            &[("decision", "error")]
        ),
        0.0
    );
    // One duration observation per request.
    assert_eq!(
        value(
            &after,
            "interceptor_request_duration_seconds",
            &[("tenant", "acme")]
        ),
        5.0
    );

    // The log has a line for every request counted, and the metric says so.
    let lines = log_lines(&d);
    assert_eq!(lines, 6, "{:#?}", d.logs("acme"));
    assert_eq!(
        value(&after, "interceptor_log_lines_total", &[]),
        lines as f64
    );
    assert_eq!(
        value(&after, "interceptor_requests_total", &[]),
        lines as f64
    );

    // Bytes move by what the log says moved.
    for (direction, key) in [("sent", "bytes_sent"), ("received", "bytes_received")] {
        let logged: u64 = d
            .logs("acme")
            .iter()
            .map(|e| e[key].as_u64().unwrap())
            .sum();
        assert!(logged > 0, "{key}");
        let counted = value(
            &after,
            "interceptor_bytes_total",
            &[("tenant", "acme"), ("direction", direction)],
        ) - value(
            &before,
            "interceptor_bytes_total",
            &[("tenant", "acme"), ("direction", direction)],
        );
        assert_eq!(counted, logged as f64, "{direction}");
    }
    let received = value(
        &after,
        "interceptor_bytes_total",
        &[("tenant", "acme"), ("direction", "received")],
    );
    assert!(received >= 3000.0, "three 1000-byte bodies: {received}");

    // Every tenant's open connections are there; none is open now.
    for tenant in ["acme", "beta", "loopy"] {
        assert!(
            after
                .samples
                .iter()
                .any(|s| s.metric == "interceptor_open_connections"
                    && s.labels.get("tenant") == Some(tenant)
                    && s.value == Value::Gauge(0.0)),
            "{tenant}"
        );
    }

    // Only /metrics.
    let (status, _, _) = get(addr, "/");
    assert!(status.contains(" 404 "), "{status}");
    let (status, _, _) = get(addr, "/metrics/x");
    assert!(status.contains(" 404 "), "{status}");
}

#[test]
fn an_open_connection_shows_in_the_gauge_while_it_is_open() {
    if !privileged("an_open_connection_shows_in_the_gauge_while_it_is_open") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let addr = metrics_addr();
    let d = daemon(addr);
    // The upstream answers after 2 s: the connection stays open until then.
    let slow = d
        .exec_command(
            "acme",
            &[],
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("http://127.0.0.2:{port}/x?wait=2000"),
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let open = |s: &Scrape| value(s, "interceptor_open_connections", &[("tenant", "acme")]);
    while open(&scrape(addr)) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "never seen open");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(open(&scrape(addr)), 1.0);
    assert_eq!(
        value(
            &scrape(addr),
            "interceptor_open_connections",
            &[("tenant", "beta")]
        ),
        0.0
    );
    slow.wait_with_output().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open(&scrape(addr)) > 0.0 {
        assert!(std::time::Instant::now() < deadline, "still open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sandbox_dialling_the_metrics_port_is_refused_by_the_relay() {
    if !privileged("a_sandbox_dialling_the_metrics_port_is_refused_by_the_relay") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let addr = metrics_addr();
    let d = daemon(addr);
    let metrics_url = format!("http://{addr}/metrics");
    for tenant in ["acme", "loopy"] {
        // Control: the tenant reaches an upstream on loopback it may reach.
        let (code, body, status) = curl(
            &d,
            tenant,
            &[&format!("http://127.0.0.2:{}/ok", api.port())],
        );
        assert_eq!((code, status.as_str()), (0, "200"), "{tenant}: {body}");

        let (_, body, status) = curl(&d, tenant, &[&metrics_url]);
        assert_eq!(status, "403", "{tenant}: {body}");
        assert!(!body.contains("interceptor_"), "{tenant}: {body}");
        let entry = d.wait_for_log(tenant, |e| {
            e["url"].as_str().is_some_and(|u| u.ends_with("/metrics"))
        });
        assert_eq!(entry["decision"], "block", "{entry}");
        // `loopy` may reach loopback: the metrics listener is the daemon's own.
        if tenant == "loopy" {
            assert_eq!(entry["rule"], "loop", "{entry}");
        }
        // Even as bytes that are not HTTP, it gets nothing of the metrics.
        let script = format!(
            "import socket\n\
             try:\n  s=socket.create_connection(('127.0.0.1',{port}),timeout=5)\n  s.sendall(b'\\x16\\x03\\x01\\x00\\x05hello')\n  s.settimeout(5)\n  print('got', s.recv(4096))\n\
             except OSError as e:\n  print('refused', e)\n",
            port = addr.port()
        );
        let out = d.python(tenant, &script);
        assert!(
            !stdout(&out).contains("interceptor_"),
            "{tenant}: {}",
            text(&out)
        );
        assert!(
            stdout(&out).contains("got b''") || stdout(&out).contains("refused"),
            "{tenant}: {}",
            text(&out)
        );
    }
    // And the refusals are counted like any other.
    let s = scrape(addr);
    assert!(http(&s, "acme", "block") >= 1.0);
    assert!(http(&s, "loopy", "block") >= 1.0);
}

#[test]
fn a_sandbox_cannot_bind_the_metrics_port() {
    if !privileged("a_sandbox_cannot_bind_the_metrics_port") {
        return;
    }
    let addr = metrics_addr();
    let d = daemon(addr);
    // No TCP socket of a sandbox binds at all, and a UDP one only to port 0;
    // the guard is what keeps the kernel from picking the metrics port for it
    // (IP_LOCAL_PORT_RANGE narrowed to that port, then bind to port 0).
    let script = format!(
        "import socket,struct\n\
         for kind, host, p in [(socket.SOCK_STREAM, '127.0.0.1', {port}), (socket.SOCK_STREAM, '0.0.0.0', {port}), (socket.SOCK_DGRAM, '127.0.0.1', {port})]:\n\
         \x20 try:\n    socket.socket(socket.AF_INET, kind).bind((host, p))\n    print('bound', kind, host, p)\n\
         \x20 except OSError as e:\n    print('bind refused', kind, host, p, e.errno)\n\
         u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         u.bind(('127.0.0.1', 0))\n\
         print('control picked', u.getsockname()[1])\n\
         s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         try:\n  s.setsockopt(socket.IPPROTO_IP, 51, struct.pack('=I', ({port} << 16) | {port}))\n\
         except OSError:\n  print('no port range')\n\
         try:\n  s.bind(('127.0.0.1', 0))\n  print('picked', s.getsockname()[1])\n\
         except OSError as e:\n  print('pick refused', e.errno)\n",
        port = addr.port()
    );
    let out = d.python("loopy", &script);
    let out_text = stdout(&out);
    assert!(!out_text.contains("bound"), "{}", text(&out));
    assert_eq!(
        out_text.matches("bind refused").count(),
        3,
        "{}",
        text(&out)
    );
    // EPERM, not EADDRINUSE because the daemon holds the port.
    assert!(!out_text.contains(" 98\n"), "{}", text(&out));
    // Control: the kernel's pick of any other port is the sandbox's.
    assert!(out_text.contains("control picked"), "{}", text(&out));
    // Linux 6.3+ has IP_LOCAL_PORT_RANGE.
    if !out_text.contains("no port range") {
        assert!(out_text.contains("pick refused 1"), "{}", text(&out));
    }
}

#[test]
fn check_names_the_line_and_column_of_a_bad_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("interceptor.toml");
    let check = || {
        std::process::Command::new(interceptor_bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    std::fs::write(&config, "[interceptor]\nmetrics = \"127.0.0.1:9464\"\n").unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for bad in [
        "\"localhost:9464\"",
        "\"127.0.0.1\"",
        "\"127.0.0.1:0\"",
        "9464",
    ] {
        std::fs::write(&config, format!("[interceptor]\nmetrics = {bad}\n")).unwrap();
        let out = check();
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!("{}:2:11: `metrics`", config.display())),
            "{bad}: {stderr}"
        );
    }
}
