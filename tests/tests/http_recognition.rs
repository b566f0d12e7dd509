//! End to end: the relay recognises HTTP by its bytes, however they are written
//! or timed, and judges it by its host; what is not valid HTTP is refused, never
//! relayed as opaque bytes judged by the (allowed) address. Request heads are
//! bounded, and one tenant's unfinished heads cannot take the relay's memory.
//!
//! Every trick sends `Host: blocked.test` to 127.0.0.2, an address the tenant
//! may reach as bytes (`allow_cidrs`), from a real sandboxed python; loopback
//! upstreams record what reached them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use interceptor_tests::*;
use serde_json::Value;

const CONFIG: &str = r#"
[resolve]
"api.test" = ["127.0.0.2"]
"blocked.test" = ["127.0.0.2"]

[tenants.acme]
outbound = "egress"

[tenants.other]
outbound = "egress"

[outbound.egress]
default = "allow"
block = ["blocked.test"]
allow_cidrs = ["127.0.0.2/32"]
"#;

/// Python run in the sandbox: `exchange(port, parts)` connects to 127.0.0.2,
/// sends each part (a `float` is a pause in seconds), and returns the first
/// line of what comes back (`closed` when nothing does).
const EXCHANGE: &str = r"
import socket, sys, time
def exchange(port, parts, greeting=False, ip='127.0.0.2'):
    s = socket.create_connection((ip, port), timeout=15)
    got = b''
    if greeting:
        got = s.recv(100)
        print('greeting', got)
    try:
        for part in parts:
            if isinstance(part, float):
                time.sleep(part)
            else:
                s.sendall(part)
        answer = b''
        while b'\n' not in answer:
            data = s.recv(4096)
            if not data:
                break
            answer += data
    except (ConnectionResetError, BrokenPipeError):
        answer = b''
    s.close()
    line = answer.split(b'\r\n')[0].decode(errors='replace')
    return line or 'closed'
";

fn script(body: &str) -> String {
    format!("{EXCHANGE}\n{body}")
}

fn request(line: &str, host: &str) -> String {
    format!("{line}\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n")
}

/// A TCP server that speaks first (`220 ready`, as SMTP does), then echoes
/// and records what it receives.
struct Greeter {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<Mutex<usize>>,
}

impl Greeter {
    fn start() -> Greeter {
        let listener = TcpListener::bind("127.0.0.2:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (sink, count) = (received.clone(), connections.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                *count.lock().unwrap() += 1;
                let sink = sink.clone();
                thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    if stream.write_all(b"220 ready\r\n").is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Greeter {
            addr,
            received,
            connections,
        }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

/// The python list literal of `parts` for `exchange`.
fn parts(parts: &[&str]) -> String {
    let items: Vec<String> = parts
        .iter()
        .map(|p| match p.parse::<f64>() {
            Ok(pause) => format!("{pause:?}"),
            Err(_) => format!("b'{p}'"),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn printed(out: &std::process::Output) -> Vec<(String, String)> {
    stdout(out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn blocked_requests(upstream: &Upstream) -> usize {
    upstream
        .requests()
        .iter()
        .filter(|r| {
            r.header("host")
                .is_some_and(|h| h.starts_with("blocked.test"))
        })
        .count()
}

#[test]
fn a_request_is_judged_by_its_host_however_its_request_line_is_written_or_timed() {
    if !privileged("a_request_is_judged_by_its_host_however_its_request_line_is_written_or_timed") {
        return;
    }
    let upstream = Upstream::start("127.0.0.2:0");
    let port = upstream.port();
    let d = Daemon::start(CONFIG);
    // (name, parts, the status line the client must get)
    let blocked = "HTTP/1.1 403 Forbidden";
    let refused = "HTTP/1.1 400 Bad Request";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "paused",
            parts(&["G", "1.3", &request("ET / HTTP/1.1", "blocked.test")]),
            blocked,
        ),
        (
            "dribbled",
            parts(&[
                "GET",
                "1.1",
                " /",
                "1.1",
                " HTTP/1.1\\r\\nHo",
                "1.1",
                "st: blocked.test\\r\\nConnection: close\\r\\n\\r\\n",
            ]),
            blocked,
        ),
        (
            "lowercase",
            parts(&[&request("get / HTTP/1.1", "blocked.test")]),
            blocked,
        ),
        (
            "unknown",
            parts(&[&request("FOO / HTTP/1.1", "blocked.test")]),
            blocked,
        ),
        (
            "tab",
            parts(&[&request("GET\\t/\\tHTTP/1.1", "blocked.test")]),
            refused,
        ),
        (
            "junk",
            parts(&[&format!(
                "junk\\r\\n{}",
                request("GET / HTTP/1.1", "blocked.test")
            )]),
            refused,
        ),
        (
            "silent",
            parts(&["1.5", &request("GET / HTTP/1.1", "blocked.test")]),
            blocked,
        ),
        // Controls: the same, allowed by host, reach the upstream.
        (
            "allowed",
            parts(&[&request("GET /allowed HTTP/1.1", "api.test")]),
            "HTTP/1.1 200 OK",
        ),
        (
            "allowed-paused",
            parts(&[
                "g",
                "1.3",
                &request("et /allowed-paused HTTP/1.1", "api.test"),
            ]),
            "HTTP/1.1 200 OK",
        ),
        (
            "allowed-silent",
            parts(&["1.5", &request("GET /allowed-silent HTTP/1.1", "api.test")]),
            "HTTP/1.1 200 OK",
        ),
        // Silent, to an address the tenant may not reach as bytes (so no server
        // can speak first): still judged by the request, sent where api.test is.
        (
            "allowed-silent-elsewhere",
            parts(&[
                "1.5",
                &request("GET /allowed-silent-elsewhere HTTP/1.1", "api.test"),
            ]),
            "HTTP/1.1 200 OK",
        ),
    ];
    let body: String = cases
        .iter()
        .map(|(name, parts, _)| {
            let ip = if name.ends_with("elsewhere") {
                ", ip='127.0.0.3'"
            } else {
                ""
            };
            format!("print('{name}', exchange({port}, {parts}{ip}))\n")
        })
        .collect();
    let out = d.python("acme", &script(&body));
    let got = printed(&out);
    assert_eq!(got.len(), cases.len(), "{}", text(&out));
    for ((name, _, want), (printed_name, line)) in cases.iter().zip(&got) {
        assert_eq!(name, printed_name);
        assert_eq!(line, want, "{name}: {}", text(&out));
    }
    assert_eq!(
        blocked_requests(&upstream),
        0,
        "a blocked host reached upstream: {:#?}",
        upstream.requests()
    );
    let uris: Vec<String> = upstream.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        uris,
        [
            "/allowed",
            "/allowed-paused",
            "/allowed-silent",
            "/allowed-silent-elsewhere"
        ],
        "{:#?}",
        upstream.requests()
    );

    // Every one was judged as HTTP: no byte stream was relayed.
    let logs = d.logs("acme");
    assert!(logs.iter().all(|e| e["proto"] == "http"), "{logs:#?}");
    let blocked_entries = logs
        .iter()
        .filter(|e| e["host"] == "blocked.test" && e["decision"] == "block")
        .count();
    assert_eq!(blocked_entries, 5, "{logs:#?}");
    let refused_entries = logs
        .iter()
        .filter(|e| e["rule"] == "bad-request" && e["status"] == 400)
        .count();
    assert_eq!(refused_entries, 2, "{logs:#?}");
}

#[test]
fn a_stream_relayed_as_bytes_cannot_carry_http_or_a_late_client_hello() {
    if !privileged("a_stream_relayed_as_bytes_cannot_carry_http_or_a_late_client_hello") {
        return;
    }
    let greeter = Greeter::start();
    let echo = EchoServer::start("127.0.0.2:0");
    let d = Daemon::start(CONFIG);
    let (g, e) = (greeter.addr.port(), echo.addr.port());
    let hello = "\\x16\\x03\\x01\\x00\\x05\\x01\\x00\\x00\\x01\\x00";
    let body = format!(
        "print('smtp', exchange({g}, [b'EHLO client.test\\r\\n'], greeting=True))\n\
         print('http', exchange({g}, [b'{http}'], greeting=True))\n\
         print('tls', exchange({g}, [b'{hello}'], greeting=True))\n\
         print('redis', exchange({e}, [b'*1\\r\\n$4\\r\\nPING\\r\\n']))\n\
         print('junk', exchange({e}, [b'junk\\r\\n', 1.5, b'{http}']))\n",
        http = request("GET / HTTP/1.1", "blocked.test"),
    );
    let out = d.python("acme", &script(&body));
    let got = printed(&out);
    let line = |name: &str| {
        got.iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| panic!("no {name}: {}", text(&out)))
    };
    // Controls: a server that speaks first, and a client-first text protocol,
    // are relayed as bytes.
    assert_eq!(line("smtp"), "EHLO client.test", "{}", text(&out));
    assert_eq!(line("redis"), "*1", "{}", text(&out));
    // The greeting came, then the client's HTTP or ClientHello ended the stream.
    assert_eq!(line("http"), "closed", "{}", text(&out));
    assert_eq!(line("tls"), "closed", "{}", text(&out));
    // Junk first, a request line once the stream was opaque: cut before it.
    assert_eq!(line("junk"), "junk", "{}", text(&out));
    assert_eq!(greeter.received(), "EHLO client.test\r\n");
    assert_eq!(*greeter.connections.lock().unwrap(), 3);
    thread::sleep(Duration::from_millis(300));
    let echoed: Vec<String> = echo
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(
        echoed.iter().all(|b| !b.contains("blocked.test")),
        "a request line crossed a byte stream: {echoed:?}"
    );

    let logs = d.logs("acme");
    let rule =
        |rule: &str| -> Vec<Value> { logs.iter().filter(|e| e["rule"] == rule).cloned().collect() };
    assert_eq!(rule("tcp:http").len(), 2, "{logs:#?}");
    assert_eq!(rule("tcp:tls").len(), 1, "{logs:#?}");
    for entry in rule("tcp:http").iter().chain(&rule("tcp:tls")) {
        assert_eq!(entry["proto"], "tcp");
        assert_eq!(entry["decision"], "block");
    }
    assert_eq!(
        logs.iter()
            .filter(|e| e["proto"] == "tcp" && e["decision"] == "allow")
            .count(),
        2,
        "{logs:#?}"
    );
}

#[test]
fn a_request_head_over_64_kib_gets_431_and_never_reaches_upstream() {
    if !privileged("a_request_head_over_64_kib_gets_431_and_never_reaches_upstream") {
        return;
    }
    let upstream = Upstream::start("127.0.0.2:0");
    let port = upstream.port();
    let d = Daemon::start(CONFIG);
    let body = format!(
        "def big(path, size):\n    \
             return [b'GET ' + path + b' HTTP/1.1\\r\\nHost: api.test\\r\\nX-Big: ' + b'a' * size + b'\\r\\nConnection: close\\r\\n\\r\\n']\n\
         print('small', exchange({port}, big(b'/small', 40000)))\n\
         print('big', exchange({port}, big(b'/big', 70000)))\n"
    );
    let out = d.python("acme", &script(&body));
    let got = printed(&out);
    assert_eq!(
        got,
        [
            ("small".to_string(), "HTTP/1.1 200 OK".to_string()),
            (
                "big".to_string(),
                "HTTP/1.1 431 Request Header Fields Too Large".to_string()
            ),
        ],
        "{}",
        text(&out)
    );
    let uris: Vec<String> = upstream.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/small"]);
    assert_eq!(upstream.connections(), 1);
    let entry = d.wait_for_log("acme", |e| e["rule"] == "limit:head");
    assert_eq!(entry["status"], 431);
    assert_eq!(entry["decision"], "block");
    assert_eq!(entry["proto"], "http");
}

/// The relay's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn unfinished_heads_cannot_take_the_relays_memory_or_starve_another_tenant() {
    if !privileged("unfinished_heads_cannot_take_the_relays_memory_or_starve_another_tenant") {
        return;
    }
    let upstream = Upstream::start("127.0.0.2:0");
    let port = upstream.port();
    let d = Daemon::start(CONFIG);
    // Warm the relay up (threads, pools) before measuring.
    let control = script(&format!(
        "print('control', exchange({port}, [b'{}']))\n",
        request("GET /control HTTP/1.1", "api.test")
    ));
    let out = d.python("other", &control);
    assert!(
        stdout(&out).contains("control HTTP/1.1 200 OK"),
        "{}",
        text(&out)
    );

    // 1000 connections, each sending the start of a head, then 60 KB more of
    // it, never finishing it (under the 64 KiB limit, so none is refused): the
    // heads alone would take 60 MB if the relay kept them all. Measured from
    // when the connections are open, so only what the heads hold counts.
    const CONNECTIONS: usize = 1000;
    let attack = format!(
        r"import socket, sys, time
socks = []
for i in range({CONNECTIONS}):
    s = socket.create_connection(('127.0.0.2', {port}), timeout=5)
    s.sendall(b'GET / HTTP/1.1\r\nHost: api.test\r\n')
    s.setblocking(False)
    socks.append([s, 0])
print('opened')
sys.stdout.flush()
sys.stdin.readline()
pad = b'X-Pad: ' + b'a' * 60000
deadline = time.time() + 20
while time.time() < deadline and any(sent < len(pad) for _, sent in socks):
    for pair in socks:
        s, sent = pair
        if sent < len(pad):
            try:
                pair[1] += s.send(pad[sent:])
            except BlockingIOError:
                pass
    time.sleep(0.05)
print('sent', sum(sent for _, sent in socks))
sys.stdout.flush()
time.sleep(60)
"
    );
    let mut attacker = d
        .exec_command("acme", &[], &["python3", "-c", &attack])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(attacker.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line, "opened\n");
    thread::sleep(Duration::from_secs(1));
    let before = rss_kib(d.pid());
    attacker.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert!(line.starts_with("sent "), "attacker: {line:?}");
    // The most it reaches while the relay reads what it can.
    let during = (0..16)
        .map(|_| {
            thread::sleep(Duration::from_millis(250));
            rss_kib(d.pid())
        })
        .max()
        .unwrap();

    // Another tenant is served while the attack holds the first one's budget.
    let out = d.python("other", &control);
    assert!(
        stdout(&out).contains("control HTTP/1.1 200 OK"),
        "{}",
        text(&out)
    );
    let _ = attacker.kill();
    let _ = attacker.wait();

    let grew_mib = during.saturating_sub(before) / 1024;
    eprintln!(
        "relay RSS: {} MiB with {CONNECTIONS} connections open, {} MiB once their heads grew ({})",
        before / 1024,
        during / 1024,
        line.trim()
    );
    // The tenant's budget (16 MiB), plus one read (4 KiB) each connection may
    // hold beyond it: far from the 60 MB the heads would take.
    assert!(grew_mib < 28, "the relay grew by {grew_mib} MiB");
    assert_eq!(
        upstream.requests().len(),
        2,
        "an unfinished head reached upstream"
    );
}

#[test]
fn a_client_hello_sent_after_a_silence_is_judged_by_its_sni() {
    if !privileged("a_client_hello_sent_after_a_silence_is_judged_by_its_sni") {
        return;
    }
    let (tls, pem) = Upstream::start_tls("127.0.0.2:0", &["api.test", "blocked.test"]);
    let port = tls.port();
    let d = Daemon::start(CONFIG);
    let ca = d.dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    // Connected, then silent past the relay's 1 s (as a pool that connects
    // ahead of its requests is), then a handshake.
    let body = format!(
        r"import socket, ssl, time
def late_hello(host):
    ctx = ssl.create_default_context(cafile='{ca}')
    s = socket.create_connection(('127.0.0.2', {port}), timeout=15)
    time.sleep(1.5)
    try:
        t = ctx.wrap_socket(s, server_hostname=host)
        t.sendall(b'GET /late HTTP/1.1\r\nHost: ' + host.encode() + b'\r\nConnection: close\r\n\r\n')
        return t.recv(100).split(b'\r\n')[0].decode()
    except (ssl.SSLError, OSError) as e:
        return 'closed'
print('allowed', late_hello('api.test'))
print('blocked', late_hello('blocked.test'))
",
        ca = ca.display()
    );
    let out = d.python("acme", &body);
    let got = printed(&out);
    assert_eq!(
        got,
        [
            ("allowed".to_string(), "HTTP/1.1 200 OK".to_string()),
            ("blocked".to_string(), "closed".to_string()),
        ],
        "{}",
        text(&out)
    );
    let uris: Vec<String> = tls.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/late"]);
    let entry = d.wait_for_log("acme", |e| e["host"] == "blocked.test");
    assert_eq!(entry["proto"], "tls");
    assert_eq!(entry["decision"], "block");
    let entry = d.wait_for_log("acme", |e| e["host"] == "api.test");
    assert_eq!(entry["proto"], "tls");
    assert_eq!(entry["decision"], "allow");
}
