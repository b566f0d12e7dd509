//! Shared helpers for the privileged integration tests: a real daemon started
//! with a config of the test's own (unique ports, cgroup, socket and log dir),
//! real upstream servers on loopback addresses, and sandboxed clients run with
//! `interceptor exec`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod upstream;

pub use upstream::{RecordedRequest, Upstream};

/// Whether privileged tests can run here. Without root they are skipped, unless
/// `INTERCEPTOR_REQUIRE_PRIVILEGED=1`, which makes them fail instead.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("INTERCEPTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: needs root (INTERCEPTOR_REQUIRE_PRIVILEGED=1 forbids skipping)");
    }
    eprintln!("skipping {test}: needs root to load eBPF programs");
    false
}

/// The `interceptor` binary built by `cargo xtask test`.
pub fn interceptor_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("INTERCEPTOR_BIN") {
        return PathBuf::from(bin);
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/interceptor");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// The cgroup v2 mount, as the daemon finds it.
pub fn cgroup2_mount() -> PathBuf {
    interceptor::ebpf::cgroup2_mount().expect("a cgroup v2 mount")
}

/// An example Worker, as `cargo xtask test` builds them into `target/workers`.
pub fn example_worker(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/workers")
        .join(format!("{name}.wasm"))
}

/// Whether a Worker test can run: root, and the example Workers it needs are
/// built. Missing Workers skip it, unless `INTERCEPTOR_REQUIRE_PRIVILEGED=1`.
pub fn workers_ready(test: &str, workers: &[&str]) -> bool {
    if !privileged(test) {
        return false;
    }
    let missing: Vec<&str> = workers
        .iter()
        .copied()
        .filter(|w| !example_worker(w).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "{test}: the example Workers {missing:?} are not built in target/workers \
         (`cargo xtask test` builds them)"
    );
    if std::env::var("INTERCEPTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{message}");
    }
    eprintln!("skipping {message}");
    false
}

/// A TCP port free on 127.0.0.1 and ::1, for TCP and UDP alike.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ok = TcpListener::bind(("::1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("::1", port)).is_ok();
        if ok {
            return port;
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub relay_port: u16,
    pub dns_port: u16,
    pub cgroup: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts a daemon whose config is `[interceptor]` (unique ports and paths)
    /// followed by `rest` (tenants, outbound Workers, `[resolve]`...). `{dir}` in
    /// `rest` is replaced by the daemon's temporary directory.
    pub fn start(rest: &str) -> Daemon {
        Self::start_with(rest, &[])
    }

    /// Like [`Daemon::start`], with `files` (name, content) written to its directory first.
    pub fn start_with(rest: &str, files: &[(&str, &str)]) -> Daemon {
        Self::start_configured("", rest, files)
    }

    /// The most general start: `interceptor_extra` lines are added to the
    /// `[interceptor]` table (`{dir}` replaced as in `rest`).
    pub fn start_configured(interceptor_extra: &str, rest: &str, files: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // The sandbox user reads test files (CA certificates, scripts) from here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let cgroup_name = format!("interceptor-test-{}-{n}", std::process::id());
        let relay_port = free_port();
        let dns_port = free_port();
        let config = dir.path().join("interceptor.toml");
        let log_dir = dir.path().join("logs");
        let admin_socket = dir.path().join("run/admin.sock");
        // The compile cache too is the test's own (`state_dir`).
        let text = format!(
            "[interceptor]\nrelay = \"127.0.0.1:{relay_port}\"\ndns = \"127.0.0.1:{dns_port}\"\n\
             admin_socket = \"{}\"\nlog_dir = \"{}\"\nstate_dir = \"{}\"\ncgroup = \"{cgroup_name}\"\nsandbox_user = \"nobody\"\n{}\n\n{}",
            admin_socket.display(),
            log_dir.display(),
            dir.path().join("state").display(),
            interceptor_extra.replace("{dir}", &dir.path().display().to_string()),
            rest.replace("{dir}", &dir.path().display().to_string()),
        );
        std::fs::write(&config, text).unwrap();
        let mut daemon = Daemon {
            child: None,
            cgroup: cgroup2_mount().join(&cgroup_name),
            dir,
            config,
            log_dir,
            admin_socket,
            relay_port,
            dns_port,
            stderr: Arc::new(Mutex::new(String::new())),
        };
        daemon.spawn();
        daemon
    }

    /// Starts (again) the daemon process on this config and waits until it serves.
    pub fn spawn(&mut self) {
        self.stderr.lock().unwrap().clear();
        let mut child = Command::new(interceptor_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("INTERCEPTOR_LOG", "info,interceptor=debug")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start interceptor run");
        let stderr = child.stderr.take().unwrap();
        let sink = self.stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.stderr.lock().unwrap().contains("interceptor ready") {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited with {status}:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "daemon did not become ready");
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends `signal` and waits for the process to end.
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap()
    }

    /// `interceptor exec --tenant TENANT [--param k=v]... -- CMD...`, waited for.
    pub fn exec(&self, tenant: &str, params: &[(&str, &str)], cmd: &[&str]) -> Output {
        self.exec_command(tenant, params, cmd).output().unwrap()
    }

    pub fn exec_command(&self, tenant: &str, params: &[(&str, &str)], cmd: &[&str]) -> Command {
        let mut command = Command::new(interceptor_bin());
        command
            .args(["exec", "--config"])
            .arg(&self.config)
            .args(["--tenant", tenant]);
        for (k, v) in params {
            command.arg("--param").arg(format!("{k}={v}"));
        }
        command.arg("--").args(cmd);
        command
    }

    /// Runs a Python script in the tenant's sandbox; returns its output.
    pub fn python(&self, tenant: &str, script: &str) -> Output {
        self.exec(tenant, &[], &["python3", "-c", script])
    }

    /// `interceptor status --json` of this daemon.
    pub fn status(&self) -> Value {
        let out = Command::new(interceptor_bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status --json")
    }

    /// Every entry of the tenant's log so far.
    pub fn logs(&self, tenant: &str) -> Vec<Value> {
        let path = self.log_dir.join(format!("{tenant}.jsonl"));
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        text.lines()
            .map(|l| serde_json::from_str(l).expect("log lines are JSON"))
            .collect()
    }

    /// Waits (up to 5 s) for a log entry of the tenant matching `pred`.
    pub fn wait_for_log(&self, tenant: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(entry) = self.logs(tenant).into_iter().find(&pred) {
                return entry;
            }
            assert!(
                Instant::now() < deadline,
                "no matching log entry for {tenant}; log: {:#?}",
                self.logs(tenant)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn daemon_stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_cgroup_tree(&self.cgroup);
    }
}

/// Kills whatever still runs in a cgroup tree and removes it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            // Its LSM programs could never match a task again: unpin them now
            // rather than at the next daemon's start.
            let _ = interceptor::ebpf::forget_subtree(dir);
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Output as text, for assertions with context.
pub fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A plain TCP server that records every connection's bytes and echoes them back.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl EchoServer {
    pub fn start(addr: &str) -> EchoServer {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let sink = sink.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut all = Vec::new();
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        all.extend_from_slice(&buf[..n]);
                    }
                    sink.lock().unwrap().push(all);
                });
            }
        });
        EchoServer { addr, received }
    }

    pub fn connections(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// A UDP socket that records every datagram it receives.
pub struct UdpSink {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl UdpSink {
    pub fn start(addr: &str) -> UdpSink {
        let socket = UdpSocket::bind(addr).unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                sink.lock().unwrap().push(buf[..n].to_vec());
            }
        });
        UdpSink { addr, received }
    }
}

/// Connects from the test process itself (outside every sandbox).
pub fn connect_direct(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
}

/// The claims of `Bearer <JWT>`, verified (HS256) with `key` as an upstream would.
pub fn jwt_claims(authorization: &str, key: &str) -> Value {
    let token = authorization.strip_prefix("Bearer ").expect("Bearer token");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(key.as_bytes()),
        &validation,
    )
    .expect("the upstream verifies the JWT with the key")
    .claims
}

/// Parses `k=v` lines a script printed.
pub fn key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}
