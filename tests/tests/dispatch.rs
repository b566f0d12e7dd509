//! Dispatch namespaces end to end (SPEC §8): a real daemon, the example User
//! Workers (`target/workers/NAME.wasm`, built by `cargo xtask test`) in a
//! workers folder of the test's own, requests sent straight to the
//! dispatcher's listener, and real upstreams for the Workers' subrequests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use interceptor_tests::*;
use serde_json::Value;

const JWT_KEY: &str = "dispatch-test-secret-for-hs256";

/// `namespace_extra`: more lines for the namespace's table.
fn config(port: u16, limits: &str, namespace_extra: &str) -> String {
    format!(
        r#"
[resolve]
"api.test" = ["127.0.0.2"]

[[dispatch_namespaces]]
binding = "dispatcher"
namespace = "customers"
listen = "127.0.0.1:{port}"
workers = "{{dir}}/workers"
outbound = {{ service = "egress", parameters = ["customer_name", "url"] }}
limits = {{ {limits} }}
{namespace_extra}

[outbound.egress]
default = "allow"
allow_cidrs = ["127.0.0.2/32"]

[[outbound.egress.inject]]
host = "api.test"
header = "Authorization"
jwt = {{ algorithm = "HS256", key_file = "{{dir}}/jwt.key", ttl_seconds = 300, claims = {{ sub = "{{customer_name}}" }} }}
"#
    )
}

/// A daemon with one dispatch namespace, `customers`.
struct Dispatch {
    d: Daemon,
    port: u16,
    workers: PathBuf,
}

impl Dispatch {
    fn start(limits: &str) -> Dispatch {
        Self::start_configured("", "", limits, &[])
    }

    fn start_configured(
        interceptor_extra: &str,
        namespace_extra: &str,
        limits: &str,
        files: &[(&str, &str)],
    ) -> Dispatch {
        let port = free_port();
        let mut all = vec![("jwt.key", JWT_KEY)];
        all.extend_from_slice(files);
        let d = Daemon::start_configured(
            interceptor_extra,
            &config(port, limits, namespace_extra),
            &all,
        );
        let workers = d.dir.path().join("workers");
        std::fs::create_dir_all(&workers).unwrap();
        Dispatch { d, port, workers }
    }

    /// Puts example Worker `example` in place as `name` (atomically, by rename).
    fn install(&self, example_name: &str, name: &str) {
        let tmp = self.workers.join(format!(".{name}.wasm.tmp"));
        std::fs::copy(example_worker(example_name), &tmp).unwrap();
        std::fs::rename(&tmp, self.workers.join(format!("{name}.wasm"))).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.workers.join(format!("{name}.wasm"))).unwrap();
    }

    fn get(&self, host: &str, path: &str) -> Reply {
        request(self.port, host, path, &[])
    }

    /// The processes in the Worker's cgroup `<cgroup>/customers/<name>`.
    fn pids(&self, name: &str) -> Vec<u32> {
        let procs = self
            .d
            .cgroup
            .join("customers")
            .join(name)
            .join("cgroup.procs");
        std::fs::read_to_string(procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The one process serving `name` now.
    fn pid(&self, name: &str) -> u32 {
        let pids = self.pids(name);
        assert_eq!(pids.len(), 1, "Worker {name} processes: {pids:?}");
        pids[0]
    }

    fn status(&self) -> Value {
        self.d.status()
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to the dispatcher on 127.0.0.1:`port`, `Connection: close`.
fn request(port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the dispatcher");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
}

/// Waits (up to `limit`) for `pred`; false if it never held.
fn eventually(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn claims_of(authorization: &str) -> Value {
    jwt_claims(authorization, JWT_KEY)
}

#[test]
fn a_worker_answers_for_its_subdomain_and_unknown_names_are_404() {
    if !workers_ready(
        "a_worker_answers_for_its_subdomain_and_unknown_names_are_404",
        &["hello"],
    ) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("hello", "hello");
    t.install("hello", "acme");

    let r = t.get("hello.example.com", "/path?q=1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "hello from hello");
    // Any domain, any port, any case: the first label names the Worker (which
    // sees the host as the client sent it).
    let r = t.get("ACME.customers.test:8080", "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello from ACME"),
        "{r:?}"
    );
    // Reused: one process per Worker.
    for _ in 0..5 {
        assert_eq!(t.get("hello.example.com", "/").status, 200);
    }
    assert_eq!(t.pids("hello").len(), 1);
    assert_eq!(t.pids("acme").len(), 1);

    for host in [
        "nope.example.com",
        "localhost",
        "127.0.0.1",
        "[::1]:80",
        "-x.example.com",
        "a+b.example.com",
    ] {
        let r = t.get(host, "/");
        assert_eq!(r.status, 404, "{host}: {r:?}");
        assert_eq!(r.body, "", "{host}: a 404 has an empty body");
    }
    // No processes for names without a Worker.
    assert!(!t.d.cgroup.join("customers").join("nope").exists());
}

#[test]
fn a_worker_over_its_cpu_limit_gets_500_and_others_keep_answering() {
    if !workers_ready(
        "a_worker_over_its_cpu_limit_gets_500_and_others_keep_answering",
        &["hello", "spin"],
    ) {
        return;
    }
    const CPU_MS: u64 = 50;
    let t = Dispatch::start(&format!(
        "cpu_ms = {CPU_MS}, memory_mb = 64, subrequests = 5"
    ));
    t.install("spin", "spin");
    t.install("hello", "hello");
    // Warm both (the first request compiles and starts the process).
    assert_eq!(t.get("hello.example.com", "/").status, 200);
    let r = t.get("spin.example.com", "/");
    assert_eq!(r.status, 500, "{r:?}");
    let spin_pid = t.pid("spin");

    let port = t.port;
    let spinner = thread::spawn(move || {
        let mut timings = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let r = request(port, "spin.example.com", "/", &[]);
            timings.push((started.elapsed(), r));
        }
        timings
    });
    let mut hello_timings = Vec::new();
    while !spinner.is_finished() {
        let started = Instant::now();
        let r = t.get("hello.example.com", "/");
        assert_eq!((r.status, r.body.as_str()), (200, "hello from hello"));
        hello_timings.push(started.elapsed());
    }
    let slack = Duration::from_millis(1000);
    for (elapsed, r) in spinner.join().unwrap() {
        assert_eq!(r.status, 500, "{r:?}");
        assert_eq!(r.header("x-interceptor-worker-error"), Some("cpu"), "{r:?}");
        assert!(!r.body.is_empty(), "the 500 carries the error message");
        assert!(
            elapsed < Duration::from_millis(CPU_MS) + slack,
            "spin took {elapsed:?}"
        );
    }
    eprintln!("hello while spin ran: {hello_timings:?}");
    assert!(!hello_timings.is_empty());
    // The limit ends the request, not the process: a request that finishes in
    // time is served by the same process.
    let r = t.get("spin.example.com", "/?ms=5");
    assert_eq!((r.status, r.body.as_str()), (200, "spun 5 ms"), "{r:?}");
    assert_eq!(t.pid("spin"), spin_pid);
}

#[test]
fn a_worker_over_its_memory_limit_gets_500() {
    if !workers_ready("a_worker_over_its_memory_limit_gets_500", &["hog"]) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 5000, memory_mb = 32, subrequests = 5");
    t.install("hog", "hog");
    let r = t.get("hog.example.com", "/");
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(
        r.header("x-interceptor-worker-error"),
        Some("memory"),
        "{r:?}"
    );
    assert!(!r.body.is_empty());
    let pid = t.pid("hog");
    let r = t.get("hog.example.com", "/?mb=4");
    assert_eq!((r.status, r.body.as_str()), (200, "held 4 MiB"), "{r:?}");
    assert_eq!(t.pid("hog"), pid, "the process survived the limit");
}

#[test]
fn adding_replacing_and_removing_a_worker_needs_no_restart() {
    if !workers_ready(
        "adding_replacing_and_removing_a_worker_needs_no_restart",
        &["hello", "fetch"],
    ) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    assert_eq!(t.get("fresh.example.com", "/").status, 404);

    t.install("hello", "fresh");
    let started = Instant::now();
    let r = t.get("fresh.example.com", "/");
    let cold = started.elapsed();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello from fresh"),
        "{r:?}"
    );
    let started = Instant::now();
    assert_eq!(t.get("fresh.example.com", "/").status, 200);
    eprintln!("cold start {cold:?}, warm {:?}", started.elapsed());
    let first = t.pid("fresh");

    // Replaced by another component (rename): the next request runs it.
    t.install("fetch", "fresh");
    let r = t.get("fresh.example.com", "/");
    assert_eq!(
        r.status, 400,
        "the fetch Worker answers without a URL: {r:?}"
    );
    assert!(r.body.contains("give the URL"), "{r:?}");
    assert!(
        eventually(Duration::from_secs(10), || gone(first)),
        "the old process is retired"
    );
    let second = t.pid("fresh");
    assert_ne!(first, second);

    // Overwritten in place with the first component again (cached, no recompile).
    std::fs::copy(example_worker("hello"), t.workers.join("fresh.wasm")).unwrap();
    let r = t.get("fresh.example.com", "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello from fresh"),
        "{r:?}"
    );
    assert!(eventually(Duration::from_secs(10), || gone(second)));
    let third = t.pid("fresh");

    // Touched without a change of content: same process.
    let file = std::fs::File::options()
        .append(true)
        .open(t.workers.join("fresh.wasm"))
        .unwrap();
    file.set_modified(std::time::SystemTime::now()).unwrap();
    assert_eq!(t.get("fresh.example.com", "/").status, 200);
    assert_eq!(t.pid("fresh"), third);

    // A file that is not a component: 500 with the compile error, not a crash.
    std::fs::write(t.workers.join("fresh.wasm"), b"not wasm").unwrap();
    let r = t.get("fresh.example.com", "/");
    assert_eq!(r.status, 500, "{r:?}");
    assert!(!r.body.is_empty(), "{r:?}");
    assert!(eventually(Duration::from_secs(10), || gone(third)));

    // Removed: 404, and no process is left.
    t.install("hello", "fresh");
    assert_eq!(t.get("fresh.example.com", "/").status, 200);
    let fourth = t.pid("fresh");
    t.remove("fresh");
    let r = t.get("fresh.example.com", "/");
    assert_eq!((r.status, r.body.as_str()), (404, ""), "{r:?}");
    assert!(eventually(Duration::from_secs(10), || gone(fourth)));
    assert!(t.pids("fresh").is_empty());
}

#[test]
fn a_killed_worker_process_is_restarted() {
    if !workers_ready("a_killed_worker_process_is_restarted", &["hello"]) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("hello", "hello");
    assert_eq!(t.get("hello.example.com", "/").status, 200);
    for round in 0..3 {
        let pid = t.pid("hello");
        // SAFETY: kill(2) on a process of the test's own daemon.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        assert!(
            eventually(Duration::from_secs(5), || gone(pid)),
            "the daemon reaps its Worker process"
        );
        let r = t.get("hello.example.com", "/");
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "hello from hello"),
            "round {round}: {r:?}"
        );
        assert_ne!(t.pid("hello"), pid);
    }
}

#[test]
fn an_idle_worker_process_is_stopped_and_the_next_request_starts_one() {
    if !workers_ready(
        "an_idle_worker_process_is_stopped_and_the_next_request_starts_one",
        &["hello", "spin"],
    ) {
        return;
    }
    let t = Dispatch::start_configured(
        "",
        "idle_timeout_seconds = 2",
        "cpu_ms = 10000, memory_mb = 64, subrequests = 5",
        &[],
    );
    t.install("hello", "hello");
    t.install("spin", "spin");
    // Each pid right after its request: a compile under load can outlast the timeout.
    assert_eq!(t.get("hello.example.com", "/").status, 200);
    let idle = t.pid("hello");
    assert_eq!(t.get("spin.example.com", "/?ms=1").status, 200);
    let busy = t.pid("spin");
    // A request running longer than the timeout keeps its process.
    let port = t.port;
    let slow = thread::spawn(move || request(port, "spin.example.com", "/?ms=4000", &[]));
    assert!(
        eventually(Duration::from_secs(10), || gone(idle)),
        "the idle Worker process {idle} was not stopped"
    );
    let r = slow.join().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "spun 4000 ms"), "{r:?}");
    // Retired while busy, it would stop as soon as its request is done.
    thread::sleep(Duration::from_secs(1));
    assert!(!gone(busy), "a busy Worker process was stopped");
    assert_eq!(t.pid("spin"), busy);
    assert!(t.d.daemon_stderr().contains("no request for 2s"));
    let r = t.get("hello.example.com", "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello from hello"),
        "{r:?}"
    );
    assert_ne!(t.pid("hello"), idle);
}

#[test]
fn requests_in_flight_when_the_process_dies_get_500() {
    if !workers_ready(
        "requests_in_flight_when_the_process_dies_get_500",
        &["spin"],
    ) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 10000, memory_mb = 64, subrequests = 5");
    t.install("spin", "spin");
    assert_eq!(t.get("spin.example.com", "/?ms=1").status, 200);
    let pid = t.pid("spin");
    let port = t.port;
    let in_flight: Vec<_> = (0..3)
        .map(|_| thread::spawn(move || request(port, "spin.example.com", "/?ms=5000", &[])))
        .collect();
    thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on a process of the test's own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    for handle in in_flight {
        let r = handle.join().unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (500, "Worker process exited"),
            "{r:?}"
        );
    }
    let r = t.get("spin.example.com", "/?ms=1");
    assert_eq!((r.status, r.body.as_str()), (200, "spun 1 ms"), "{r:?}");
    assert_ne!(t.pid("spin"), pid);
}

#[test]
fn the_worker_process_is_sandboxed() {
    if !workers_ready("the_worker_process_is_sandboxed", &["hello"]) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("hello", "hello");
    assert_eq!(t.get("hello.example.com", "/").status, 200);
    let pid = t.pid("hello");

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(!pw.is_null(), "no user nobody");
        ((*pw).pw_uid.to_string(), (*pw).pw_gid.to_string())
    };
    assert_eq!(field("Uid:"), vec![uid.clone(); 4], "{status}");
    assert_eq!(field("Gid:"), vec![gid.clone(); 4], "{status}");
    assert!(field("Groups:").iter().all(|g| *g == gid), "{status}");
    assert_eq!(field("NoNewPrivs:"), vec!["1"], "{status}");
    assert_eq!(field("CapEff:"), vec!["0000000000000000"], "{status}");

    let relative = t.d.cgroup.strip_prefix(cgroup2_mount()).unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let expected = format!("0::/{}/customers/hello", relative.display());
    assert!(cgroup.lines().any(|l| l == expected), "{cgroup}");

    // A session of its own.
    // SAFETY: getsid has no preconditions.
    assert_eq!(unsafe { libc::getsid(pid as i32) }, pid as i32);

    // None of the daemon's environment (it may hold credentials).
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    for var in environ.split(|b| *b == 0).filter(|v| !v.is_empty()) {
        let var = String::from_utf8_lossy(var);
        let key = var.split('=').next().unwrap();
        assert!(
            ["INTERCEPTOR_LOG", "NO_COLOR"].contains(&key),
            "inherited environment variable {var}"
        );
    }

    // Descriptors: 0 and 1 on /dev/null, 2 a pipe, 3 the channel to the daemon;
    // besides those only what the runtime makes for itself (memfds, epoll,
    // eventfd, its own socketpairs): no directory, no file, no other socket.
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        match fd {
            0 | 1 => assert_eq!(target, "/dev/null", "fd {fd}"),
            2 => assert!(target.starts_with("pipe:"), "fd 2 is {target}"),
            _ if target.starts_with("socket:") => sockets.push((fd, target)),
            _ => assert!(
                target.starts_with("/memfd:")
                    || target.starts_with("anon_inode:")
                    || target.starts_with("pipe:"),
                "fd {fd} is {target}"
            ),
        }
    }
    assert!(sockets.iter().any(|(fd, _)| *fd == 3), "fd 3: {sockets:?}");
    // Other sockets must be the runtime's own pairs (both ends in the process).
    let inode = |t: &str| {
        t.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .to_string()
    };
    let own: Vec<String> = sockets.iter().map(|(_, t)| inode(t)).collect();
    let ss = std::process::Command::new("ss").args(["-xpn"]).output();
    match ss {
        Ok(out) if out.status.success() => {
            let table = String::from_utf8_lossy(&out.stdout).into_owned();
            for (fd, target) in &sockets {
                let ino = inode(target);
                let line = table
                    .lines()
                    .find(|l| l.split_whitespace().nth(5) == Some(ino.as_str()))
                    .unwrap_or_else(|| panic!("fd {fd} ({target}) is not a Unix socket:\n{table}"));
                let peer = line.split_whitespace().nth(7).unwrap_or("").to_string();
                if *fd == 3 {
                    assert!(!own.contains(&peer), "fd 3's peer is the daemon: {line}");
                } else {
                    assert!(
                        own.contains(&peer),
                        "fd {fd} is a socket to outside the process: {line}"
                    );
                }
            }
        }
        _ => {
            eprintln!("ss is not available: checking only that every socket is a Unix one");
            let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap();
            for (fd, target) in &sockets {
                let ino = inode(target);
                assert!(
                    unix.lines()
                        .any(|l| l.split_whitespace().nth(6) == Some(ino.as_str())),
                    "fd {fd} ({target}) is not a Unix socket"
                );
            }
        }
    }
}

#[test]
fn status_lists_the_worker_processes() {
    if !workers_ready("status_lists_the_worker_processes", &["hello"]) {
        return;
    }
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("hello", "hello");
    for _ in 0..3 {
        assert_eq!(t.get("hello.example.com", "/").status, 200);
    }
    let status = t.status();
    let ns = &status["dispatch"][0];
    assert_eq!(ns["namespace"], "customers", "{status:#}");
    assert_eq!(ns["listen"], format!("127.0.0.1:{}", t.port));
    let worker = &ns["workers"][0];
    assert_eq!(worker["name"], "hello", "{status:#}");
    assert_eq!(worker["pid"], t.pid("hello"));
    assert_eq!(worker["requests"], 3);
    assert_eq!(worker["component"].as_str().unwrap().len(), 12);

    // The table says the same.
    let out = std::process::Command::new(interceptor_bin())
        .args(["status", "--config"])
        .arg(&t.d.config)
        .output()
        .unwrap();
    let table = stdout(&out);
    assert!(
        table.contains("namespace customers on 127.0.0.1:"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "worker hello                pid {}",
            t.pid("hello")
        )),
        "{table}"
    );
}

#[test]
fn shutdown_finishes_in_flight_requests_then_stops_the_workers() {
    if !workers_ready(
        "shutdown_finishes_in_flight_requests_then_stops_the_workers",
        &["hello", "spin"],
    ) {
        return;
    }
    let mut t = Dispatch::start("cpu_ms = 5000, memory_mb = 64, subrequests = 5");
    t.install("hello", "hello");
    t.install("spin", "spin");
    assert_eq!(t.get("hello.example.com", "/").status, 200);
    assert_eq!(t.get("spin.example.com", "/?ms=1").status, 200);
    let pids = [t.pid("hello"), t.pid("spin")];
    let port = t.port;
    let slow = thread::spawn(move || request(port, "spin.example.com", "/?ms=1500", &[]));
    thread::sleep(Duration::from_millis(400));
    let exit = t.d.stop_with(libc::SIGTERM);
    assert!(exit.success(), "{exit}\n{}", t.d.daemon_stderr());
    let r = slow.join().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "spun 1500 ms"), "{r:?}");
    for pid in pids {
        assert!(gone(pid), "Worker process {pid} outlived the daemon");
    }
    assert!(t.d.daemon_stderr().contains("stopping 2 Worker process"));
}

#[test]
fn workers_do_not_outlive_a_crashed_daemon() {
    if !workers_ready("workers_do_not_outlive_a_crashed_daemon", &["hello"]) {
        return;
    }
    let mut t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("hello", "hello");
    assert_eq!(t.get("hello.example.com", "/").status, 200);
    let pid = t.pid("hello");
    t.d.stop_with(libc::SIGKILL);
    // The channel's other end is gone: the Worker process ends by itself.
    assert!(
        eventually(Duration::from_secs(5), || gone(pid)),
        "Worker process {pid} outlived its daemon"
    );
    t.d.spawn();
    let r = t.get("hello.example.com", "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "hello from hello"),
        "{r:?}"
    );
}

// Subrequests: the relay sees each with the parameters of the request that made it.

#[test]
fn a_workers_subrequest_carries_a_jwt_for_its_customer_and_is_logged() {
    if !workers_ready(
        "a_workers_subrequest_carries_a_jwt_for_its_customer_and_is_logged",
        &["fetch"],
    ) {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("fetch", "fetch");
    t.install("fetch", "globex");

    // A client's own context header is never trusted: the dispatcher replaces it.
    let forged = interceptor::context::ContextKey::from_secret(b"not the daemon's key").sign(
        &interceptor::context::RequestContext {
            namespace: "customers".into(),
            worker: "globex".into(),
            request_id: 1,
            params: [("customer_name".to_string(), "globex".to_string())]
                .into_iter()
                .collect(),
            subrequest_limit: None,
        },
    );
    let path = format!("/?url=http://api.test:{port}/data");
    let r = request(
        t.port,
        "fetch.example.com",
        &path,
        &[("x-interceptor-context", &forged)],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("hello from {} /data", api.addr));
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    let claims = claims_of(seen[0].header("authorization").expect("JWT injected"));
    assert_eq!(claims["sub"], "fetch");
    assert!(
        seen[0].header("x-interceptor-context").is_none(),
        "the context never goes upstream"
    );

    let entry = t.d.wait_for_log("fetch", |e| {
        e["url"].as_str().is_some_and(|u| u.ends_with("/data"))
    });
    assert_eq!(entry["decision"], "allow", "{entry:#}");
    assert_eq!(entry["params"]["customer_name"], "fetch", "{entry:#}");
    assert_eq!(
        entry["params"]["url"],
        format!("http://fetch.example.com{path}"),
        "{entry:#}"
    );
    assert!(
        !serde_json::to_string(&entry).unwrap().contains("Bearer"),
        "no credential in the log"
    );

    // Another Worker of the namespace: its own tenant, its own customer.
    let r = t.get(
        "globex.example.com",
        &format!("/?url=http://api.test:{port}/g"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let claims = claims_of(api.requests()[1].header("authorization").unwrap());
    assert_eq!(claims["sub"], "globex");
    t.d.wait_for_log("globex", |e| e["params"]["customer_name"] == "globex");
}

#[test]
fn concurrent_requests_each_log_their_own_url() {
    if !workers_ready("concurrent_requests_each_log_their_own_url", &["fetch"]) {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 5");
    t.install("fetch", "fetch");
    assert_eq!(
        t.get(
            "fetch.example.com",
            &format!("/?url=http://api.test:{port}/warm")
        )
        .status,
        200
    );
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let dport = t.port;
            thread::spawn(move || {
                let path = format!("/?url=http://api.test:{port}/r{i}&tag={i}");
                (
                    i,
                    path.clone(),
                    request(dport, "fetch.example.com", &path, &[]),
                )
            })
        })
        .collect();
    for h in handles {
        let (i, path, r) = h.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let entry = t.d.wait_for_log("fetch", |e| {
            e["url"]
                .as_str()
                .is_some_and(|u| u.ends_with(&format!("/r{i}")))
        });
        assert_eq!(
            entry["params"]["url"],
            format!("http://fetch.example.com{path}"),
            "{entry:#}"
        );
    }
    assert_eq!(t.pids("fetch").len(), 1, "one process served them all");
}

#[test]
fn subrequests_beyond_the_limit_are_blocked() {
    if !workers_ready("subrequests_beyond_the_limit_are_blocked", &["fetch"]) {
        return;
    }
    let api = Upstream::start("127.0.0.2:0");
    let port = api.port();
    let t = Dispatch::start("cpu_ms = 1000, memory_mb = 64, subrequests = 2");
    t.install("fetch", "fetch");
    let r = t.get(
        "fetch.example.com",
        &format!("/?url=http://api.test:{port}/n&count=3"),
    );
    assert_eq!(r.header("x-fetch-statuses"), Some("200,200,403"), "{r:?}");
    assert_eq!(api.requests().len(), 2);
    let entry = t.d.wait_for_log("fetch", |e| e["decision"] == "block");
    assert_eq!(entry["rule"], "limit:subrequests", "{entry:#}");
    // The limit is per incoming request: the next one has its own budget.
    let r = t.get(
        "fetch.example.com",
        &format!("/?url=http://api.test:{port}/n&count=2"),
    );
    assert_eq!(r.header("x-fetch-statuses"), Some("200,200"), "{r:?}");
}

#[test]
fn https_subrequests_are_seen_in_the_clear_and_originated_by_the_relay() {
    if !workers_ready(
        "https_subrequests_are_seen_in_the_clear_and_originated_by_the_relay",
        &["fetch"],
    ) {
        return;
    }
    let (tls, pem) = Upstream::start_tls("127.0.0.2:0", &["api.test"]);
    let port = tls.port();
    let t = Dispatch::start_configured(
        "upstream_ca = [\"{dir}/ca.pem\"]",
        "",
        "cpu_ms = 1000, memory_mb = 64, subrequests = 5",
        &[("ca.pem", &pem)],
    );
    t.install("fetch", "fetch");
    let r = t.get(
        "fetch.example.com",
        &format!("/?url=https://api.test:{port}/secure"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("hello from {} /secure", tls.addr));
    let seen = tls.requests();
    assert_eq!(seen.len(), 1);
    let claims = claims_of(seen[0].header("authorization").expect("JWT injected"));
    assert_eq!(claims["sub"], "fetch");
    let entry = t.d.wait_for_log("fetch", |e| {
        e["url"] == format!("https://api.test:{port}/secure")
    });
    assert_eq!(entry["params"]["customer_name"], "fetch", "{entry:#}");
}
