//! The on-disk compile cache of User Worker components, end to end: a real
//! daemon with a dispatch namespace, the example Workers
//! (`target/workers/NAME.wasm`, built by `cargo xtask test`), restarted on the
//! same config, so its `<state_dir>/compiled/` (the test's own) outlives it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use interceptor_tests::*;

const LOADED: &str = "loaded precompiled component from cache";
const COMPILED: &str = "compiled Worker component";

struct Dispatch {
    d: Daemon,
    port: u16,
    workers: PathBuf,
}

impl Dispatch {
    fn start() -> Dispatch {
        let port = free_port();
        let d = Daemon::start(&format!(
            r#"
[[dispatch_namespaces]]
binding = "dispatcher"
namespace = "customers"
listen = "127.0.0.1:{port}"
workers = "{{dir}}/workers"

[outbound.egress]
default = "block"
"#
        ));
        let workers = d.dir.path().join("workers");
        std::fs::create_dir_all(&workers).unwrap();
        Dispatch { d, port, workers }
    }

    fn install(&self, example_name: &str, name: &str) {
        let tmp = self.workers.join(format!(".{name}.wasm.tmp"));
        std::fs::copy(example_worker(example_name), &tmp).unwrap();
        std::fs::rename(&tmp, self.workers.join(format!("{name}.wasm"))).unwrap();
    }

    fn cache_dir(&self) -> PathBuf {
        self.d.dir.path().join("state/compiled")
    }

    /// The cache's entries (not temporary files).
    fn entries(&self) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(self.cache_dir()) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same config.
    fn restart(&mut self) {
        self.d.stop_with(libc::SIGTERM);
        self.d.spawn();
    }

    /// Status and body of `GET /` to `host`.
    fn get(&self, host: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .unwrap();
        write!(
            stream,
            "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The time the first request to Worker `name` takes to be answered by
    /// it (`fetch` without a URL answers 400 itself).
    fn first_request(&self, name: &str) -> Duration {
        let started = Instant::now();
        let (status, body) = self.get(&format!("{name}.example.com"));
        let took = started.elapsed();
        let expected = if name == "fetch" { 400 } else { 200 };
        assert_eq!(status, expected, "{body}");
        took
    }

    fn stderr_has(&self, text: &str) -> bool {
        self.d.daemon_stderr().contains(text)
    }
}

fn eventually(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if pred() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    pred()
}

#[test]
fn a_restarted_daemon_serves_a_worker_from_the_cache_without_compiling_it() {
    if !workers_ready(
        "a_restarted_daemon_serves_a_worker_from_the_cache_without_compiling_it",
        &["hello", "fetch"],
    ) {
        return;
    }
    let mut t = Dispatch::start();
    t.install("hello", "hello");
    t.install("fetch", "fetch");
    assert_eq!(t.get("hello.example.com").0, 200);
    t.first_request("fetch");
    assert!(t.stderr_has(COMPILED), "the first daemon compiled");
    assert!(!t.stderr_has(LOADED), "nothing was cached yet");
    assert!(
        eventually(Duration::from_secs(5), || t.entries().len() == 2),
        "one entry per component: {:?}",
        t.entries()
    );

    // Control: with the cache emptied, a restart compiles again (cold).
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for name in ["hello", "fetch"] {
        // Stopped first: a daemon still compiling in the background would
        // write an entry after the removal.
        t.d.stop_with(libc::SIGTERM);
        for entry in t.entries() {
            std::fs::remove_file(entry).unwrap();
        }
        t.d.spawn();
        cold.push((name, t.first_request(name)));
        assert!(t.stderr_has(COMPILED), "an empty cache compiles");
        assert!(!t.stderr_has(LOADED));
    }
    assert!(eventually(Duration::from_secs(5), || t.entries().len() == 2));

    // Warm: the same components are loaded, not compiled.
    for name in ["hello", "fetch"] {
        t.restart();
        warm.push((name, t.first_request(name)));
        let stderr = t.d.daemon_stderr();
        assert!(stderr.contains(LOADED), "{stderr}");
        assert!(
            !stderr.contains(COMPILED),
            "a restart with a warm cache compiled: {stderr}"
        );
    }
    for ((name, cold), (_, warm)) in cold.iter().zip(&warm) {
        eprintln!(
            "first request to {name} after a restart: {:.1} ms with an empty compile cache, {:.1} ms with a warm one",
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3
        );
        assert!(
            warm < cold,
            "{name}: warm {warm:?} not faster than cold {cold:?}"
        );
    }
}

#[test]
fn a_corrupt_cache_entry_is_compiled_again_and_replaced() {
    if !workers_ready(
        "a_corrupt_cache_entry_is_compiled_again_and_replaced",
        &["hello"],
    ) {
        return;
    }
    let mut t = Dispatch::start();
    t.install("hello", "hello");
    assert_eq!(t.get("hello.example.com").0, 200);
    assert!(eventually(Duration::from_secs(5), || t.entries().len() == 1));
    let entry = t.entries().remove(0);
    let good = std::fs::read(&entry).unwrap();

    // One flipped byte in the middle of the machine code.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&entry, &bad).unwrap();
    t.restart();
    let (status, body) = t.get("hello.example.com");
    assert_eq!(status, 200, "{body}");
    let stderr = t.d.daemon_stderr();
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(stderr.contains(COMPILED), "{stderr}");
    assert!(!stderr.contains(LOADED), "{stderr}");
    assert!(eventually(Duration::from_secs(5), || std::fs::read(&entry)
        .is_ok_and(|now| now != bad)));

    // Truncated: the same.
    let whole = std::fs::read(&entry).unwrap();
    std::fs::write(&entry, &whole[..whole.len() / 3]).unwrap();
    t.restart();
    assert_eq!(t.get("hello.example.com").0, 200);
    assert!(t.stderr_has("truncated"), "{}", t.d.daemon_stderr());
    assert!(t.stderr_has(COMPILED));

    // The replacement is sound: the next restart loads it.
    assert!(eventually(Duration::from_secs(5), || std::fs::metadata(
        &entry
    )
    .is_ok_and(|m| m.len() == whole.len() as u64)));
    t.restart();
    assert_eq!(t.get("hello.example.com").0, 200);
    assert!(t.stderr_has(LOADED), "{}", t.d.daemon_stderr());
    assert!(!t.stderr_has(COMPILED));
}

#[test]
fn the_cache_directory_is_root_only_and_its_files_are_0600() {
    if !workers_ready(
        "the_cache_directory_is_root_only_and_its_files_are_0600",
        &["hello"],
    ) {
        return;
    }
    let t = Dispatch::start();
    let dir = std::fs::metadata(t.cache_dir()).expect("created at start");
    assert!(dir.is_dir());
    assert_eq!(dir.uid(), 0);
    assert_eq!(dir.mode() & 0o7777, 0o700);
    t.install("hello", "hello");
    assert_eq!(t.get("hello.example.com").0, 200);
    assert!(eventually(Duration::from_secs(5), || t.entries().len() == 1));
    for entry in t.entries() {
        let meta = std::fs::metadata(&entry).unwrap();
        assert_eq!(meta.uid(), 0, "{}", entry.display());
        assert_eq!(meta.mode() & 0o7777, 0o600, "{}", entry.display());
    }
    // The sandbox user cannot even list it.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "ls"])
        .arg(t.cache_dir())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nobody listed the cache: {}",
        text(&out)
    );
    // Control: root can.
    assert!(std::fs::read_dir(t.cache_dir()).is_ok());
}

#[test]
fn a_cache_directory_others_can_write_is_not_used_and_workers_still_run() {
    if !workers_ready(
        "a_cache_directory_others_can_write_is_not_used_and_workers_still_run",
        &["hello"],
    ) {
        return;
    }
    let mut t = Dispatch::start();
    std::fs::set_permissions(
        t.cache_dir(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    t.restart();
    assert!(
        t.stderr_has("others may have written its files"),
        "{}",
        t.d.daemon_stderr()
    );
    t.install("hello", "hello");
    assert_eq!(t.get("hello.example.com").0, 200);
    thread::sleep(Duration::from_millis(200));
    assert!(t.entries().is_empty(), "wrote to an untrusted directory");
}

/// A measurement, not a check of behaviour: the first request to a JavaScript
/// Worker (componentize-js) after a restart, with the cache empty and warm.
/// Runs only with `INTERCEPTOR_JS_WORKER=PATH.wasm` (a component answering
/// `GET /` with 200): compiling one takes minutes in a debug build.
#[test]
fn measure_the_first_request_to_a_js_worker_after_a_restart() {
    let Ok(js) = std::env::var("INTERCEPTOR_JS_WORKER") else {
        eprintln!("skipping: INTERCEPTOR_JS_WORKER is not set");
        return;
    };
    if !privileged("measure_the_first_request_to_a_js_worker_after_a_restart") {
        return;
    }
    let mut t = Dispatch::start();
    std::fs::copy(&js, t.workers.join("js.wasm")).unwrap();
    t.d.stop_with(libc::SIGTERM);
    for entry in t.entries() {
        std::fs::remove_file(entry).unwrap();
    }
    t.d.spawn();
    let cold = t.first_request("js");
    assert!(eventually(Duration::from_secs(5), || t.entries().len() == 1));
    let mut warm = Vec::new();
    for _ in 0..5 {
        t.restart();
        warm.push(t.first_request("js"));
        assert!(t.stderr_has(LOADED) && !t.stderr_has(COMPILED));
    }
    warm.sort();
    eprintln!(
        "first request to the JS Worker after a restart: {:.0} ms with an empty compile cache; \
         with a warm one {:.1} ms median of 5 ({:.1} - {:.1})",
        cold.as_secs_f64() * 1e3,
        warm[2].as_secs_f64() * 1e3,
        warm[0].as_secs_f64() * 1e3,
        warm[4].as_secs_f64() * 1e3
    );
}
