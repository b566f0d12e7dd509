//! End to end: a real daemon, real eBPF programs, real sandboxed processes
//! (curl, python) started with `interceptor exec`, and real upstream servers on
//! loopback addresses. Each test asserts on what the upstreams received and on
//! the tenant's log.

use std::time::Duration;

use interceptor_tests::*;
use serde_json::Value;

const JWT_KEY: &str = "test-secret-for-hs256";

const CONFIG: &str = r#"
[resolve]
"api.test" = ["127.0.0.2"]
"tls.test" = ["127.0.0.2"]
"blocked.test" = ["127.0.0.2"]
"metadata.test" = ["169.254.169.254"]
"v6.test" = ["::1"]
"team.test" = ["127.0.0.2"]

[tenants.acme]
outbound = "egress"
params = { customer_name = "acme" }

[tenants.strict]
outbound = "strict"

[outbound.strict]
default = "block"
allow = ["tls.test"]
allow_cidrs = ["127.0.0.2/32"]

[outbound.egress]
default = "allow"
block = ["blocked.test", "*.evil.test"]
allow_cidrs = ["127.0.0.2/32", "127.0.0.3/32", "::1/128"]

[[outbound.egress.inject]]
host = "api.test"
header = "Authorization"
jwt = { algorithm = "HS256", key_file = "{dir}/jwt.key", ttl_seconds = 300, claims = { sub = "{customer_name}" } }

[[outbound.egress.inject]]
host = "team.test"
header = "X-Team"
value = "team-{team}"

[[outbound.egress.inject]]
host = "env.test"
header = "X-Token"
value = "{env:INTERCEPTOR_TEST_TOKEN}"
"#;

fn daemon() -> Daemon {
    Daemon::start_with(CONFIG, &[("jwt.key", JWT_KEY)])
}

/// curl in the tenant's sandbox; returns (exit code, body, HTTP status).
fn curl(d: &Daemon, params: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    cmd.extend_from_slice(args);
    let out = d.exec("acme", params, &cmd);
    let text = stdout(&out);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        body.to_string(),
        status.to_string(),
    )
}

fn claims_of(authorization: &str) -> Value {
    jwt_claims(authorization, JWT_KEY)
}

#[test]
fn http_is_judged_by_host_gets_a_jwt_and_is_logged() {
    if !privileged("http_is_judged_by_host_gets_a_jwt_and_is_logged") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let d = daemon();
    let resolve = format!("api.test:{port}:127.0.0.2");
    let url = format!("http://api.test:{port}/hello?x=1");

    let (code, body, status) = curl(&d, &[], &["--resolve", &resolve, &url]);
    assert_eq!((code, status.as_str()), (0, "200"), "{body}");
    assert!(body.starts_with("hello from"), "{body}");
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/hello?x=1");
    let claims = claims_of(seen[0].header("authorization").expect("JWT injected"));
    assert_eq!(claims["sub"], "acme");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );

    // --param overrides the tenant's parameter for this run only.
    let (_, _, status) = curl(
        &d,
        &[("customer_name", "globex")],
        &["--resolve", &resolve, &url],
    );
    assert_eq!(status, "200");
    let claims = claims_of(api.requests()[1].header("authorization").unwrap());
    assert_eq!(claims["sub"], "globex");

    // A credential the sandbox sends itself is replaced, not kept.
    let (_, _, status) = curl(
        &d,
        &[],
        &[
            "--resolve",
            &resolve,
            "-H",
            "Authorization: Bearer forged",
            &url,
        ],
    );
    assert_eq!(status, "200");
    let auth = api.requests()[2]
        .header("authorization")
        .unwrap()
        .to_string();
    assert_ne!(auth, "Bearer forged");
    claims_of(&auth);

    // A blocked host gets 403 with a JSON body and never reaches upstream.
    let blocked = format!("blocked.test:{port}:127.0.0.2");
    let (_, body, status) = curl(
        &d,
        &[],
        &[
            "--resolve",
            &blocked,
            &format!("http://blocked.test:{port}/x"),
        ],
    );
    assert_eq!(status, "403");
    let body: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["error"], "blocked");
    assert_eq!(body["host"], "blocked.test");
    assert_eq!(body["rule"], "block:blocked.test");
    assert_eq!(
        api.requests().len(),
        3,
        "the blocked request reached upstream"
    );

    let allowed = d.wait_for_log("acme", |e| {
        e["url"] == format!("http://api.test:{port}/hello?x=1")
    });
    assert_eq!(allowed["tenant"], "acme");
    assert_eq!(allowed["proto"], "http");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(allowed["host"], "api.test");
    assert_eq!(allowed["dst"], format!("127.0.0.2:{port}"));
    assert_eq!(allowed["upstream"], format!("127.0.0.2:{port}"));
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["status"], 200);
    assert!(allowed["pid"].as_u64().unwrap() > 0);
    assert!(allowed["bytes_received"].as_u64().unwrap() > 0);
    assert_eq!(allowed["params"]["customer_name"], "acme");
    assert!(allowed["ts"].as_str().unwrap().contains('T'));
    let blocked = d.wait_for_log("acme", |e| e["host"] == "blocked.test");
    assert_eq!(blocked["decision"], "block");
    assert_eq!(blocked["rule"], "block:blocked.test");
    assert_eq!(blocked["status"], 403);
    let log_text = std::fs::read_to_string(d.log_dir.join("acme.jsonl")).unwrap();
    assert!(!log_text.contains("Bearer"), "a credential was logged");
}

#[test]
fn a_spoofed_host_header_never_carries_the_credential_to_the_dialled_ip() {
    if !privileged("a_spoofed_host_header_never_carries_the_credential_to_the_dialled_ip") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let attacker = Upstream::start(&format!("127.0.0.3:{port}"));
    let d = daemon();
    let (_, body, status) = curl(
        &d,
        &[],
        &[
            "-H",
            "Host: api.test",
            &format!("http://127.0.0.3:{port}/steal"),
        ],
    );
    assert_eq!(status, "200", "{body}");
    assert_eq!(
        attacker.connections(),
        0,
        "the relay connected to the dialled IP"
    );
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/steal");
    claims_of(seen[0].header("authorization").unwrap());
    let entry = d.wait_for_log("acme", |e| e["url"] == "http://api.test/steal");
    assert_eq!(entry["dst"], format!("127.0.0.3:{port}"));
    assert_eq!(entry["upstream"], format!("127.0.0.2:{port}"));
}

#[test]
fn guarded_ranges_are_refused_however_they_are_reached() {
    if !privileged("guarded_ranges_are_refused_however_they_are_reached") {
        return;
    }
    let private = EchoServer::start("127.0.0.5:0");
    let port = private.addr.port();
    let d = daemon();

    let (_, body, status) = curl(&d, &[], &[&format!("http://127.0.0.5:{port}/")]);
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("guarded"), "{body}");

    // A name that resolves to the metadata address: judged by what the relay resolves.
    let (_, body, status) = curl(
        &d,
        &[],
        &[
            "--resolve",
            &format!("metadata.test:{port}:127.0.0.2"),
            &format!("http://metadata.test:{port}/latest"),
        ],
    );
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("guarded"), "{body}");

    // IPv4-mapped IPv6 forms, over HTTP and as opaque TCP.
    let (_, body, status) = curl(&d, &[], &[&format!("http://[::ffff:127.0.0.5]:{port}/")]);
    assert_eq!(status, "403", "{body}");
    let out = d.python(
        "acme",
        &format!(
            "import socket\ns=socket.socket(socket.AF_INET6)\ns.connect(('::ffff:127.0.0.5',{port}))\n\
             s.sendall(b'\\x00\\x01raw')\ns.settimeout(3)\n\
             try:\n  print('got', s.recv(10))\nexcept Exception as e:\n  print('error', e)\n"
        ),
    );
    assert!(!stdout(&out).contains("raw"), "{}", text(&out));
    // TCP Fast Open: the connect hides in sendto(), data in the SYN.
    let out = d.python(
        "acme",
        &format!(
            "import socket\ns=socket.socket()\n\
             try:\n  s.sendto(b'\\x00\\x01tfo',socket.MSG_FASTOPEN,('127.0.0.5',{port}))\n  \
             s.settimeout(3)\n  print('got', s.recv(10))\nexcept Exception as e:\n  print('error', e)\n"
        ),
    );
    let printed = stdout(&out);
    assert!(
        printed.starts_with("got b''") || printed.starts_with("error"),
        "{}",
        text(&out)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(private.connections(), 0, "a guarded address was reached");
    d.wait_for_log("acme", |e| {
        e["proto"] == "tcp"
            && e["decision"] == "block"
            && e["rule"].as_str().unwrap_or("").starts_with("guarded")
    });
}

#[test]
fn ipv6_and_kept_alive_connections_with_two_hosts() {
    if !privileged("ipv6_and_kept_alive_connections_with_two_hosts") {
        return;
    }
    let v6 = Upstream::start("[::1]:0");
    let api = Upstream::start("127.0.0.2:0");
    let d = daemon();

    let (_, body, status) = curl(&d, &[], &[&format!("http://[::1]:{}/six", v6.port())]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(v6.requests()[0].uri, "/six");
    let entry = d.wait_for_log("acme", |e| {
        e["url"].as_str().unwrap_or("").ends_with("/six")
    });
    assert_eq!(entry["dst"], format!("[::1]:{}", v6.port()));

    // Two requests on one connection, each judged by its own Host.
    let script = format!(
        "import http.client\nc=http.client.HTTPConnection('127.0.0.2',{port},timeout=5)\n\
         c.request('GET','/first',headers={{'Host':'api.test'}})\nr=c.getresponse();r.read()\n\
         print('first', r.status)\nlocal=c.sock.getsockname()\n\
         c.request('GET','/second',headers={{'Host':'blocked.test'}})\nr=c.getresponse();r.read()\n\
         print('second', r.status)\nprint('same', c.sock.getsockname()==local)\n",
        port = api.port()
    );
    let out = d.python("acme", &script);
    let printed = stdout(&out);
    assert!(printed.contains("first 200"), "{}", text(&out));
    assert!(printed.contains("second 403"), "{}", text(&out));
    assert!(printed.contains("same True"), "{}", text(&out));
    assert_eq!(api.requests().len(), 1);
    assert_eq!(api.requests()[0].uri, "/first");

    // HTTP/1.0 without a Host header is judged by the dialled address.
    let script = format!(
        "import socket\ns=socket.create_connection(('127.0.0.2',{port}),timeout=5)\n\
         s.sendall(b'GET /ten HTTP/1.0\\r\\n\\r\\n')\nprint(s.recv(12))\n",
        port = api.port()
    );
    let out = d.python("acme", &script);
    assert!(stdout(&out).contains(" 200"), "{}", text(&out));
    assert_eq!(api.requests()[1].uri, "/ten");

    // An absolute-form URI without a port goes to the port the sandbox dialled.
    let script = format!(
        "import socket\ns=socket.create_connection(('127.0.0.2',{port}),timeout=5)\n\
         s.sendall(b'GET http://api.test/abs HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n')\nprint(s.recv(12))\n",
        port = api.port()
    );
    let out = d.python("acme", &script);
    assert!(stdout(&out).contains(" 200"), "{}", text(&out));
    assert_eq!(api.requests()[2].uri, "/abs");

    // Empty lines before the request line do not make it opaque bytes, judged
    // by address only; nor does HTTP/2 with prior knowledge pass unjudged.
    let script = format!(
        r"import socket
for name,data in [('crlf',b'\r\n\r\nGET /crlf HTTP/1.1\r\nHost: blocked.test\r\n\r\n'),
                  ('port',b'GET /port HTTP/1.1\r\nHost: api.test:99999\r\n\r\n'),
                  ('zero',b'GET /zero HTTP/1.1\r\nHost: api.test:0\r\n\r\n'),
                  ('h2',b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00')]:
    s=socket.create_connection(('127.0.0.2',{port}),timeout=5)
    s.sendall(data)
    try:
        print(name, s.recv(100).split(b'\r\n')[0])
    except ConnectionResetError:
        print(name, 'reset')
",
        port = api.port()
    );
    let out = d.python("acme", &script);
    assert!(
        stdout(&out).contains("crlf b'HTTP/1.1 403 Forbidden'"),
        "{}",
        text(&out)
    );
    assert!(
        stdout(&out).contains("port b'HTTP/1.1 400 Bad Request'"),
        "{}",
        text(&out)
    );
    assert!(
        stdout(&out).contains("zero b'HTTP/1.1 400 Bad Request'"),
        "{}",
        text(&out)
    );
    assert!(
        !stdout(&out).contains("h2 b'HTTP/1.1 200"),
        "{}",
        text(&out)
    );
    // Refused by the HTTP server before any request was read, and logged.
    let refused = d.wait_for_log("acme", |e| {
        e["rule"] == "bad-request" && e["error"].as_str().unwrap_or("").contains("HTTP2")
    });
    assert_eq!(refused["decision"], "error");
    assert_eq!(api.requests().len(), 3, "{:?}", api.requests());
}

/// Concurrent requests reuse the relay's upstream connections: however many
/// client connections come and go, the upstream sees about as many connections
/// as requests it has in flight at once.
#[test]
fn concurrent_requests_reuse_pooled_upstream_connections() {
    if !privileged("concurrent_requests_reuse_pooled_upstream_connections") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let d = daemon();
    // 64 clients at once, five rounds each, a new client connection per request.
    let script = format!(
        r"import http.client,threading
barrier=threading.Barrier(64)
ok=[]
def client():
    for _ in range(5):
        barrier.wait()
        c=http.client.HTTPConnection('127.0.0.2',{port},timeout=10)
        c.request('GET','/pooled?wait=100',headers={{'Host':'api.test','Connection':'close'}})
        r=c.getresponse();r.read();c.close()
        ok.append(r.status==200)
threads=[threading.Thread(target=client) for _ in range(64)]
[t.start() for t in threads];[t.join() for t in threads]
print('ok', sum(ok))
",
        port = api.port()
    );
    let out = d.python("acme", &script);
    assert!(stdout(&out).contains("ok 320"), "{}", text(&out));
    assert_eq!(api.requests().len(), 320);
    let connections = api.connections();
    assert!(
        (64..=96).contains(&connections),
        "320 requests, 64 at a time, took {connections} upstream connections"
    );
}

/// One tenant cannot take every connection the relay has: past its limit a
/// connection is closed unread and logged, while other tenants go on, and a
/// connection it gives back can be used again.
#[test]
fn a_tenant_holds_no_more_relay_connections_than_its_limit() {
    if !privileged("a_tenant_holds_no_more_relay_connections_than_its_limit") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let d = Daemon::start_configured(
        "max_connections_per_tenant = 4",
        CONFIG,
        &[("jwt.key", JWT_KEY)],
    );
    let script = format!(
        r"import socket,sys,time
def request(s):
    s.sendall(b'GET /held HTTP/1.1\r\nHost: api.test\r\n\r\n')
    try:
        return s.recv(100).split(b'\r\n')[0]
    except ConnectionResetError:
        return b'reset'
held=[socket.create_connection(('127.0.0.2',{port}),timeout=5) for _ in range(4)]
print('held', all(request(s) == b'HTTP/1.1 200 OK' for s in held))
print('fifth', request(socket.create_connection(('127.0.0.2',{port}),timeout=5)))
print('holding', flush=True)
sys.stdin.readline()
held[0].close()
time.sleep(0.5)
print('again', request(socket.create_connection(('127.0.0.2',{port}),timeout=5)), flush=True)
",
        port = api.port()
    );
    let mut holder = d
        .exec_command("acme", &[], &["python3", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("holding") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap() == 0 {
            break;
        }
        printed.push_str(&line);
    }
    assert!(printed.contains("held True"), "{printed}");
    assert!(
        printed.contains("fifth b''") || printed.contains("fifth b'reset'"),
        "{printed}"
    );
    assert_eq!(api.requests().len(), 4, "the fifth connection was relayed");
    let status = d.status();
    assert_eq!(
        status["tenants"]["acme"]["open_connections"], 4,
        "{status:#}"
    );
    assert_eq!(
        status["tenants"]["strict"]["open_connections"], 0,
        "{status:#}"
    );

    // Another tenant is not held back by acme's connections.
    let out = d.exec(
        "strict",
        &[],
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: tls.test",
            &format!("http://127.0.0.2:{}/other", api.port()),
        ],
    );
    assert_eq!(stdout(&out), "200", "{}", text(&out));

    std::io::Write::write_all(holder.stdin.as_mut().unwrap(), b"\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    assert!(holder.wait().unwrap().success(), "{printed}{rest}");
    assert!(rest.contains("again b'HTTP/1.1 200 OK'"), "{printed}{rest}");

    let refused = d.wait_for_log("acme", |e| e["rule"] == "limit:connections");
    assert_eq!(refused["decision"], "block");
    assert_eq!(refused["dst"], format!("127.0.0.2:{}", api.port()));

    // Every connection is given back once it ends.
    let open = || d.status()["tenants"]["acme"]["open_connections"].as_u64();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open() != Some(0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(open(), Some(0));
}

/// A WebSocket handshake is judged and injected like any request; once the upstream
/// switches, bytes cross both ways and the request is logged when the tunnel ends.
/// Other upgrades (h2c) and CONNECT tunnels are not passed on: the relay could not
/// judge what follows.
#[test]
fn a_websocket_is_judged_injected_then_relayed_both_ways() {
    if !privileged("a_websocket_is_judged_injected_then_relayed_both_ways") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let d = daemon();
    let handshake = |host: &str, connection: &str, upgrade: &str| {
        format!(
            "GET /ws HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: {connection}\\r\\nUpgrade: {upgrade}\\r\\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n"
        )
    };
    let script = format!(
        "import socket\n\
         def open_ws(head):\n  s=socket.create_connection(('127.0.0.2',{port}),timeout=5)\n  s.sendall(head)\n  \
         r=b''\n  while b'\\r\\n\\r\\n' not in r:\n    c=s.recv(1000)\n    if not c: break\n    r+=c\n  \
         return s, r.split(b'\\r\\n')[0].decode(), r.lower()\n\
         s,status,head=open_ws(b'{allowed}')\nprint('allowed', status)\n\
         print('switched', b'connection: upgrade' in head)\n\
         s.sendall(b'ping')\nprint('got', s.recv(100))\ns.sendall(b'pong!')\nprint('got', s.recv(100))\n\
         s.sendall(b'bye')\nprint('got', s.recv(100))\nprint('eof', s.recv(100))\ns.close()\n\
         s,status,_=open_ws(b'{blocked}')\nprint('blocked', status)\n\
         s,status,_=open_ws(b'{h2c}')\nprint('h2c', status)\n\
         s,status,_=open_ws(b'CONNECT api.test:{port} HTTP/1.1\\r\\nHost: api.test:{port}\\r\\n\\r\\n')\n\
         print('connect', status)\n\
         s,status,_=open_ws(b'GET /?switch HTTP/1.1\\r\\nHost: api.test\\r\\n\\r\\n')\nprint('unasked', status)\n",
        port = api.port(),
        // `close` beside `upgrade`: still a WebSocket, never a last response.
        allowed = handshake("api.test", "Upgrade, close", "websocket"),
        blocked = handshake("blocked.test", "Upgrade", "websocket"),
        h2c = handshake("api.test", "Upgrade", "h2c"),
    );
    let out = d.python("acme", &script);
    let printed = stdout(&out);
    for line in [
        "allowed HTTP/1.1 101 Switching Protocols",
        "switched True",
        "got b'echo:ping'",
        "got b'echo:pong!'",
        // The upstream closes first: the client sees the end.
        "got b'echo:bye'",
        "eof b''",
        "blocked HTTP/1.1 403",
        "h2c HTTP/1.1 200",
        "connect HTTP/1.1 405",
        "unasked HTTP/1.1 502",
    ] {
        assert!(printed.contains(line), "{line}: {}", text(&out));
    }
    // `?switch` answers before it is recorded.
    let requests = api.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    let ws = &requests[0];
    assert_eq!(ws.header("upgrade"), Some("websocket"));
    assert_eq!(
        ws.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    let claims = jwt_claims(ws.header("authorization").unwrap(), JWT_KEY);
    assert_eq!(claims["sub"], "acme");
    // The h2c request went on as a plain request, without its upgrade.
    assert_eq!(requests[1].header("upgrade"), None);
    d.wait_for_log("acme", |e| {
        e["rule"] == "connect" && e["decision"] == "block"
    });
    let entry = d.wait_for_log("acme", |e| e["status"] == 101);
    assert_eq!(entry["decision"], "allow");
    assert_eq!(entry["host"], "api.test");
    assert_eq!(entry["bytes_sent"], 12);
    assert_eq!(entry["bytes_received"], 27);

    // A WebSocket still open when the daemon is told to stop is cut a moment
    // later, and logged with what crossed it.
    let script = format!(
        "import socket,sys,time\ns=socket.create_connection(('127.0.0.2',{port}),timeout=30)\n\
         s.sendall(b'{allowed}')\nprint(s.recv(1000).split(b'\\r\\n')[0])\ns.sendall(b'held')\n\
         print(s.recv(100))\nsys.stdout.flush()\ntime.sleep(30)\n",
        port = api.port(),
        allowed = handshake("api.test", "Upgrade", "websocket"),
    );
    let mut held = d
        .exec_command("acme", &[], &["python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    }
    assert!(line.contains("echo:held"), "{line}");
    let stopping = std::time::Instant::now();
    let mut d = d;
    assert!(d.stop_with(libc::SIGTERM).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );
    let _ = held.kill();
    let _ = held.wait();
    let cut = d.logs("acme");
    assert!(
        cut.iter().any(|e| e["status"] == 101
            && e["bytes_sent"] == 4
            && e["bytes_received"] == 9
            && e["error"] == "cut: the daemon is stopping"),
        "{cut:#?}"
    );
}

/// A response that ends its connection (HTTP/1.1 `Connection: close`, or HTTP/1.0
/// without keep-alive) goes out corked with the FIN: it must still arrive whole,
/// say `Connection: close`, and end at once; a kept-alive HTTP/1.0 connection
/// must stay open.
#[test]
fn a_connections_last_response_arrives_whole_and_ends_it() {
    if !privileged("a_connections_last_response_arrives_whole_and_ends_it") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let d = daemon();
    let script = format!(
        "import socket, time\n\
         def fetch(request, s=None):\n\
         \x20 s = s or socket.create_connection(('127.0.0.2',{port}),timeout=5)\n\
         \x20 start=time.monotonic(); s.sendall(request); data=b''\n\
         \x20 while True:\n\
         \x20   chunk=s.recv(65536)\n\
         \x20   if not chunk: break\n\
         \x20   data+=chunk\n\
         \x20 return data, time.monotonic()-start\n\
         head=b'Host: api.test:{port}\\r\\n'\n\
         data,_=fetch(b'GET /last?size=60000 HTTP/1.1\\r\\n'+head+b'Connection: close\\r\\n\\r\\n')\n\
         print('close', data.split(b' ')[1].decode(), b'connection: close' in data.lower(), data.endswith(b'x'*60000))\n\
         data,_=fetch(b'GET / HTTP/1.1\\r\\nHost: blocked.test\\r\\nConnection: close\\r\\n\\r\\n')\n\
         print('blocked', data.split(b' ')[1].decode(), data.endswith(b'}}'))\n\
         data,_=fetch(b'POST /post HTTP/1.1\\r\\n'+head+b'Content-Length: 5\\r\\nConnection: close\\r\\n\\r\\nhello')\n\
         print('post', data.split(b' ')[1].decode(), data.endswith(b'/post'))\n\
         data,_=fetch(b'GET /ten HTTP/1.0\\r\\n'+head+b'\\r\\n')\n\
         print('ten', data.split(b' ')[1].decode(), data.endswith(b'/ten'))\n\
         times=sorted(fetch(b'GET /t HTTP/1.1\\r\\n'+head+b'Connection: close\\r\\n\\r\\n')[1] for _ in range(9))\n\
         print('median_ms', round(times[4]*1000))\n\
         s=socket.create_connection(('127.0.0.2',{port}),timeout=5)\n\
         for path in (b'/ka1', b'/ka2'):\n\
         \x20 s.sendall(b'GET '+path+b' HTTP/1.0\\r\\n'+head+b'Connection: keep-alive\\r\\n\\r\\n')\n\
         \x20 data=b''\n\
         \x20 while not data.endswith(path): data+=s.recv(65536)\n\
         \x20 print('kept', path.decode(), data.split(b' ')[1].decode())\n",
        port = api.port()
    );
    let out = d.python("acme", &script);
    let printed = stdout(&out);
    for line in [
        "close 200 True True",
        "blocked 403 True",
        "post 200 True",
        "ten 200 True",
        "kept /ka1 200",
        "kept /ka2 200",
    ] {
        assert!(printed.contains(line), "{line}: {}", text(&out));
    }
    // A response held corked until the kernel's 200 ms ceiling would show here.
    let median_ms: u64 = printed
        .lines()
        .find_map(|l| l.strip_prefix("median_ms "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(median_ms < 150, "{median_ms} ms: {}", text(&out));
    assert_eq!(api.requests().len(), 1 + 1 + 9 + 1 + 2);
}

#[test]
fn tls_is_judged_by_sni_and_relayed_untouched() {
    if !privileged("tls_is_judged_by_sni_and_relayed_untouched") {
        return;
    }
    let (tls, pem) = Upstream::start_tls("127.0.0.2:0", &["tls.test", "blocked.test"]);
    let port = tls.port();
    let d = daemon();
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let ca = ca.display().to_string();

    let (code, body, status) = curl(
        &d,
        &[],
        &[
            "--cacert",
            &ca,
            "--resolve",
            &format!("tls.test:{port}:127.0.0.2"),
            &format!("https://tls.test:{port}/secure"),
        ],
    );
    assert_eq!((code, status.as_str()), (0, "200"), "{body}");
    assert_eq!(tls.requests()[0].uri, "/secure");
    // Bytes relayed untouched: no injection happens inside TLS.
    assert!(tls.requests()[0].header("authorization").is_none());

    let before = tls.connections();
    let (code, _, _) = curl(
        &d,
        &[],
        &[
            "--cacert",
            &ca,
            "--resolve",
            &format!("blocked.test:{port}:127.0.0.2"),
            &format!("https://blocked.test:{port}/"),
        ],
    );
    assert_ne!(code, 0, "a blocked SNI got through");
    assert_eq!(tls.connections(), before, "a blocked SNI reached upstream");

    let entry = d.wait_for_log("acme", |e| e["proto"] == "tls" && e["host"] == "tls.test");
    assert_eq!(entry["decision"], "allow");
    assert!(entry["bytes_sent"].as_u64().unwrap() > 0);
    let entry = d.wait_for_log("acme", |e| {
        e["proto"] == "tls" && e["host"] == "blocked.test"
    });
    assert_eq!(entry["decision"], "block");

    // A ClientHello without SNI: under `default = "block"` the connection is closed,
    // even to an address in `allow_cidrs`; under `default = "allow"` the address is
    // judged (and 127.0.0.2 is allowed).
    let no_sni = format!(
        "import socket, ssl\nctx=ssl.create_default_context()\nctx.check_hostname=False\n\
         ctx.verify_mode=ssl.CERT_NONE\ns=socket.create_connection(('127.0.0.2',{port}),timeout=5)\n\
         try:\n  ctx.wrap_socket(s, server_hostname=None)\n  print('handshake')\n\
         except (ssl.SSLError, OSError) as e:\n  print('closed', e)\n"
    );
    let before = tls.connections();
    let out = d.python("strict", &no_sni);
    assert!(stdout(&out).starts_with("closed"), "{}", text(&out));
    assert_eq!(
        tls.connections(),
        before,
        "no SNI reached upstream under block"
    );
    let entry = d.wait_for_log("strict", |e| e["proto"] == "tls");
    assert_eq!(entry["decision"], "block");
    assert_eq!(entry["rule"], "default:block");
    assert_eq!(entry["host"], Value::Null);
    let out = d.python("acme", &no_sni);
    assert!(stdout(&out).starts_with("handshake"), "{}", text(&out));
    // With SNI, the strict tenant's allow rule lets it through.
    let with_sni = no_sni.replace("server_hostname=None", "server_hostname='tls.test'");
    let out = d.python("strict", &with_sni);
    assert!(stdout(&out).starts_with("handshake"), "{}", text(&out));

    // A ClientHello split across two records (valid TLS) is judged by its SNI
    // all the same: the split must not hide a blocked name.
    let split = format!(
        r"import socket, ssl, time
def split_hello(host, pause=0):
    ctx=ssl.create_default_context(cafile='{ca}')
    inc,out=ssl.MemoryBIO(),ssl.MemoryBIO()
    tls=ctx.wrap_bio(inc,out,server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello=out.read()
    head,body=hello[:3],hello[5:]
    record=lambda part: head+len(part).to_bytes(2,'big')+part
    s=socket.create_connection(('127.0.0.2',{port}),timeout=5)
    s.sendall(record(body[:10]))
    time.sleep(pause)
    s.sendall(record(body[10:]))
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(out.read())
                data=s.recv(65536)
                if not data:
                    return 'closed'
                inc.write(data)
        tls.write(b'GET /split HTTP/1.1\r\nHost: '+host.encode()+b'\r\nConnection: close\r\n\r\n')
        s.sendall(out.read())
        answer=b''
        while not answer:
            data=s.recv(65536)
            if not data:
                break
            inc.write(data)
            try:
                answer+=tls.read(65536)
            except ssl.SSLWantReadError:
                pass
        return answer.split(b'\r\n')[0]
    except (ConnectionResetError, ssl.SSLError) as e:
        return 'closed'
print('allowed', split_hello('tls.test'))
print('blocked', split_hello('blocked.test'))
print('paused', split_hello('blocked.test', 1.5))
",
    );
    let before = tls.connections();
    let out = d.python("acme", &split);
    let printed = stdout(&out);
    assert!(
        printed.contains("allowed b'HTTP/1.1 200 OK'"),
        "{}",
        text(&out)
    );
    assert!(printed.contains("blocked closed"), "{}", text(&out));
    // Nor does a pause between the pieces, past the 1 s a silent client gets.
    assert!(printed.contains("paused closed"), "{}", text(&out));
    assert_eq!(
        tls.connections(),
        before + 1,
        "a split blocked SNI reached upstream"
    );
    assert!(tls.requests().iter().any(|r| r.uri == "/split"));
    let blocked = d
        .logs("acme")
        .into_iter()
        .filter(|e| e["proto"] == "tls" && e["host"] == "blocked.test")
        .count();
    assert_eq!(blocked, 3, "{:#?}", d.logs("acme"));

    // A ClientHello cut short (the client stops sending half way) could hide any
    // name: refused, even under `default = "allow"`, never relayed as opaque bytes.
    let before = tls.connections();
    let cut = format!(
        r"import socket
s=socket.create_connection(('127.0.0.2',{port}),timeout=5)
s.sendall(bytes([0x16,3,1,0,0x50,1,0,0,0x4c])+bytes(10))
s.shutdown(socket.SHUT_WR)
try:
    print('got', s.recv(100))
except ConnectionResetError:
    print('got reset')
",
    );
    let out = d.python("acme", &cut);
    assert!(
        stdout(&out).contains("got b''") || stdout(&out).contains("got reset"),
        "{}",
        text(&out)
    );
    assert_eq!(
        tls.connections(),
        before,
        "a cut ClientHello reached upstream"
    );
    let entry = d.wait_for_log("acme", |e| e["rule"] == "tls:unreadable");
    assert_eq!(entry["decision"], "block");
    assert_eq!(entry["proto"], "tls");
}

#[test]
fn opaque_tcp_is_relayed_and_udp_other_than_dns_never_leaves() {
    if !privileged("opaque_tcp_is_relayed_and_udp_other_than_dns_never_leaves") {
        return;
    }
    let echo = EchoServer::start("127.0.0.2:0");
    let sink = UdpSink::start("127.0.0.2:0");
    let d = daemon();
    let script = format!(
        "import socket\ns=socket.create_connection(('127.0.0.2',{}),timeout=5)\n\
         s.sendall(b'\\x00\\x01ping')\nprint('echo', s.recv(100))\nprint('peer', s.getpeername())\n\
         u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         try:\n  u.sendto(b'quic',('127.0.0.2',{udp}))\n  print('udp sent')\nexcept OSError as e:\n  print('udp refused', e.errno)\n\
         try:\n  u.connect(('127.0.0.2',{udp}))\n  u.send(b'quic')\n  print('udp sent')\nexcept OSError as e:\n  print('udp refused', e.errno)\n\
         v=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
         try:\n  v.sendto(b'quic',('::ffff:127.0.0.2',{udp}))\n  print('udp sent')\nexcept OSError as e:\n  print('udp refused', e.errno)\n",
        echo.addr.port(),
        udp = sink.addr.port()
    );
    let out = d.python("acme", &script);
    let printed = stdout(&out);
    assert!(printed.contains("echo b'\\x00\\x01ping'"), "{}", text(&out));
    assert!(
        printed.contains(&format!("peer ('127.0.0.2', {})", echo.addr.port())),
        "{}",
        text(&out)
    );
    assert!(!printed.contains("udp sent"), "{}", text(&out));
    assert_eq!(printed.matches("udp refused").count(), 3, "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sink.received.lock().unwrap().is_empty(),
        "a UDP datagram got out"
    );
    let entry = d.wait_for_log("acme", |e| e["proto"] == "tcp" && e["decision"] == "allow");
    assert_eq!(entry["dst"], echo.addr.to_string());
    assert_eq!(entry["bytes_sent"], 6);
    assert!(entry["error"].is_null(), "{entry}");
}

/// A DNS query for `name` (type A) sent from the sandbox to 127.0.0.53:53;
/// prints the reply's rcode, answer count and source address.
fn dns_script(name: &str) -> String {
    format!(
        "import socket,struct\nq=struct.pack('>HHHHHH',0x1234,0x0100,1,0,0,0)\n\
         q+=b''.join(bytes([len(p)])+p.encode() for p in '{name}'.split('.'))+b'\\x00'+struct.pack('>HH',1,1)\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(5)\ns.sendto(q,('127.0.0.53',53))\n\
         r,src=s.recvfrom(512)\nprint('id', hex(struct.unpack('>H',r[:2])[0]))\n\
         print('rcode', r[3]&15)\nprint('answers', struct.unpack('>H',r[6:8])[0])\nprint('src', src)\n\
         print('addr', '.'.join(str(b) for b in r[-4:]))\n"
    )
}

#[test]
fn dns_answers_from_the_policy_and_logs_every_query() {
    if !privileged("dns_answers_from_the_policy_and_logs_every_query") {
        return;
    }
    let d = daemon();
    let out = d.python("acme", &dns_script("blocked.test"));
    let kv = key_values(&stdout(&out).replace(' ', "="));
    assert_eq!(
        kv.get("rcode").map(String::as_str),
        Some("3"),
        "{}",
        text(&out)
    );
    assert_eq!(kv.get("id").map(String::as_str), Some("0x1234"));
    assert_eq!(
        kv.get("src").map(String::as_str),
        Some("('127.0.0.53',=53)"),
        "{}",
        text(&out)
    );

    let out = d.python("acme", &dns_script("api.test"));
    let kv = key_values(&stdout(&out).replace(' ', "="));
    assert_eq!(
        kv.get("rcode").map(String::as_str),
        Some("0"),
        "{}",
        text(&out)
    );
    assert_eq!(kv.get("answers").map(String::as_str), Some("1"));
    assert_eq!(kv.get("addr").map(String::as_str), Some("127.0.0.2"));

    // From an IPv6 socket to an IPv4-mapped resolver address, the reply too
    // seems to come from the resolver asked (resolvers check).
    let mapped = dns_script("api.test")
        .replace("socket.AF_INET,", "socket.AF_INET6,")
        .replace("('127.0.0.53',53)", "('::ffff:127.0.0.53',53)");
    let out = d.python("acme", &mapped);
    assert!(
        stdout(&out).contains("src ('::ffff:127.0.0.53', 53, 0, 0)"),
        "{}",
        text(&out)
    );

    let entry = d.wait_for_log("acme", |e| {
        e["proto"] == "dns" && e["host"] == "blocked.test"
    });
    assert_eq!(entry["decision"], "block");
    assert_eq!(entry["dst"], "127.0.0.53:53");
    let entry = d.wait_for_log("acme", |e| e["proto"] == "dns" && e["host"] == "api.test");
    assert_eq!(entry["decision"], "allow");

    // DNS over TCP is answered and logged as DNS, two queries on one connection;
    // anything else sent to port 53 over TCP gets nothing.
    let tcp = "import socket,struct\n\
        def q(name):\n\
        \x20 m=struct.pack('>HHHHHH',0x4321,0x0100,1,0,0,0)+b''.join(bytes([len(p)])+p.encode() for p in name.split('.'))+b'\\x00'+struct.pack('>HH',1,1)\n\
        \x20 return struct.pack('>H',len(m))+m\n\
        def reply(s):\n\
        \x20 n=struct.unpack('>H',s.recv(2))[0]; r=b''\n\
        \x20 while len(r)<n: r+=s.recv(n-len(r))\n\
        \x20 return r\n\
        s=socket.create_connection(('127.0.0.53',53),timeout=5)\n\
        s.sendall(q('x.evil.test')); r=reply(s); print('blocked_rcode', r[3]&15)\n\
        s.sendall(q('api.test')); r=reply(s); print('allowed_rcode', r[3]&15, 'addr', '.'.join(str(b) for b in r[-4:]))\n\
        t=socket.create_connection(('127.0.0.53',53),timeout=5)\n\
        t.sendall(b'\\x00\\x05hello'); print('garbage', t.recv(100))\n";
    let out = d.python("acme", tcp);
    let printed = stdout(&out);
    for line in [
        "blocked_rcode 3",
        "allowed_rcode 0 addr 127.0.0.2",
        "garbage b''",
    ] {
        assert!(printed.contains(line), "{line}: {}", text(&out));
    }
    let entry = d.wait_for_log("acme", |e| {
        e["proto"] == "dns" && e["host"] == "x.evil.test"
    });
    assert_eq!(entry["decision"], "block");
    assert_eq!(entry["dst"], "127.0.0.53:53");
}

#[test]
fn dialling_the_relay_itself_is_still_judged_and_outsiders_get_nothing() {
    if !privileged("dialling_the_relay_itself_is_still_judged_and_outsiders_get_nothing") {
        return;
    }
    let d = daemon();
    let relay = d.relay_port;
    let out = d.python(
        "acme",
        &format!(
            "import http.client\nc=http.client.HTTPConnection('127.0.0.1',{relay},timeout=5)\n\
             c.request('GET','/',headers={{'Host':'blocked.test'}})\nprint('status', c.getresponse().status)\n"
        ),
    );
    assert!(stdout(&out).contains("status 403"), "{}", text(&out));
    // Opaque bytes to the relay port: judged by address (loopback), refused.
    let out = d.python(
        "acme",
        &format!(
            "import socket\ns=socket.create_connection(('127.0.0.1',{relay}),timeout=5)\ns.sendall(b'\\x00hi')\n\
             print('got', s.recv(10))\n"
        ),
    );
    assert!(stdout(&out).contains("got b''"), "{}", text(&out));

    // A process outside every sandbox that dials the relay gets nothing served.
    use std::io::{Read, Write};
    let mut s = connect_direct(format!("127.0.0.1:{relay}").parse().unwrap()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "the relay served a connection that was not redirected"
    );
}

#[test]
fn the_sandbox_cannot_leave_its_cgroup_gain_privileges_or_reach_the_admin_socket() {
    if !privileged("the_sandbox_cannot_leave_its_cgroup_gain_privileges_or_reach_the_admin_socket")
    {
        return;
    }
    let d = daemon();
    let mount = cgroup2_mount();
    let script = format!(
        "import os,socket\nprint('uid', os.getuid())\n\
         print('nnp', [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0])\n\
         for target in ['{root}/cgroup.procs', '{parent}/cgroup.procs', '{tenant}/cgroup.procs']:\n\
         \x20 try:\n    open(target,'w').write(str(os.getpid()))\n    print('moved', target)\n\
         \x20 except OSError as e:\n    print('refused', e.errno)\n\
         print('cgroup', open('/proc/self/cgroup').read().strip())\n\
         try:\n  s=socket.socket(socket.AF_UNIX)\n  s.connect('{admin}')\n  print('admin reached')\n\
         except OSError as e:\n  print('admin refused', e.errno)\n\
         try:\n  socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n  print('raw socket')\n\
         except OSError as e:\n  print('raw refused', e.errno)\n\
         for fam, host in [(socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')]:\n\
         \x20 s = socket.socket(fam)\n  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         \x20 try:\n    s.bind((host, {relay_port}))\n    s.listen()\n    print('joined the relay port', host)\n\
         \x20 except OSError as e:\n    print('relay port refused', e.errno)\n",
        relay_port = d.relay_port,
        root = mount.display(),
        parent = d.cgroup.display(),
        tenant = d.cgroup.join("acme").display(),
        admin = d.admin_socket.display(),
    );
    let out = d.python("acme", &script);
    let printed = stdout(&out);
    assert!(printed.contains("uid 65534"), "{}", text(&out));
    assert!(printed.contains("nnp 1"), "{}", text(&out));
    assert!(!printed.contains("moved"), "{}", text(&out));
    let refused = printed
        .lines()
        .filter(|l| l.starts_with("refused 13"))
        .count();
    assert_eq!(refused, 3, "{}", text(&out));
    assert!(printed.contains("admin refused"), "{}", text(&out));
    assert!(printed.contains("raw refused"), "{}", text(&out));
    // The relay's per-thread listeners share its port through SO_REUSEPORT; a
    // sandboxed listener joining that group would be handed other sandboxes'
    // connections. The bind hooks refuse the relay's port to every sandbox.
    assert!(!printed.contains("joined"), "{}", text(&out));
    assert_eq!(
        printed.matches("relay port refused 1").count(),
        2,
        "{}",
        text(&out)
    );
    let cgroup_name = d.cgroup.file_name().unwrap().to_str().unwrap();
    assert!(
        printed.contains(&format!("/{cgroup_name}/acme/exec-")),
        "{}",
        text(&out)
    );

    // The caller's environment reaches the command, but not a variable the
    // daemon's injections read: the secret stays out even when the operator's
    // shell holds it.
    let out = d
        .exec_command(
            "acme",
            &[],
            &[
                "sh",
                "-c",
                "echo token=$INTERCEPTOR_TEST_TOKEN plain=$INTERCEPTOR_TEST_PLAIN",
            ],
        )
        .env("INTERCEPTOR_TEST_TOKEN", "s3cret")
        .env("INTERCEPTOR_TEST_PLAIN", "kept")
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "token= plain=kept", "{}", text(&out));
}

/// Sandboxes share `sandbox_user` with each other and, often, with host
/// processes. Same-uid processes could ptrace each other, write each other's
/// memory through /proc, or take each other's sockets (pidfd_getfd): out of the
/// cgroup, or into another tenant's connections. Each sandbox is its own
/// Landlock domain, so none of that reaches past it.
#[test]
fn a_sandbox_cannot_reach_into_other_processes_of_the_sandbox_user() {
    if !privileged("a_sandbox_cannot_reach_into_other_processes_of_the_sandbox_user") {
        return;
    }
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let d = daemon();
    // A host process of the sandbox user, outside every sandbox.
    let mut outside = std::process::Command::new("sleep")
        .arg("30")
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    // A process in another tenant's sandbox; it says its pid.
    let mut other = d
        .exec_command(
            "strict",
            &[],
            &[
                "python3",
                "-c",
                "import os,time;print(os.getpid(),flush=True);time.sleep(30)",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(other.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let other_pid: u32 = line.trim().parse().expect("the other sandbox's pid");

    let script = format!(
        r"import ctypes,os,time
libc=ctypes.CDLL(None,use_errno=True)
def err(r):
    return 'ok' if r>=0 else os.strerror(ctypes.get_errno())
def probe(name,pid):
    print(name,'ptrace',err(libc.ptrace(16,pid,0,0)))
    try:
        open('/proc/%d/mem'%pid,'r+b');print(name,'mem ok')
    except OSError as e:
        print(name,'mem',e.strerror)
    try:
        fd=os.pidfd_open(pid);print(name,'getfd',err(libc.syscall(438,fd,0,0)))
    except OSError as e:
        print(name,'getfd',e.strerror)
    try:
        os.kill(pid,0);print(name,'signal ok')
    except OSError as e:
        print(name,'signal',e.strerror)
print('abi', libc.syscall(444,None,0,1))
probe('outside',{outside})
probe('other',{other})
child=os.fork()
if child==0:
    time.sleep(5);os._exit(0)
probe('own',child)
os.kill(child,9)
",
        outside = outside.id(),
        other = other_pid,
    );
    let out = d.python("acme", &script);
    let _ = outside.kill();
    let _ = other.kill();
    let _ = outside.wait();
    let _ = other.wait();
    let printed = stdout(&out);
    // Signals are kept in from Landlock ABI 6 (Linux 6.12) on.
    let abi: i64 = printed
        .lines()
        .find_map(|l| l.strip_prefix("abi "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let kept_in: &[&str] = if abi >= 6 {
        &["ptrace", "mem", "getfd", "signal"]
    } else {
        &["ptrace", "mem", "getfd"]
    };
    for who in ["outside", "other"] {
        for what in kept_in {
            let line = printed
                .lines()
                .find(|l| l.starts_with(&format!("{who} {what} ")))
                .unwrap_or_else(|| panic!("no {who} {what}: {}", text(&out)));
            assert!(!line.ends_with(" ok"), "{line}\n{}", text(&out));
        }
    }
    // Within its own sandbox, a process keeps what the user normally has.
    for what in ["ptrace", "mem", "getfd", "signal"] {
        assert!(
            printed.contains(&format!("own {what} ok")),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn sandboxed_connections_fail_while_the_daemon_is_dead_and_a_restart_takes_over() {
    if !privileged("sandboxed_connections_fail_while_the_daemon_is_dead_and_a_restart_takes_over") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let mut d = daemon();

    // A second daemon on the same subtree would swap in programs that redirect
    // this one's sandboxes to its own relay: it is refused.
    let second = d.dir.path().join("second.toml");
    let config = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace(
            &format!(":{}\"", d.relay_port),
            &format!(":{}\"", free_port()),
        )
        .replace(
            &format!(":{}\"", d.dns_port),
            &format!(":{}\"", free_port()),
        )
        .replace("run/admin.sock", "second/admin.sock")
        .replace("/logs\"", "/second-logs\"");
    std::fs::write(&second, config).unwrap();
    let out = std::process::Command::new(interceptor_bin())
        .args(["run", "--config"])
        .arg(&second)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another interceptor daemon serves"),
        "{}",
        text(&out)
    );

    let go = d.dir.path().join("go");
    // While the daemon is dead the sandbox can neither get out nor take the
    // relay's or the DNS listener's port (which would keep the daemon from
    // coming back, and collect what the hooks send there).
    let script = format!(
        "import os,socket,struct,time\nwhile not os.path.exists('{go}'): time.sleep(0.02)\n\
         try:\n  socket.create_connection(('127.0.0.2',{port}),timeout=3)\n  print('connected')\n\
         except OSError as e:\n  print('failed', e)\n\
         for kind, p in [(socket.SOCK_STREAM, {relay}), (socket.SOCK_DGRAM, {dns})]:\n\
         \x20 try:\n    socket.socket(socket.AF_INET, kind).bind(('127.0.0.1', p))\n    print('bound', p)\n\
         \x20 except OSError as e:\n    print('bind refused', e.errno)\n\
         s=socket.socket()\n\
         try:\n  s.setsockopt(socket.IPPROTO_IP, 51, struct.pack('=I', ({relay} << 16) | {relay}))\n\
         except OSError:\n  print('no port range')\n\
         try:\n  s.bind(('127.0.0.1', 0))\n  print('picked', s.getsockname()[1])\n\
         except OSError as e:\n  print('pick refused', e.errno)\n",
        go = go.display(),
        relay = d.relay_port,
        dns = d.dns_port,
    );
    let waiting = d
        .exec_command("acme", &[], &["python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.stop_with(libc::SIGKILL);
    std::fs::write(&go, "").unwrap();
    let out = waiting.wait_with_output().unwrap();
    assert!(stdout(&out).contains("failed"), "{}", text(&out));
    assert!(!stdout(&out).contains("bound"), "{}", text(&out));
    assert_eq!(
        stdout(&out).matches("bind refused 1").count(),
        2,
        "{}",
        text(&out)
    );
    // Nor can it have the kernel pick that port for it (IP_LOCAL_PORT_RANGE
    // narrowed to the relay's port, then bind to port 0; Linux 6.3+).
    if !stdout(&out).contains("no port range") {
        assert!(stdout(&out).contains("pick refused 1"), "{}", text(&out));
    }
    assert_eq!(
        api.connections(),
        0,
        "a connection went out while the daemon was dead"
    );

    d.spawn();
    let (_, body, status) = curl(
        &d,
        &[],
        &[
            "--resolve",
            &format!("api.test:{port}:127.0.0.2"),
            &format!("http://api.test:{port}/again"),
        ],
    );
    assert_eq!(status, "200", "{body}");
    // The restarted daemon replaced its predecessor's programs instead of stacking.
    let status = d.status();
    let connect4 = status["attached"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .unwrap_or("")
                .starts_with("icpt_connect4")
        })
        .count();
    assert_eq!(connect4, 1, "{status:#}");
    assert!(status["tenants"]["acme"]["allowed"].as_u64().unwrap() >= 1);
}

#[test]
fn https_sent_in_the_clear_is_judged_injected_and_originated_with_verification() {
    if !privileged("https_sent_in_the_clear_is_judged_injected_and_originated_with_verification") {
        return;
    }
    let (tls, pem) = Upstream::start_tls("127.0.0.2:0", &["api.test"]);
    let port = tls.port();
    let d = Daemon::start_configured(
        "upstream_ca = [\"{dir}/ca.pem\"]",
        CONFIG,
        &[("jwt.key", JWT_KEY), ("ca.pem", &pem)],
    );
    // An absolute-form https:// request over plain TCP, as the Worker runtime sends it.
    let request = |host: &str| {
        format!(
            "import socket\ns=socket.create_connection(('127.0.0.2',{port}),timeout=5)\n\
             s.sendall(b'GET https://{host}:{port}/tls-path HTTP/1.1\\r\\nHost: {host}:{port}\\r\\nConnection: close\\r\\n\\r\\n')\n\
             data=b''\nwhile True:\n  chunk=s.recv(4096)\n  if not chunk: break\n  data+=chunk\n\
             print(data.decode(errors='replace'))\n"
        )
    };
    let out = d.python("acme", &request("api.test"));
    assert!(stdout(&out).starts_with("HTTP/1.1 200"), "{}", text(&out));
    let seen = tls.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/tls-path");
    claims_of(
        seen[0]
            .header("authorization")
            .expect("JWT injected into HTTPS"),
    );
    let entry = d.wait_for_log("acme", |e| {
        e["url"] == format!("https://api.test:{port}/tls-path")
    });
    assert_eq!(entry["decision"], "allow");
    assert_eq!(entry["status"], 200);

    // The certificate is verified: a name it does not cover fails, nothing is sent.
    let out = d.python("acme", &request("127.0.0.2"));
    assert!(stdout(&out).starts_with("HTTP/1.1 502"), "{}", text(&out));
    assert_eq!(tls.requests().len(), 1);
    let failed = d.wait_for_log("acme", |e| e["decision"] == "error");
    assert_eq!(failed["rule"], "upstream");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("certificate"),
        "{failed}"
    );
}

#[test]
fn a_forged_request_context_is_refused() {
    if !privileged("a_forged_request_context_is_refused") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let d = daemon();
    let (_, body, status) = curl(
        &d,
        &[],
        &[
            "--resolve",
            &format!("api.test:{}:127.0.0.2", api.port()),
            "-H",
            "x-interceptor-context: eyJhbGciOiJIUzI1NiJ9.eyJ3b3JrZXIiOiJldmlsIn0.c2ln",
            &format!("http://api.test:{}/", api.port()),
        ],
    );
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("context:"), "{body}");
    assert!(api.requests().is_empty());
}

#[test]
fn a_missing_parameter_stops_the_request_instead_of_sending_half_a_credential() {
    if !privileged("a_missing_parameter_stops_the_request_instead_of_sending_half_a_credential") {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let d = daemon();
    let resolve = format!("team.test:{port}:127.0.0.2");
    let url = format!("http://team.test:{port}/team");

    let (_, body, status) = curl(&d, &[], &["--resolve", &resolve, &url]);
    assert_eq!(status, "502", "{body}");
    assert!(body.contains("team"), "{body}");
    assert!(
        api.requests().is_empty(),
        "a request without its credential went out"
    );
    let entry = d.wait_for_log("acme", |e| e["host"] == "team.test");
    assert_eq!(entry["decision"], "error");
    assert!(
        entry["rule"].as_str().unwrap().starts_with("inject:"),
        "{entry}"
    );
    assert!(
        entry["error"].as_str().unwrap_or("").contains("team"),
        "{entry}"
    );

    let (_, body, status) = curl(&d, &[("team", "blue")], &["--resolve", &resolve, &url]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(api.requests()[0].header("x-team"), Some("team-blue"));
}

#[test]
fn every_request_is_logged_before_its_response_completes_and_a_clean_stop_loses_none() {
    if !privileged(
        "every_request_is_logged_before_its_response_completes_and_a_clean_stop_loses_none",
    ) {
        return;
    }
    let up = Upstream::start("127.0.0.2:0");
    let mut d = daemon();
    // Concurrent kept-alive connections; every tenth response is too large to be
    // taken whole and is streamed instead.
    let script = format!(
        r#"
import http.client, threading
errors = []
def run(t):
    c = http.client.HTTPConnection("127.0.0.2", {port})
    for i in range(40):
        size = 200000 if i % 10 == 0 else 0
        c.request("GET", "/burst/%d/%d" % (t, i) + ("?size=%d" % size if size else ""))
        r = c.getresponse()
        body = r.read()
        if r.status != 200 or (size and len(body) != size):
            errors.append((t, i, r.status, len(body)))
threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print("errors", errors)
"#,
        port = up.addr.port()
    );
    let out = d.python("acme", &script);
    assert!(stdout(&out).contains("errors []"), "{}", text(&out));
    let burst = |d: &Daemon| -> Vec<String> {
        d.logs("acme")
            .iter()
            .filter_map(|e| e["url"].as_str())
            .filter(|u| u.contains("/burst/"))
            .map(str::to_string)
            .collect()
    };
    // A response completes only once its line is in the file: all 320 are there
    // the moment the client has its last response, each once.
    let lines = burst(&d);
    assert_eq!(lines.len(), 320, "{lines:?}");
    let distinct: std::collections::BTreeSet<_> = lines.iter().collect();
    assert_eq!(distinct.len(), 320);
    let pid = d.pid();
    let exit = d.stop_with(libc::SIGTERM);
    assert!(exit.success(), "{exit}\n{}", d.daemon_stderr());
    assert_eq!(burst(&d).len(), 320);
    // The CLI's pointer to the running daemon goes with it (another test's daemon
    // may have written its own since).
    let pointer = std::fs::read_to_string("/run/interceptor/daemon.json").unwrap_or_default();
    assert!(!pointer.contains(&format!("\"pid\": {pid}")), "{pointer}");
}
