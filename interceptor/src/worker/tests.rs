//! The Worker runtime served over an in-process socketpair, with the example
//! Workers of `examples/workers` (built by `cargo xtask build|test` into
//! `target/workers/NAME.wasm`; these tests skip when they are missing, unless
//! `INTERCEPTOR_REQUIRE_PRIVILEGED=1`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::outgoing::Outbound;
use super::{engine, precompile, serve_channel, Limits, Worker, CONTEXT_HEADER, ERROR_HEADER};

fn workers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("workers")
}

/// An example Worker: its precompiled bytes and the loaded component.
type Example = (Arc<Vec<u8>>, Component);

struct Loaded {
    engine: Engine,
    components: Mutex<HashMap<String, Example>>,
}

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| Loaded {
        engine: engine().expect("engine"),
        components: Mutex::new(HashMap::new()),
    })
}

/// The example Worker `name`, precompiled and loaded the way the daemon and
/// the Worker process do it; `None` (after saying so) when it is not built.
fn component(name: &str) -> Option<(Engine, Component)> {
    let loaded = loaded();
    let mut components = loaded.components.lock().unwrap();
    if let Some((_, c)) = components.get(name) {
        return Some((loaded.engine.clone(), c.clone()));
    }
    let path = workers_dir().join(format!("{name}.wasm"));
    let wasm = match std::fs::read(&path) {
        Ok(wasm) => wasm,
        Err(e) => {
            let message = format!(
                "{}: {e}; run `cargo xtask build` to build the example Workers",
                path.display()
            );
            if std::env::var("INTERCEPTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("{message}");
            }
            eprintln!("skipped: {message}");
            return None;
        }
    };
    let compiled = precompile(&loaded.engine, &wasm).expect("precompile");
    // SAFETY: produced just above by `precompile` with the same engine.
    let c = unsafe { Component::deserialize(&loaded.engine, &compiled) }.expect("deserialize");
    components.insert(name.to_string(), (Arc::new(compiled), c.clone()));
    Some((loaded.engine.clone(), c))
}

/// The precompiled bytes of example Worker `name` (see [`component`]).
fn precompiled(name: &str) -> Option<Arc<Vec<u8>>> {
    component(name)?;
    let components = loaded().components.lock().unwrap();
    components.get(name).map(|(bytes, _)| bytes.clone())
}

type Client = http2::SendRequest<Full<Bytes>>;

/// Serves Worker `name` on one end of a socketpair; the dispatcher's side of
/// the channel on the other.
async fn start(name: &str, limits: Limits, relay: SocketAddr) -> Option<(Client, Arc<Worker>)> {
    let (engine, component) = component(name)?;
    let worker = Worker::new(&engine, &component, relay, limits).expect("worker");
    let (ours, theirs) = tokio::net::UnixStream::pair().expect("socketpair");
    tokio::spawn(serve_channel(worker.clone(), theirs));
    let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    Some((client, worker))
}

fn unused_relay() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

async fn get(client: &Client, uri: &str, token: &str) -> (StatusCode, Response<()>, String) {
    let request = Request::builder()
        .uri(uri)
        .header(CONTEXT_HEADER, token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.clone().send_request(request).await.expect("send");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn error_kind(response: &Response<()>) -> Option<&str> {
    response
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_answers_and_never_sees_the_context() {
    let Some((client, _w)) = start("hello", Limits::default(), unused_relay()).await else {
        return;
    };
    let (status, _, body) = get(&client, "http://acme.example.com/path?q=1", "tok").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from acme");

    let (status, _, body) = get(&client, "http://acme.example.com/headers", "secret-token").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("hello from acme"), "{body}");
    assert!(
        !body.contains("secret-token"),
        "the guest saw the context: {body}"
    );
    assert!(
        !body.contains(CONTEXT_HEADER),
        "the guest saw the context: {body}"
    );

    // Many at once over the one channel.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            get(&client, &format!("http://w{i}.example.com/"), "t").await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, _, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("hello from w{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_trap_and_the_next_request_is_fine() {
    let Some((client, _w)) = start("hello", Limits::default(), unused_relay()).await else {
        return;
    };
    let (status, response, body) = get(&client, "http://acme.example.com/panic", "t").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_kind(&response), Some("trap"));
    assert!(body.starts_with("Worker trapped: "), "{body}");
    assert!(!body.contains('\n'), "one line: {body:?}");

    let (status, _, body) = get(&client, "http://acme.example.com/", "t").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_hits_the_cpu_limit_while_other_requests_answer() {
    let limits = Limits {
        cpu_ms: Some(50),
        memory_mb: Some(128),
    };
    let Some((client, _w)) = start("spin", limits, unused_relay()).await else {
        return;
    };
    // Two spinners: as many as the runtime has threads.
    let started = Instant::now();
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let r = get(&client, "http://spin.example.com/", "t").await;
                (r, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Meanwhile, requests of the same process that finish: they answer while
    // the spinners still run.
    for _ in 0..3 {
        let (status, _, body) = get(&client, "http://spin.example.com/?ms=1", "t").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "spun 1 ms");
    }
    let quick_done = started.elapsed();
    for spinner in spinners {
        let ((status, response, body), took) = spinner.await.unwrap();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error_kind(&response), Some("cpu"));
        assert_eq!(body, "Worker exceeded its CPU limit of 50 ms");
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
        assert!(
            quick_done < took,
            "the quick requests took {quick_done:?}, past the spinner's {took:?}"
        );
    }
    // Spinning for less than the limit is fine.
    let (status, _, body) = get(&client, "http://spin.example.com/?ms=20", "t").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hog_hits_the_memory_limit_while_other_requests_answer() {
    let limits = Limits {
        cpu_ms: Some(5_000),
        memory_mb: Some(32),
    };
    let Some((client, _w)) = start("hog", limits, unused_relay()).await else {
        return;
    };
    let hog = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, "http://hog.example.com/", "t").await })
    };
    let (status, _, body) = get(&client, "http://hog.example.com/?mb=4", "t").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "held 4 MiB");

    let (status, response, body) = hog.await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_kind(&response), Some("memory"));
    assert_eq!(body, "Worker exceeded its memory limit of 32 MiB");

    // The limit is per request: the next one starts from nothing.
    let (status, _, body) = get(&client, "http://hog.example.com/?mb=20", "t").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// What the test upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    peer: SocketAddr,
    target: String,
    headers: hyper::HeaderMap,
}

/// An HTTP/1.1 server on 127.0.0.2 that records each request and answers 200
/// with the request's target and its Authorization header as the body.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(Mutex::new(0));
    {
        let seen = seen.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                *connections.lock().unwrap() += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        let seen = seen.clone();
                        async move {
                            let target = req.uri().to_string();
                            let auth = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap_or("").to_string())
                                .unwrap_or_default();
                            seen.lock().unwrap().push(Seen {
                                peer,
                                target: target.clone(),
                                headers: req.headers().clone(),
                            });
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(format!("{target} auth={auth}")),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    (addr, seen, connections)
}

fn encode(url: &str) -> String {
    url.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_goes_to_the_relay_in_absolute_form_with_the_context() {
    let (relay, seen, _) = upstream().await;
    let Some((client, _w)) = start("fetch", Limits::default(), relay).await else {
        return;
    };
    // https:// too: plain HTTP to the relay, which originates the TLS.
    let url = encode("https://api.example.com/x?y=1");
    let forged = encode("x-interceptor-context:forged");
    let auth = encode("authorization:Bearer guest");
    let uri = format!("http://acme.example.com/?url={url}&header={forged}&header={auth}");
    let (status, response, body) = get(&client, &uri, "token-A").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "https://api.example.com/x?y=1 auth=Bearer guest");
    assert_eq!(response.headers().get("x-fetch-statuses").unwrap(), "200");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.target, "https://api.example.com/x?y=1");
    assert_eq!(request.headers.get("host").unwrap(), "api.example.com");
    let contexts: Vec<_> = request.headers.get_all(CONTEXT_HEADER).iter().collect();
    assert_eq!(
        contexts,
        ["token-A"],
        "the guest's own context must be replaced"
    );

    // http:// with a port, and another request's token.
    let url = encode("http://api.example.com:8080/plain");
    let (status, _, body) = get(
        &client,
        &format!("http://acme.example.com/?url={url}"),
        "token-B",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "http://api.example.com:8080/plain auth=");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_of_an_ip_literal_dials_it_and_keeps_the_connection() {
    let (upstream, seen, connections) = upstream().await;
    // The relay is elsewhere: an IP literal is dialled as it is.
    let Some((client, _w)) = start("fetch", Limits::default(), unused_relay()).await else {
        return;
    };
    let url = encode(&format!("http://{upstream}/direct"));
    let (status, response, body) = get(
        &client,
        &format!("http://acme.example.com/?url={url}&count=3"),
        "t",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, format!("http://{upstream}/direct auth="));
    assert_eq!(
        response.headers().get("x-fetch-statuses").unwrap(),
        "200,200,200"
    );
    let (status, _, _) = get(&client, &format!("http://acme.example.com/?url={url}"), "t").await;
    assert_eq!(status, StatusCode::OK);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|s| s.peer == seen[0].peer), "{seen:?}");
    assert_eq!(*connections.lock().unwrap(), 1, "kept alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_error_is_the_guests_to_handle() {
    // Nothing listens on the relay: the guest gets an error code, answers 502.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = listener.local_addr().unwrap();
    drop(listener);
    let Some((client, _w)) = start("fetch", Limits::default(), relay).await else {
        return;
    };
    let url = encode("https://api.example.com/");
    let (status, _, body) = get(&client, &format!("http://acme.example.com/?url={url}"), "t").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("ConnectionRefused"), "{body}");
}

#[test]
fn outgoing_requests_go_to_ip_literals_or_the_relay() {
    let relay: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let outbound = Outbound::new(relay);
    let addr = |uri: &str| outbound.connect_addr(&uri.parse().unwrap()).unwrap();
    assert_eq!(addr("https://api.example.com/x"), relay);
    assert_eq!(addr("http://api.example.com:8080/x"), relay);
    assert_eq!(addr("http://192.0.2.7/x"), "192.0.2.7:80".parse().unwrap());
    assert_eq!(
        addr("https://192.0.2.7/x"),
        "192.0.2.7:443".parse().unwrap()
    );
    assert_eq!(
        addr("http://192.0.2.7:8080/"),
        "192.0.2.7:8080".parse().unwrap()
    );
    assert_eq!(
        addr("http://[2001:db8::1]:81/"),
        "[2001:db8::1]:81".parse().unwrap()
    );
    assert_eq!(addr("https://[::1]/"), "[::1]:443".parse().unwrap());
}

/// The Worker process's side of `the_worker_process_*`: this test binary,
/// re-executed with fd 3 and fd 4 set up, becomes `interceptor worker`.
#[test]
fn worker_process_child() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::WorkerArgs,
    }
    let Ok(args) = std::env::var("INTERCEPTOR_TEST_WORKER_ARGS") else {
        return; // an ordinary test run
    };
    let cli = Cli::parse_from(std::iter::once("worker").chain(args.split(' ')));
    std::process::exit(super::run_process(cli.args));
}

/// Moves `fd` to a number >= 10 (close-on-exec), so the child's dup2 onto 3
/// and 4 cannot clobber it.
fn raise(fd: std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor we then own.
    let raised = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(raised >= 10, "{}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raised) }
}

/// Starts this test binary as a Worker process (see `worker_process_child`)
/// serving the precompiled `component`, the way the dispatcher does: fd 3 a
/// socketpair, fd 4 a memfd. Returns the process and the channel's client.
async fn spawn_worker_process(
    component: &[u8],
    args: &str,
) -> (std::process::Child, Client, tokio::task::JoinHandle<()>) {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;

    // SAFETY: memfd_create with a valid C string.
    let memfd = unsafe { libc::memfd_create(c"worker-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(memfd >= 0);
    // SAFETY: just created and owned by nobody else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(memfd) });
    file.write_all(component).unwrap();
    let component = raise(file.into());
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let theirs = raise(theirs.into());

    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "worker::tests::worker_process_child",
        "--test-threads=1",
        "--nocapture",
    ])
    .env("INTERCEPTOR_TEST_WORKER_ARGS", args)
    .stdout(std::process::Stdio::null());
    let (channel_fd, component_fd) = (theirs.as_raw_fd(), component.as_raw_fd());
    // SAFETY: only dup2, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(channel_fd, 3) != 3 || libc::dup2(component_fd, 4) != 4 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop((theirs, component));

    ours.set_nonblocking(true).unwrap();
    let ours = tokio::net::UnixStream::from_std(ours).unwrap();
    let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (child, client, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_process_serves_its_channel_and_exits_with_it() {
    let Some(precompiled) = precompiled("hello") else {
        return;
    };
    let (mut child, client, conn) = spawn_worker_process(
        &precompiled,
        "--name hello --relay 127.0.0.1:9 --cpu-ms 50 --memory-mb 64",
    )
    .await;
    let (status, _, body) = get(&client, "http://acme.example.com/", "t").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from acme");

    // The dispatcher hangs up: the process exits, successfully.
    drop(client);
    conn.abort();
    let _ = conn.await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Worker process did not exit when its channel closed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

/// Cold start and warm latency of `hello` over the channel; run it with
/// `cargo test --release -p interceptor --lib worker::tests::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_hello_latency() {
    let Some(bytes) = precompiled("hello") else {
        return;
    };
    // A whole Worker process: exec, engine, deserialize, first answer.
    let mut cold = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (mut child, client, conn) =
            spawn_worker_process(&bytes, "--name hello --relay 127.0.0.1:9").await;
        let (status, _, _) = get(&client, "http://acme.example.com/", "t").await;
        assert_eq!(status, StatusCode::OK);
        cold.push(t.elapsed());
        for _ in 0..100 {
            get(&client, "http://acme.example.com/", "t").await;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("");
        let vm = status
            .lines()
            .find(|l| l.starts_with("VmSize:"))
            .unwrap_or("");
        if cold.len() == 1 {
            eprintln!("process after 101 requests: {rss}, {vm}");
        }
        drop(client);
        conn.abort();
        let _ = child.wait();
    }
    cold.sort();
    eprintln!(
        "process: spawn to first answer, median of 5: {:?} (min {:?})",
        cold[2], cold[0]
    );

    for (label, pooling) in [("pooling", true), ("on-demand", false)] {
        // Cold: what a new Worker process does before its first answer.
        let t = Instant::now();
        let engine = if pooling {
            engine().unwrap()
        } else {
            super::engine_with(wasmtime::InstanceAllocationStrategy::OnDemand).unwrap()
        };
        let t_engine = t.elapsed();
        // SAFETY: produced by `precompile` with the same configuration.
        let component = unsafe { Component::deserialize(&engine, &bytes[..]) }.unwrap();
        let t_load = t.elapsed();
        let worker = Worker::new(
            &engine,
            &component,
            unused_relay(),
            Limits {
                cpu_ms: Some(50),
                memory_mb: Some(128),
            },
        )
        .unwrap();
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(serve_channel(worker, theirs));
        let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (status, _, _) = get(&client, "http://acme.example.com/", "t").await;
        assert_eq!(status, StatusCode::OK);
        let t_first = t.elapsed();

        // Warm: sequential requests, then 8 at a time.
        let n = 2000;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let (status, _, _) = get(&client, "http://acme.example.com/", "t").await;
            assert_eq!(status, StatusCode::OK);
            samples.push(t.elapsed());
        }
        samples.sort();
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..n / 8 {
                    get(&client, "http://acme.example.com/", "t").await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let throughput = n as f64 / t.elapsed().as_secs_f64();
        eprintln!(
            "{label}: engine {t_engine:?}, +deserialize {:?}, +first request {:?} (cold total {t_first:?}); \
             warm sequential p50 {:?} p90 {:?} p99 {:?}; 8 concurrent: {throughput:.0} req/s",
            t_load - t_engine,
            t_first - t_load,
            samples[n / 2],
            samples[n * 9 / 10],
            samples[n * 99 / 100],
        );
    }
}
