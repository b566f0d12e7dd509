//! `cargo xtask bench`: direct client→upstream against the same through the
//! interceptor (eBPF redirect + relay + policy + logging), measured in one run on
//! loopback with wrk; ratios to direct, and the relay's RSS at 1,000 open
//! connections. Writes `target/bench/report.json`. Nothing here is asserted:
//! performance is measured, not tested.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const UPSTREAM: &str = "127.0.0.2:18080";
const NGINX_PROXY: &str = "127.0.0.1:18081";
const RELAY_PORT: u16 = 25101;
const DNS_PORT: u16 = 25153;
const CGROUP: &str = "interceptor-bench";
const OPEN_CONNECTIONS: usize = 1000;
const DISPATCHER: &str = "127.0.0.1:25180";
const WASMTIME_SERVE: &str = "127.0.0.1:25190";

pub struct Options {
    pub seconds: u32,
    pub connections: u32,
}

/// One wrk run.
#[derive(Clone, Debug, Default)]
struct Measurement {
    requests_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

pub fn run(root: &Path, options: &Options) -> Result<()> {
    let bin = root.join("target/release/interceptor");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let _upstream = Nginx::upstream(&dir)?;
    let mut daemon = Daemon::start(&bin, &dir)?;

    let url = format!("http://{UPSTREAM}/");
    let sandboxed = Some((bin.as_path(), dir.join("interceptor.toml")));
    let wrk = |through: bool, close: bool| -> Result<Measurement> {
        let headers: &[&str] = if close { &["Connection: close"] } else { &[] };
        run_wrk(
            if through { sandboxed.as_ref() } else { None },
            options,
            headers,
            &url,
        )
    };

    eprintln!("bench: keep-alive, direct and through the interceptor");
    let direct_ka = wrk(false, false)?;
    let relay_ka = wrk(true, false)?;
    eprintln!("bench: connection per request, direct and through the interceptor");
    let direct_cpr = wrk(false, true)?;
    let relay_cpr = wrk(true, true)?;
    eprintln!("bench: latency on one connection, direct and through the interceptor");
    let one = Options {
        connections: 1,
        ..*options
    };
    let direct_one = run_wrk(None, &one, &[], &url)?;
    let relay_one = run_wrk(sandboxed.as_ref(), &one, &[], &url)?;
    eprintln!("bench: the same through an nginx reverse proxy, for reference");
    let (proxy_ka, proxy_cpr) = {
        let _proxy = Nginx::reverse_proxy(&dir)?;
        let proxy_url = format!("http://{NGINX_PROXY}/");
        (
            run_wrk(None, options, &[], &proxy_url)?,
            run_wrk(None, options, &["Connection: close"], &proxy_url)?,
        )
    };
    eprintln!("bench: relay RSS with {OPEN_CONNECTIONS} open connections");
    let (rss_idle, rss_open) = rss_with_open_connections(&bin, &dir, daemon.pid())?;
    eprintln!("bench: User Workers through the dispatcher");
    let workers = bench_workers(root, &dir, options)?;
    daemon.stop();

    let ratio = |a: &Measurement, b: &Measurement| a.requests_per_sec / b.requests_per_sec;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<40} {:>12} {:>10} {:>10} {:>8}",
        "run", "requests/s", "p50 µs", "p99 µs", "ratio"
    );
    for (name, m, base) in [
        ("keep-alive, direct", &direct_ka, &direct_ka),
        ("keep-alive, through interceptor", &relay_ka, &direct_ka),
        ("keep-alive, nginx reverse proxy", &proxy_ka, &direct_ka),
        ("conn per request, direct", &direct_cpr, &direct_cpr),
        (
            "conn per request, through interceptor",
            &relay_cpr,
            &direct_cpr,
        ),
        (
            "conn per request, nginx reverse proxy",
            &proxy_cpr,
            &direct_cpr,
        ),
        ("one connection, direct", &direct_one, &direct_one),
        (
            "one connection, through interceptor",
            &relay_one,
            &direct_one,
        ),
    ] {
        let _ = writeln!(
            table,
            "{name:<40} {:>12.0} {:>10.0} {:>10.0} {:>8.2}",
            m.requests_per_sec,
            m.p50_us,
            m.p99_us,
            ratio(m, base)
        );
    }
    let _ = writeln!(
        table,
        "added p50 latency: {:.0} µs on one connection, {:.0} µs at {} connections; \
         interceptor / nginx reverse proxy: {:.2} keep-alive, {:.2} conn per request\n\
         relay RSS: {:.1} MiB idle, {:.1} MiB with {OPEN_CONNECTIONS} open connections",
        relay_one.p50_us - direct_one.p50_us,
        relay_ka.p50_us - direct_ka.p50_us,
        options.connections,
        ratio(&relay_ka, &proxy_ka),
        ratio(&relay_cpr, &proxy_cpr),
        rss_idle as f64 / 1024.0,
        rss_open as f64 / 1024.0
    );
    let _ = writeln!(
        table,
        "\n{:<34} {:>12} {:>10} {:>10}",
        "User Workers", "requests/s", "p50 µs", "p99 µs"
    );
    for (name, m) in [
        ("hello through the dispatcher", Some(&workers.hello)),
        (
            "hello under wasmtime serve",
            workers.wasmtime_serve.as_ref(),
        ),
        (
            "fetch (one subrequest) via dispatcher",
            Some(&workers.fetch),
        ),
    ] {
        match m {
            Some(m) => {
                let _ = writeln!(
                    table,
                    "{name:<34} {:>12.0} {:>10.0} {:>10.0}",
                    m.requests_per_sec, m.p50_us, m.p99_us
                );
            }
            None => {
                let _ = writeln!(
                    table,
                    "{name:<34} (wasmtime not installed: cargo install wasmtime-cli)"
                );
            }
        }
    }
    if let Some(serve) = &workers.wasmtime_serve {
        let _ = writeln!(
            table,
            "dispatcher / wasmtime serve throughput: {:.2}",
            ratio(&workers.hello, serve)
        );
    }
    let _ = writeln!(
        table,
        "cold start (first request, file compiled in the background): median {:.1} ms; racing the compile: median {:.1} ms",
        workers.cold_ms, workers.cold_racing_ms
    );
    print!("{table}");

    let json = |m: &Measurement| {
        format!(
            "{{\"requests_per_sec\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}}}",
            m.requests_per_sec, m.p50_us, m.p99_us
        )
    };
    let report = format!(
        "{{\n  \"wrk\": {{\"threads\": 1, \"connections\": {}, \"seconds\": {}}},\n  \
         \"keep_alive\": {{\"direct\": {}, \"interceptor\": {}, \"ratio\": {:.3}, \"added_p50_us\": {:.1}, \"nginx_proxy\": {}, \"nginx_proxy_ratio\": {:.3}}},\n  \
         \"connection_per_request\": {{\"direct\": {}, \"interceptor\": {}, \"ratio\": {:.3}, \"nginx_proxy\": {}, \"nginx_proxy_ratio\": {:.3}}},\n  \
         \"one_connection\": {{\"direct\": {}, \"interceptor\": {}, \"added_p50_us\": {:.1}}},\n  \
         \"relay_rss_kib\": {{\"idle\": {rss_idle}, \"open_connections\": {OPEN_CONNECTIONS}, \"with_open_connections\": {rss_open}}},\n  \
         \"workers\": {{\"hello_dispatcher\": {}, \"hello_wasmtime_serve\": {}, \"fetch_dispatcher\": {}, \"cold_start_ms\": {:.2}, \"cold_start_racing_compile_ms\": {:.2}}}\n}}\n",
        options.connections,
        options.seconds,
        json(&direct_ka),
        json(&relay_ka),
        ratio(&relay_ka, &direct_ka),
        relay_ka.p50_us - direct_ka.p50_us,
        json(&proxy_ka),
        ratio(&proxy_ka, &direct_ka),
        json(&direct_cpr),
        json(&relay_cpr),
        ratio(&relay_cpr, &direct_cpr),
        json(&proxy_cpr),
        ratio(&proxy_cpr, &direct_cpr),
        json(&direct_one),
        json(&relay_one),
        relay_one.p50_us - direct_one.p50_us,
        json(&workers.hello),
        workers.wasmtime_serve.as_ref().map_or("null".to_string(), json),
        json(&workers.fetch),
        workers.cold_ms,
        workers.cold_racing_ms,
    );
    let path = dir.join("report.json");
    std::fs::write(&path, report)?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// wrk against `url`, from inside the bench tenant's sandbox when `sandboxed`
/// names the interceptor binary and its config.
fn run_wrk(
    sandboxed: Option<&(&Path, PathBuf)>,
    options: &Options,
    headers: &[&str],
    url: &str,
) -> Result<Measurement> {
    let mut cmd = match sandboxed {
        Some((bin, config)) => {
            let mut c = Command::new(bin);
            c.args(["exec", "--config"])
                .arg(config)
                .args(["--tenant", "bench", "--", "wrk"]);
            c
        }
        None => Command::new("wrk"),
    };
    cmd.args([
        "-t1",
        "-c",
        &options.connections.to_string(),
        "-d",
        &format!("{}s", options.seconds),
        "--latency",
    ]);
    for header in headers {
        cmd.args(["-H", header]);
    }
    cmd.arg(url);
    let out = cmd.output().context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

struct WorkerMeasurements {
    hello: Measurement,
    wasmtime_serve: Option<Measurement>,
    fetch: Measurement,
    cold_ms: f64,
    cold_racing_ms: f64,
}

/// The example Workers through the daemon's dispatcher (and `hello` under
/// `wasmtime serve` when the CLI is installed), and cold starts.
fn bench_workers(root: &Path, dir: &Path, options: &Options) -> Result<WorkerMeasurements> {
    let built = root.join("target/workers");
    let workers = dir.join("workers");
    for name in ["hello", "fetch"] {
        std::fs::copy(
            built.join(format!("{name}.wasm")),
            workers.join(format!("{name}.wasm")),
        )
        .with_context(|| format!("the example Worker {name} is not built"))?;
    }
    // Let the dispatcher compile them in the background first.
    thread::sleep(Duration::from_millis(1500));
    let url = format!("http://{DISPATCHER}/");
    let hello = run_wrk(None, options, &["Host: hello.workers.test"], &url)?;
    let fetch = run_wrk(
        None,
        options,
        &["Host: fetch.workers.test"],
        &format!("http://{DISPATCHER}/?url=http://{UPSTREAM}/"),
    )?;

    let mut cold = Vec::new();
    let mut racing = Vec::new();
    for n in 0..5 {
        let name = format!("cold{n}");
        std::fs::copy(
            built.join("hello.wasm"),
            workers.join(format!("{name}.wasm")),
        )?;
        thread::sleep(Duration::from_millis(1200));
        cold.push(timed_request(&format!("{name}.workers.test"))?);
        let name = format!("race{n}");
        let staging = dir.join(format!("{name}.wasm"));
        std::fs::copy(built.join("hello.wasm"), &staging)?;
        std::fs::rename(&staging, workers.join(format!("{name}.wasm")))?;
        racing.push(timed_request(&format!("{name}.workers.test"))?);
    }

    let wasmtime_serve = match wasmtime_cli().or_else(install_wasmtime_cli) {
        Some(wasmtime) => {
            let mut serve = Command::new(wasmtime)
                .args(["serve", "-S", "cli", "--addr", WASMTIME_SERVE])
                .arg(built.join("hello.wasm"))
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start wasmtime serve")?;
            let measured = wait_for_port(WASMTIME_SERVE).and_then(|()| {
                run_wrk(
                    None,
                    options,
                    &["Host: hello.workers.test"],
                    &format!("http://{WASMTIME_SERVE}/"),
                )
            });
            let _ = serve.kill();
            let _ = serve.wait();
            Some(measured?)
        }
        None => None,
    };
    Ok(WorkerMeasurements {
        hello,
        wasmtime_serve,
        fetch,
        cold_ms: median(&mut cold),
        cold_racing_ms: median(&mut racing),
    })
}

/// One HTTP/1.0 request to the dispatcher: milliseconds until the whole answer is in.
fn timed_request(host: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(DISPATCHER)?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if !answer.starts_with("HTTP/1.0 200") && !answer.starts_with("HTTP/1.1 200") {
        bail!("{host}: {}", answer.lines().next().unwrap_or(""));
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The comparison's `wasmtime serve`, the same wasmtime version as ours (once;
/// several minutes). `None` (comparison skipped) if it cannot be installed.
fn install_wasmtime_cli() -> Option<PathBuf> {
    eprintln!("bench: installing wasmtime-cli 48 for the `wasmtime serve` comparison (once)");
    let ok = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "wasmtime-cli", "--version", "48.0.8", "--locked"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("bench: wasmtime-cli could not be installed; skipping the comparison");
        return None;
    }
    wasmtime_cli()
}

/// `wasmtime` on PATH or in cargo's bin dir.
fn wasmtime_cli() -> Option<PathBuf> {
    let in_cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin/wasmtime"));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("wasmtime"))
            .find(|p| p.exists())
    });
    on_path.or(in_cargo.filter(|p| p.exists()))
}

/// Requests/s and the 50th/99th latency percentiles from `wrk --latency`.
fn parse_wrk(text: &str) -> Option<Measurement> {
    let mut m = Measurement::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            m.requests_per_sec = rest.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("50%") {
            m.p50_us = parse_duration_us(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            m.p99_us = parse_duration_us(rest.trim())?;
        }
    }
    (m.requests_per_sec > 0.0).then_some(m)
}

/// wrk prints `123.45us`, `1.23ms`, `2.00s`.
fn parse_duration_us(s: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Opens [`OPEN_CONNECTIONS`] kept-alive connections through the relay from a
/// sandboxed process, each with one request answered, and reads the daemon's RSS.
fn rss_with_open_connections(bin: &Path, dir: &Path, daemon_pid: u32) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let idle = rss_kib(daemon_pid)?;
    // The holder says "open" on stdout once every connection is up, and keeps them
    // until its stdin closes.
    let script = format!(
        "import resource,socket,sys\n\
         soft,hard=resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE,(min(hard,{n}+100),hard))\n\
         host,port='{UPSTREAM}'.split(':')\nsocks=[]\n\
         for i in range({n}):\n  s=socket.create_connection((host,int(port)))\n\
         \x20 s.sendall(b'GET / HTTP/1.1\\r\\nHost: {UPSTREAM}\\r\\n\\r\\n')\n  s.recv(4096)\n  socks.append(s)\n\
         print('open',flush=True)\nsys.stdin.read()\n",
        n = OPEN_CONNECTIONS,
    );
    let mut client = Command::new(bin)
        .args(["exec", "--config"])
        .arg(dir.join("interceptor.toml"))
        .args(["--tenant", "bench", "--", "python3", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(client.stdout.take().context("holder stdout")?).read_line(&mut line)?;
    if line.trim() != "open" {
        let status = client.wait()?;
        bail!("the connection holder failed ({status})");
    }
    let open = rss_kib(daemon_pid)?;
    drop(client.stdin.take());
    client.wait()?;
    Ok((idle, open))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// nginx from Debian, in one of two roles.
struct Nginx(Child);

impl Nginx {
    /// The upstream: fast enough that the relay is what is measured.
    fn upstream(dir: &Path) -> Result<Nginx> {
        Self::start(
            &dir.join("nginx"),
            "worker_processes 1;",
            &format!(
                "access_log off;\n  keepalive_requests 1000000;\n  \
                 server {{\n    listen {UPSTREAM} backlog=4096;\n    \
                 location / {{ return 200 \"hello from the bench upstream\\n\"; }}\n  }}"
            ),
            UPSTREAM,
        )
    }

    /// The reference: a tuned nginx reverse proxy in front of the same upstream,
    /// pooling upstream connections and writing an access log line per request
    /// (as the interceptor logs every request).
    fn reverse_proxy(dir: &Path) -> Result<Nginx> {
        let prefix = dir.join("nginx-proxy");
        Self::start(
            &prefix,
            "worker_processes auto;",
            &format!(
                "access_log {log};\n  keepalive_requests 1000000;\n  \
                 upstream bench {{ server {UPSTREAM}; keepalive 256; }}\n  \
                 server {{\n    listen {NGINX_PROXY} backlog=4096;\n    \
                 location / {{ proxy_pass http://bench; proxy_http_version 1.1; \
                 proxy_set_header Connection \"\"; }}\n  }}",
                log = prefix.join("logs/access.log").display()
            ),
            NGINX_PROXY,
        )
    }

    fn start(prefix: &Path, workers: &str, http: &str, listen: &str) -> Result<Nginx> {
        std::fs::create_dir_all(prefix.join("logs"))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "{workers}\ndaemon off;\nerror_log stderr error;\npid {pid};\n\
                 events {{ worker_connections 4096; }}\nhttp {{\n  {http}\n}}\n",
                pid = prefix.join("nginx.pid").display()
            ),
        )?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        wait_for_port(listen)?;
        Ok(Nginx(child))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would orphan them).
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

struct Daemon {
    child: Option<Child>,
    cgroup: Option<PathBuf>,
}

impl Daemon {
    fn start(bin: &Path, dir: &Path) -> Result<Daemon> {
        let config = dir.join("interceptor.toml");
        std::fs::write(
            &config,
            format!(
                "[interceptor]\nrelay = \"127.0.0.1:{RELAY_PORT}\"\ndns = \"127.0.0.1:{DNS_PORT}\"\n\
                 admin_socket = \"{run}/admin.sock\"\nlog_dir = \"{logs}\"\ncgroup = \"{CGROUP}\"\n\n\
                 [tenants.bench]\noutbound = \"egress\"\nparams = {{ customer_name = \"bench\" }}\n\n\
                 [outbound.egress]\ndefault = \"allow\"\nblock = [\"evil.example.com\"]\n\
                 allow_cidrs = [\"127.0.0.2/32\"]\nlog = true\n\n\
                 [[dispatch_namespaces]]\nnamespace = \"workers\"\nlisten = \"{DISPATCHER}\"\n\
                 workers = \"{workers}\"\n\
                 outbound = {{ service = \"egress\", parameters = [\"customer_name\", \"url\"] }}\n\
                 limits = {{ cpu_ms = 1000, memory_mb = 128, subrequests = 1000 }}\n",
                run = dir.join("run").display(),
                logs = dir.join("logs").display(),
                workers = dir.join("workers").display(),
            ),
        )?;
        let _ = std::fs::remove_dir_all(dir.join("workers"));
        std::fs::create_dir_all(dir.join("workers"))?;
        let _ = std::fs::remove_dir_all(dir.join("logs"));
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("INTERCEPTOR_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut daemon = Daemon {
            child: Some(child),
            cgroup: None,
        };
        wait_for_port(&format!("127.0.0.1:{RELAY_PORT}"))?;
        // The admin socket comes last; wait for it too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("run/admin.sock").exists() {
            if Instant::now() > deadline {
                bail!("the daemon did not start");
            }
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(100));
        daemon.cgroup = cgroup2_mount().map(|m| m.join(CGROUP));
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if let Some(cgroup) = &self.cgroup {
            remove_cgroup_tree(cgroup);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })
}

fn wait_for_port(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 1s test @ http://127.0.0.2:18080/\n  Latency Distribution\n     50%  120.00us\n     75%  1.50ms\n     90%  2.00ms\n     99%    1.20ms\n  1000 requests in 1.00s\nRequests/sec:  12345.67\n";
        let m = parse_wrk(text).unwrap();
        assert_eq!(m.requests_per_sec, 12345.67);
        assert_eq!(m.p50_us, 120.0);
        assert_eq!(m.p99_us, 1200.0);
    }
}
