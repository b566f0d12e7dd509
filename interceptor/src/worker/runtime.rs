//! Serving a Worker: one fresh Store per request from a shared `ProxyPre`, the
//! CPU and memory limits, and the HTTP/2 channel to the dispatcher.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{CallHook, Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::outgoing::{Outbound, Outgoing};
use super::{WorkerError, CONTEXT_HEADER, ERROR_HEADER};

/// The epoch ticks every this long while requests are in flight.
const TICK: Duration = Duration::from_millis(1);
/// Table elements one instance may grow its tables to.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Host resources (fields, bodies, pollables...) one request may hold at once.
const MAX_RESOURCES: usize = 10_000;

/// Per-request limits of a Worker; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Milliseconds the guest's code may run (see the module documentation).
    pub cpu_ms: Option<u64>,
    /// MiB of linear memory.
    pub memory_mb: Option<u64>,
}

/// A loaded Worker: the linked component and what every request shares.
pub struct Worker {
    pre: ProxyPre<Host>,
    limits: Limits,
    outbound: Arc<Outbound>,
    clock: Arc<Clock>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Links `component` (of [`super::engine`]) as a `wasi:http/proxy` and
    /// starts the epoch ticker. Outgoing requests to host names go to `relay`.
    pub fn new(
        engine: &Engine,
        component: &Component,
        relay: SocketAddr,
        limits: Limits,
    ) -> Result<Arc<Self>, WorkerError> {
        let mut linker = Linker::<Host>::new(engine);
        // All of WASI (many toolchains import wasi:cli or wasi:filesystem even
        // for a proxy) with nothing behind it: no preopened directories, no
        // environment, no arguments, no network.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
            .map_err(|e| WorkerError::Engine(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(component)
            .and_then(ProxyPre::new)
            .map_err(|e| WorkerError::Link(format!("{e:#}")))?;

        let clock = Arc::new(Clock {
            engine: engine.clone(),
            ticks: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let ticker = {
            let clock = clock.clone();
            std::thread::Builder::new()
                .name("worker-epoch".into())
                .spawn(move || clock.run())
                .map_err(WorkerError::Runtime)?
        };
        *clock.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(ticker.thread().clone());

        Ok(Arc::new(Worker {
            pre,
            limits,
            outbound: Arc::new(Outbound::new(relay)),
            clock,
            ticker: Mutex::new(Some(ticker)),
        }))
    }

    /// Runs one request in a fresh instance and answers it: the guest's
    /// response, or a 500 saying why there is none. Never fails.
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<WasiBody> {
        // The context is for the runtime, never for the guest.
        let token = req.headers_mut().remove(CONTEXT_HEADER);
        let scheme = match req.uri().scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
            _ => Scheme::Http,
        };
        let active = self.clock.enter();
        let mut store = self.new_store(token);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let resources = store
            .data_mut()
            .http()
            .new_incoming_request(scheme, req)
            .and_then(|req| {
                let out = store.data_mut().http().new_response_outparam(tx)?;
                Ok((req, out))
            });
        let (req, out) = match resources {
            Ok(resources) => resources,
            Err(e) => {
                return failure(Failure::Trap(format!("Worker got a bad request: {e:#}")));
            }
        };

        let worker = self.clone();
        // The guest runs in a task of its own so it can go on writing the
        // body after it has handed over the response.
        let task = tokio::spawn(async move {
            let _active = active;
            let result = async {
                let proxy = worker.pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            }
            .await;
            result.map_err(|e| worker.classify(store.data(), e))
        });
        // Until the response is there, dropping this future (the dispatcher
        // gave up on the request) stops the guest.
        let task = AbortOnDrop(Some(task));

        match rx.await {
            Ok(Ok(response)) => {
                task.detach();
                response
            }
            Ok(Err(code)) => {
                task.detach();
                failure(Failure::Trap(format!(
                    "Worker answered with an error: {code:?}"
                )))
            }
            Err(_) => match task.join().await {
                Ok(Ok(())) => failure(Failure::Trap(
                    "Worker returned without setting a response".to_string(),
                )),
                Ok(Err(f)) => failure(f),
                Err(e) => failure(Failure::Trap(format!("Worker task failed: {e}"))),
            },
        }
    }

    fn new_store(&self, token: Option<HeaderValue>) -> Store<Host> {
        let mut wasi = WasiCtxBuilder::new();
        // The guest's stdout and stderr both go to the process's stderr (the
        // daemon logs it); stdin is empty.
        wasi.stdout(tokio::io::stderr()).stderr(tokio::io::stderr());
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let host = Host {
            table,
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            outgoing: Outgoing::new(self.outbound.clone(), token),
            memory: MemoryMeter {
                limit: self
                    .limits
                    .memory_mb
                    .map(|mb| usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)),
                total: 0,
                exceeded: false,
            },
            cpu: CpuMeter {
                budget: self.limits.cpu_ms,
                used: 0,
                in_guest: false,
                since: 0,
                exceeded: false,
                clock: self.clock.clone(),
                paused: Arc::new(AtomicU64::new(0)),
            },
        };
        let mut store = Store::new(self.pre.engine(), host);
        store.limiter(|host| &mut host.memory);
        store.call_hook(|mut cx, hook| {
            let cpu = &mut cx.data_mut().cpu;
            match hook {
                CallHook::CallingWasm | CallHook::ReturningFromHost => cpu.enter(),
                CallHook::CallingHost | CallHook::ReturningFromWasm => cpu.leave(),
            }
            Ok(())
        });
        store.epoch_deadline_callback(|mut cx| {
            let cpu = &mut cx.data_mut().cpu;
            cpu.enter();
            cpu.charge();
            if cpu.over_budget() {
                cpu.exceeded = true;
                return Err(wasmtime::Error::msg("the Worker exceeded its CPU limit"));
            }
            // Let the other requests on this thread run, and do not charge the
            // guest for the time it waits to be scheduled again.
            let clock = cpu.clock.clone();
            let paused = cpu.paused.clone();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    let start = clock.now();
                    tokio::task::yield_now().await;
                    paused.fetch_add(clock.now().saturating_sub(start), Ordering::Relaxed);
                }),
            ))
        });
        store.set_epoch_deadline(1);
        store
    }

    fn classify(&self, host: &Host, error: wasmtime::Error) -> Failure {
        if host.cpu.exceeded {
            Failure::Cpu(self.limits.cpu_ms.unwrap_or_default())
        } else if host.memory.exceeded {
            Failure::Memory(self.limits.memory_mb.unwrap_or_default())
        } else {
            Failure::Trap(trap_message(&error))
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.clock.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// Serves the dispatcher's HTTP/2 connection on `io` until it closes; each
/// request runs concurrently. Returns when the peer hangs up.
pub async fn serve_channel<S>(worker: Arc<Worker>, io: S) -> Result<(), WorkerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let worker = worker.clone();
        async move { Ok::<_, std::convert::Infallible>(worker.handle(req).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(super::MAX_CONCURRENT_REQUESTS)
        .serve_connection(TokioIo::new(io), service)
        .await
        .map_err(WorkerError::Serve)
}

/// Why a request got no response from the guest.
#[derive(Debug)]
enum Failure {
    Cpu(u64),
    Memory(u64),
    Trap(String),
}

fn failure(f: Failure) -> Response<WasiBody> {
    let (kind, message) = match f {
        Failure::Cpu(ms) => ("cpu", format!("Worker exceeded its CPU limit of {ms} ms")),
        Failure::Memory(mb) => (
            "memory",
            format!("Worker exceeded its memory limit of {mb} MiB"),
        ),
        Failure::Trap(message) => ("trap", message),
    };
    let mut response = Response::new(
        Full::new(Bytes::from(message))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    let headers = response.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(kind));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// "Worker trapped: <the trap>" (or the error that ended the guest), on one
/// line; the wasm backtrace, if any, goes to the log only.
fn trap_message(error: &wasmtime::Error) -> String {
    tracing::debug!("Worker error: {error:?}");
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        return format!("Worker trapped: {trap}");
    }
    let root = error.root_cause().to_string();
    let line = root.lines().next().unwrap_or_default();
    format!("Worker failed: {line}")
}

/// A task aborted when dropped, unless detached.
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    fn detach(mut self) {
        self.0 = None;
    }

    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        let handle = self.0.take().expect("joined once");
        handle.await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// The store data of one request.
pub(super) struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    outgoing: Outgoing,
    memory: MemoryMeter,
    cpu: CpuMeter,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outgoing,
        }
    }
}

/// The memory limit: the total of the instance's linear memories.
struct MemoryMeter {
    limit: Option<usize>,
    total: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if self.limit.is_some_and(|limit| total > limit) {
            self.exceeded = true;
            return Err(wasmtime::Error::msg("the Worker exceeded its memory limit"));
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|max| desired <= max))
    }
}

/// The CPU limit: epoch ticks that pass while the guest's code runs.
struct CpuMeter {
    budget: Option<u64>,
    used: u64,
    in_guest: bool,
    /// The tick the current stretch in the guest began at.
    since: u64,
    exceeded: bool,
    clock: Arc<Clock>,
    /// Ticks spent yielded (to other requests) since `since`.
    paused: Arc<AtomicU64>,
}

impl CpuMeter {
    fn enter(&mut self) {
        if !self.in_guest {
            self.in_guest = true;
            self.since = self.clock.now();
            self.paused.store(0, Ordering::Relaxed);
        }
    }

    fn leave(&mut self) {
        if self.in_guest {
            self.charge();
            self.in_guest = false;
        }
    }

    /// Adds the ticks of the current stretch so far to `used`.
    fn charge(&mut self) {
        let now = self.clock.now();
        let paused = self.paused.swap(0, Ordering::Relaxed);
        self.used += now.saturating_sub(self.since).saturating_sub(paused);
        self.since = now;
    }

    fn over_budget(&self) -> bool {
        self.budget.is_some_and(|budget| self.used > budget)
    }
}

/// The epoch ticker's state: it ticks only while requests are in flight, so an
/// idle Worker process costs nothing.
struct Clock {
    engine: Engine,
    ticks: AtomicU64,
    active: AtomicUsize,
    stop: AtomicBool,
    thread: Mutex<Option<std::thread::Thread>>,
}

impl Clock {
    fn now(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    fn run(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.active.load(Ordering::Acquire) == 0 {
                std::thread::park();
                continue;
            }
            // Tick against absolute deadlines, so that sleeps that overshoot
            // (timer slack, scheduling) do not slow the clock down; after a
            // long stall, start afresh rather than tick in a burst.
            let mut start = std::time::Instant::now();
            let mut n: u32 = 0;
            while self.active.load(Ordering::Acquire) > 0 && !self.stop.load(Ordering::Relaxed) {
                n += 1;
                let due = start + TICK * n;
                let now = std::time::Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                } else if now - due > TICK * 10 || n > 1_000_000 {
                    start = now;
                    n = 0;
                }
                self.ticks.fetch_add(1, Ordering::Relaxed);
                self.engine.increment_epoch();
            }
        }
    }

    /// Marks a request in flight until the guard is dropped.
    fn enter(self: &Arc<Self>) -> Active {
        if self.active.fetch_add(1, Ordering::AcqRel) == 0 {
            if let Some(thread) = &*self.thread.lock().unwrap_or_else(|e| e.into_inner()) {
                thread.unpark();
            }
        }
        Active(self.clone())
    }
}

struct Active(Arc<Clock>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}
