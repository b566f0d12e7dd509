//! Dispatch namespaces (SPEC §8): one HTTP/1.1 listener per
//! `[[dispatch_namespaces]]`, routing each request by its Host's first label to
//! the User Worker `workers/NAME.wasm`.
//!
//! Each Worker runs in one long-lived sandboxed process ([`process`]), started
//! on its first request and reused; the dispatcher talks HTTP/2 to it over a
//! private socketpair and adds the signed request context
//! ([`crate::context`]) that carries the outbound parameters. The file's
//! identity is checked on every request ([`artifact::FileStamp`]): a changed
//! file is hashed, compiled once per content hash (cached in memory, and on
//! disk across restarts: [`crate::wasm::cache`]) and served
//! by a new process, the old one retired after its in-flight requests; a
//! removed file gives 404 and retires the process. A process that dies is
//! restarted on the next request, with a backoff while it keeps dying.
//!
//! The folder is also watched ([`watch`]): files present at start and files
//! written or renamed into place later are compiled at once, in the
//! background, and a changed Worker that had a process gets its new one right
//! away, so the first request after a deploy does not wait for the compiler.

pub mod artifact;
pub mod process;
pub mod route;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_until;
use crate::config::{Config, DispatchNamespace, SandboxLimits};
use crate::context::{ContextKey, RequestContext, CONTEXT_HEADER};
use crate::policy::{OutboundPolicy, Params};
use crate::tenants::{SandboxRegistry, WorkerId};
use crate::wasm::cache::CompileCache;
use artifact::{read_worker_file, Artifact, ArtifactCache, ContentHash, FileStamp};
use process::{Lease, Process, SpawnSpec};

/// A Worker must start answering a request within this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A client must send a request's headers within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Restart backoff: doubles from the first to the last while a process keeps dying.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A process that lived this long before dying resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often a workers folder that does not exist is looked for again.
const RETRY_WATCH: Duration = Duration::from_secs(2);

pub type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("the Worker runtime cannot start: {0}")]
    Engine(String),
    #[error("dispatch namespace {namespace}: outbound `{service}` is not defined")]
    UnknownOutbound { namespace: String, service: String },
}

/// What `interceptor status` shows of a namespace.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamespaceStatus {
    pub namespace: String,
    pub listen: String,
    pub workers_dir: PathBuf,
    /// Worker processes running now.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub pid: u32,
    /// Requests served by this Worker since the daemon started (all its processes).
    pub requests: u64,
    /// Requests the current process is serving.
    pub in_flight: usize,
    /// Processes started for this Worker so far.
    pub starts: u64,
    /// The first 12 hex digits of the SHA-256 of the `.wasm` it runs.
    pub component: String,
    /// The uid its process runs as.
    #[serde(default)]
    pub uid: u32,
}

/// What every namespace shares: the runtime, the compiled components, the key.
struct Shared {
    engine: wasmtime::Engine,
    cache: ArtifactCache,
    /// Compiled components kept across restarts; `None` if the state
    /// directory cannot be used (then every start compiles).
    disk: Option<CompileCache>,
    key: Arc<ContextKey>,
    sandboxes: Arc<SandboxRegistry>,
    /// The rlimits of every Worker process.
    limits: SandboxLimits,
    relay: SocketAddr,
    exe: PathBuf,
    next_request: AtomicU64,
    /// One compilation per content hash at a time.
    compiling: Mutex<HashMap<ContentHash, Arc<tokio::sync::Mutex<()>>>>,
    /// Stops every Worker process, retired ones included.
    kill_all: CancellationToken,
    /// Process monitors, channels and stderr readers.
    tasks: TaskTracker,
}

/// Every dispatch namespace of the daemon.
pub struct Dispatchers {
    shared: Option<Arc<Shared>>,
    namespaces: Vec<Arc<Namespace>>,
}

impl Dispatchers {
    /// Prepares the namespaces (the Worker runtime is created only if there is
    /// one) and kills Worker processes a previous daemon may have left behind.
    pub fn new(
        config: &Config,
        sandboxes: Arc<SandboxRegistry>,
        policies: &BTreeMap<String, Arc<OutboundPolicy>>,
        key: Arc<ContextKey>,
        limits: SandboxLimits,
    ) -> Result<Dispatchers, DispatchError> {
        if config.dispatch_namespaces.is_empty() {
            return Ok(Dispatchers {
                shared: None,
                namespaces: Vec::new(),
            });
        }
        let engine = crate::worker::engine().map_err(|e| DispatchError::Engine(e.to_string()))?;
        let disk = match CompileCache::open(&config.interceptor.state_dir, &engine) {
            Ok(disk) => Some(disk),
            Err(e) => {
                tracing::warn!("{e}; Worker components are compiled again at every start");
                None
            }
        };
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(SELF_EXE));
        let shared = Arc::new(Shared {
            engine,
            cache: ArtifactCache::default(),
            disk,
            key,
            sandboxes: sandboxes.clone(),
            limits,
            relay: config.interceptor.relay.into(),
            exe,
            next_request: AtomicU64::new(1),
            compiling: Mutex::new(HashMap::new()),
            kill_all: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let mut namespaces = Vec::new();
        for ns in &config.dispatch_namespaces {
            let policy = match &ns.outbound {
                Some(o) => policies.get(&o.service).cloned().ok_or_else(|| {
                    DispatchError::UnknownOutbound {
                        namespace: ns.namespace.clone(),
                        service: o.service.clone(),
                    }
                })?,
                None => Arc::new(OutboundPolicy::default()),
            };
            kill_stale(&sandboxes.root().join(&ns.namespace));
            namespaces.push(Arc::new(Namespace {
                config: ns.clone(),
                policy,
                shared: shared.clone(),
                slots: Mutex::new(HashMap::new()),
            }));
        }
        Ok(Dispatchers {
            shared: Some(shared),
            namespaces,
        })
    }

    /// The addresses to bind, in the order [`serve`](Self::serve) expects the listeners.
    pub fn listen_addresses(config: &Config) -> Vec<SocketAddr> {
        config
            .dispatch_namespaces
            .iter()
            .map(|n| n.listen)
            .collect()
    }

    /// Serves each namespace on its listener (same order as the config) until
    /// `shutdown`; connections run on `tracker`.
    pub fn serve(
        &self,
        listeners: Vec<TcpListener>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        for (ns, listener) in self.namespaces.iter().zip(listeners) {
            tracing::info!(
                namespace = %ns.config.namespace,
                listen = %ns.config.listen,
                workers = %ns.config.workers.display(),
                "dispatcher ready"
            );
            tokio::spawn(ns.clone().watch_loop(shutdown.clone()));
            if let Some(idle_timeout) = ns.config.idle_timeout {
                tokio::spawn(ns.clone().stop_idle_loop(idle_timeout, shutdown.clone()));
            }
            let what = format!("dispatcher {}", ns.config.namespace);
            let (ns, shutdown, tracker) = (ns.clone(), shutdown.clone(), tracker.clone());
            tokio::spawn(async move {
                accept_until(listener, shutdown.clone(), &what, |stream, _| {
                    tracker.spawn(serve_connection(stream, ns.clone(), shutdown.clone()));
                })
                .await
            });
        }
    }

    /// Stops every Worker process (SIGTERM, SIGKILL after a grace period) and
    /// reaps them. Call once the listeners' in-flight requests are done.
    pub async fn stop(&self) {
        let Some(shared) = &self.shared else { return };
        let mut count = 0;
        for ns in &self.namespaces {
            for slot in ns.slots() {
                if let Some(p) = slot.take_current() {
                    p.kill();
                    count += 1;
                }
            }
        }
        // Retired processes still finishing a request are stopped too.
        shared.kill_all.cancel();
        shared.tasks.close();
        if count > 0 {
            tracing::info!("stopping {count} Worker process(es)");
        }
        if tokio::time::timeout(process::TERM_GRACE * 2, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Worker processes still not reaped");
        }
    }

    pub fn status(&self) -> Vec<NamespaceStatus> {
        self.namespaces.iter().map(|ns| ns.status()).collect()
    }
}

const SELF_EXE: &str = "/proc/self/exe";

/// What a Worker process runs: the daemon's own executable, by its path (so
/// that ps shows its name) while that path still is the running binary, else
/// through /proc/self/exe (replaced on disk by an upgrade: Workers keep running
/// the daemon's version).
fn worker_exe(path: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let same = match (std::fs::metadata(path), std::fs::metadata(SELF_EXE)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if same {
        path.to_path_buf()
    } else {
        PathBuf::from(SELF_EXE)
    }
}

/// Kills whatever runs in a namespace's cgroup subtree (left by a daemon that crashed).
fn kill_stale(dir: &Path) {
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        if let Err(e) = std::fs::write(&kill, "1") {
            tracing::warn!("{}: {e}", kill.display());
        }
    }
}

async fn serve_connection(stream: TcpStream, ns: Arc<Namespace>, shutdown: CancellationToken) {
    let service = service_fn(move |req| {
        let ns = ns.clone();
        async move { Ok::<_, Infallible>(ns.handle(req).await) }
    });
    crate::accept::serve_http1(stream, service, HEADER_TIMEOUT, shutdown, "dispatcher").await;
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_found() -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|e| match e {}).boxed());
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}

fn error(message: impl Into<String>) -> Response<Body> {
    full(StatusCode::INTERNAL_SERVER_ERROR, message.into())
}

/// Why a request gets no Worker.
enum Refusal {
    NotFound,
    Error(String),
}

/// One `[[dispatch_namespaces]]`.
struct Namespace {
    config: DispatchNamespace,
    policy: Arc<OutboundPolicy>,
    shared: Arc<Shared>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// A Worker name's process and what it was started from.
struct Slot {
    name: String,
    /// Held while the file is checked and the process (re)started, so that
    /// concurrent first requests share one start.
    update: tokio::sync::Mutex<SlotState>,
    current: Mutex<Option<Arc<Process>>>,
    served: AtomicU64,
    starts: AtomicU64,
}

#[derive(Default)]
struct SlotState {
    /// The file version the fields below are for.
    stamp: Option<FileStamp>,
    artifact: Option<Arc<Artifact>>,
    /// Why that version cannot run (a compile error), if it cannot.
    error: Option<String>,
    /// Processes that died in a row, each soon after its start.
    failures: u32,
    not_before: Option<Instant>,
}

impl Slot {
    fn current(&self) -> Option<Arc<Process>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_current(&self, p: Option<Arc<Process>>) -> Option<Arc<Process>> {
        std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|e| e.into_inner()),
            p,
        )
    }

    fn take_current(&self) -> Option<Arc<Process>> {
        self.set_current(None)
    }
}

fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    BACKOFF_FIRST
        .saturating_mul(1u32 << (failures - 1).min(16))
        .min(BACKOFF_MAX)
}

impl Namespace {
    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    name: name.to_string(),
                    update: tokio::sync::Mutex::new(SlotState::default()),
                    current: Mutex::new(None),
                    served: AtomicU64::new(0),
                    starts: AtomicU64::new(0),
                })
            })
            .clone()
    }

    fn existing_slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn status(&self) -> NamespaceStatus {
        let mut workers: Vec<WorkerStatus> = self
            .slots()
            .into_iter()
            .filter_map(|slot| {
                let p = slot.current()?;
                if p.has_exited() {
                    return None;
                }
                Some(WorkerStatus {
                    name: slot.name.clone(),
                    pid: p.pid,
                    requests: slot.served.load(Ordering::Relaxed),
                    in_flight: p.inflight(),
                    starts: slot.starts.load(Ordering::Relaxed),
                    component: p.hash.short(),
                    uid: p.uid,
                })
            })
            .collect();
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        NamespaceStatus {
            namespace: self.config.namespace.clone(),
            listen: self.config.listen.to_string(),
            workers_dir: self.config.workers.clone(),
            workers,
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let Some(authority) = route::authority(&req) else {
            return not_found();
        };
        let Some(name) = route::worker_name(&authority) else {
            return not_found();
        };
        let path = self.config.workers.join(format!("{name}.wasm"));
        let lease = match self.acquire(&name, &path).await {
            Ok(lease) => lease,
            Err(Refusal::NotFound) => return not_found(),
            Err(Refusal::Error(message)) => {
                tracing::warn!(namespace = %self.config.namespace, worker = %name, "{message}");
                return error(message);
            }
        };
        let (mut parts, body) = req.into_parts();
        let Some(url) = route::full_url(&authority, &parts.uri) else {
            return full(
                StatusCode::BAD_REQUEST,
                "the request target is not a URL path",
            );
        };
        let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let mut params = Params::new();
        if let Some(outbound) = &self.config.outbound {
            for p in &outbound.parameters {
                match p.as_str() {
                    "customer_name" => {
                        params.insert(p.clone(), name.clone());
                    }
                    "url" => {
                        params.insert(p.clone(), url.to_string());
                    }
                    _ => {}
                }
            }
        }
        let token = self.shared.key.sign(&RequestContext {
            namespace: self.config.namespace.clone(),
            worker: name.clone(),
            request_id,
            params,
            subrequest_limit: self.config.limits.subrequests,
        });
        route::strip_headers(&mut parts.headers);
        match route::context_value(&token) {
            Some(value) => {
                parts.headers.insert(CONTEXT_HEADER, value);
            }
            None => return error("cannot encode the request context"),
        }
        parts.uri = url;
        parts.version = Version::HTTP_2;
        let method = parts.method.clone();
        let request = Request::from_parts(parts, body);
        let sent = tokio::time::timeout(REQUEST_TIMEOUT, lease.process().send(request)).await;
        let response = match sent {
            Err(_) => Err(format!(
                "Worker did not answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            )),
            Ok(result) => result,
        };
        match response {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                parts.version = Version::HTTP_11;
                tracing::debug!(
                    namespace = %self.config.namespace,
                    worker = %name,
                    pid = lease.process().pid,
                    request_id,
                    %method,
                    status = parts.status.as_u16(),
                    ms = started.elapsed().as_millis() as u64,
                    "dispatched"
                );
                // The lease lives as long as the body: a retired process is
                // stopped only after the response is sent.
                let body = body
                    .map_frame(move |frame| {
                        let _ = &lease;
                        frame
                    })
                    .boxed();
                Response::from_parts(parts, body)
            }
            Err(message) => {
                tracing::warn!(
                    namespace = %self.config.namespace,
                    worker = %name,
                    pid = lease.process().pid,
                    request_id,
                    "{message}"
                );
                error(message)
            }
        }
    }

    /// A lease on a running process of the Worker whose file is `path`.
    async fn acquire(&self, name: &str, path: &Path) -> Result<Lease, Refusal> {
        let stamp = match std::fs::metadata(path) {
            Ok(meta) => FileStamp::of(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(name).await;
                return Err(Refusal::NotFound);
            }
            Err(e) => {
                return Err(Refusal::Error(format!(
                    "cannot read Worker {name}: {}: {e}",
                    path.display()
                )))
            }
        };
        let slot = self.slot(name);
        let mut state = slot.update.lock().await;
        if state.stamp != Some(stamp) {
            self.load(&slot, &mut state, path).await?;
        }
        if let Some(message) = &state.error {
            return Err(Refusal::Error(message.clone()));
        }
        let artifact = state
            .artifact
            .clone()
            .ok_or_else(|| Refusal::Error("no component".into()))?;
        if let Some(current) = slot.current() {
            if let Some(lease) = current.lease() {
                slot.served.fetch_add(1, Ordering::Relaxed);
                return Ok(lease);
            }
            // It died (or closed its channel): replace it, with a backoff
            // while processes keep dying soon after starting.
            slot.take_current();
            current.retire();
            if let Some((at, status)) = current.exit() {
                let lived = at.saturating_duration_since(current.started);
                state.failures = if lived < STABLE_AFTER {
                    state.failures + 1
                } else {
                    1
                };
                state.not_before = Some(at + backoff(state.failures));
                tracing::info!(
                    namespace = %self.config.namespace,
                    worker = %name,
                    pid = current.pid,
                    "restarting the Worker ({status}, after {:?}, backoff {:?})",
                    lived,
                    backoff(state.failures)
                );
            }
        }
        if let Some(not_before) = state.not_before {
            tokio::time::sleep_until(not_before.into()).await;
        }
        let process = match self.start(name, &artifact).await {
            Ok(p) => p,
            Err(message) => {
                state.failures += 1;
                state.not_before = Some(Instant::now() + backoff(state.failures));
                return Err(Refusal::Error(message));
            }
        };
        slot.starts.fetch_add(1, Ordering::Relaxed);
        slot.set_current(Some(process.clone()));
        let lease = process
            .lease()
            .ok_or_else(|| Refusal::Error(process::EXITED_MESSAGE.to_string()))?;
        slot.served.fetch_add(1, Ordering::Relaxed);
        Ok(lease)
    }

    /// Reads the file that changed; a new content hash means a new component
    /// (compiled unless cached) and retires the process running the old one.
    /// True when it retired one.
    async fn load(&self, slot: &Slot, state: &mut SlotState, path: &Path) -> Result<bool, Refusal> {
        let name = &slot.name;
        let owned = path.to_path_buf();
        let read = tokio::task::spawn_blocking(move || read_worker_file(&owned))
            .await
            .map_err(|e| Refusal::Error(format!("reading Worker {name}: {e}")))?;
        let (stamp, bytes) = match read {
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Refusal::NotFound),
            Err(e) => {
                return Err(Refusal::Error(format!(
                    "cannot read Worker {name}: {}: {e}",
                    path.display()
                )))
            }
        };
        let hash = ContentHash::of(&bytes);
        let same = state.artifact.as_ref().map(|a| a.hash) == Some(hash) && state.error.is_none();
        state.stamp = Some(stamp);
        if same {
            return Ok(false);
        }
        let retired = slot.take_current();
        if let Some(old) = &retired {
            tracing::info!(
                namespace = %self.config.namespace,
                worker = %name,
                pid = old.pid,
                old = %old.hash.short(),
                new = %hash.short(),
                "Worker changed; retiring its process"
            );
            old.retire();
        }
        state.failures = 0;
        state.not_before = None;
        match self.compile(hash, bytes).await {
            Ok(artifact) => {
                state.artifact = Some(artifact);
                state.error = None;
            }
            Err(message) => {
                tracing::warn!(namespace = %self.config.namespace, worker = %name, "{message}");
                state.artifact = None;
                state.error = Some(message);
            }
        }
        Ok(retired.is_some())
    }

    /// Compiles a Worker file that was written (and starts its new process
    /// when an old one was running), before any request asks for it.
    async fn prepare(&self, name: &str) {
        let path = self.config.workers.join(format!("{name}.wasm"));
        let stamp = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => FileStamp::of(&meta),
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(name).await;
                return;
            }
            Err(_) => return,
        };
        let slot = self.slot(name);
        let mut state = slot.update.lock().await;
        if state.stamp == Some(stamp) {
            return;
        }
        let Ok(true) = self.load(&slot, &mut state, &path).await else {
            return;
        };
        let Some(artifact) = state.artifact.clone() else {
            return;
        };
        match self.start(name, &artifact).await {
            Ok(process) => {
                slot.starts.fetch_add(1, Ordering::Relaxed);
                slot.set_current(Some(process));
            }
            Err(message) => {
                tracing::warn!(namespace = %self.config.namespace, worker = %name, "{message}")
            }
        }
    }

    /// Stops Worker processes that had no request for `idle_timeout`, until
    /// `shutdown`: a namespace of many Workers keeps processes for the busy ones
    /// only. The next request starts a new process, without a restart backoff.
    async fn stop_idle_loop(self: Arc<Self>, idle_timeout: Duration, shutdown: CancellationToken) {
        let every = (idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            for slot in self.slots() {
                // Requests lease under this lock: none can start on the process
                // between the check and the retirement. A slot being loaded or
                // started is not idle.
                let Ok(mut state) = slot.update.try_lock() else {
                    continue;
                };
                // A dead one is left to the next request, which counts it
                // towards the restart backoff.
                let Some(current) = slot.current().filter(|p| !p.has_exited()) else {
                    continue;
                };
                if current.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    slot.take_current();
                    current.retire();
                    // It ran stably: earlier crashes no longer count.
                    if current.started.elapsed() >= STABLE_AFTER {
                        state.failures = 0;
                        state.not_before = None;
                    }
                    tracing::info!(
                        namespace = %self.config.namespace,
                        worker = %slot.name,
                        pid = current.pid,
                        "stopping the Worker process: no request for {}s",
                        idle_timeout.as_secs()
                    );
                }
            }
        }
    }

    /// Compiles what the folder holds, then follows its changes until `shutdown`.
    async fn watch_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let dir = self.config.workers.clone();
        let mut watch = match watch::DirWatch::new() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(namespace = %self.config.namespace, "cannot watch {}: {e}; Workers are compiled on their first request", dir.display());
                return;
            }
        };
        loop {
            if !watch.is_watching() {
                if watch.watch(&dir).is_err() {
                    // Not there (yet): requests still find files; look again later.
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_WATCH) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
                let names: Vec<String> = std::fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| {
                        watch::worker_of(&e.file_name().to_string_lossy()).map(str::to_string)
                    })
                    .collect();
                for name in names {
                    tokio::select! {
                        () = self.prepare(&name) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
            let events = tokio::select! {
                events = watch.next() => events,
                () = shutdown.cancelled() => return,
            };
            let events = match events {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(namespace = %self.config.namespace, "watching {}: {e}", dir.display());
                    return;
                }
            };
            for event in events {
                let (watch::Event::Written(file) | watch::Event::Removed(file)) = &event else {
                    continue;
                };
                let Some(name) = watch::worker_of(file) else {
                    continue;
                };
                tokio::select! {
                    () = self.prepare(name) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    async fn compile(&self, hash: ContentHash, bytes: Vec<u8>) -> Result<Arc<Artifact>, String> {
        if let Some(found) = self.shared.cache.get(&hash) {
            return Ok(found);
        }
        // The same component deployed under many names at once compiles once.
        let gate = self
            .shared
            .compiling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(hash)
            .or_default()
            .clone();
        let result = {
            let _turn = gate.lock().await;
            match self.shared.cache.get(&hash) {
                Some(found) => Ok(found),
                None => self.compile_now(hash, bytes).await,
            }
        };
        let mut compiling = self
            .shared
            .compiling
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else waits on it.
        if Arc::strong_count(&gate) == 2 {
            compiling.remove(&hash);
        }
        result
    }

    async fn compile_now(
        &self,
        hash: ContentHash,
        bytes: Vec<u8>,
    ) -> Result<Arc<Artifact>, String> {
        let shared = self.shared.clone();
        let started = Instant::now();
        let (sealed, origin) = tokio::task::spawn_blocking(move || {
            artifact::load_or_compile(&shared.engine, shared.disk.as_ref(), hash, &bytes)
        })
        .await
        .map_err(|e| format!("Worker compile error: {e}"))??;
        let ms = started.elapsed().as_millis() as u64;
        let namespace = &self.config.namespace;
        let component = hash.short();
        match origin {
            artifact::Origin::DiskCache => {
                tracing::debug!(%namespace, %component, bytes = sealed.size, ms, "loaded precompiled component from cache")
            }
            artifact::Origin::Compiled => {
                tracing::info!(%namespace, %component, bytes = sealed.size, ms, "compiled Worker component")
            }
        }
        Ok(self.shared.cache.insert(sealed))
    }

    async fn start(&self, name: &str, artifact: &Arc<Artifact>) -> Result<Arc<Process>, String> {
        let started = Instant::now();
        let id = WorkerId {
            namespace: self.config.namespace.clone(),
            name: name.to_string(),
        };
        let sandbox = self
            .shared
            .sandboxes
            .open_worker(&id, self.policy.clone())
            .map_err(|e| format!("cannot start Worker {name}: {e}"))?;
        let spec = SpawnSpec {
            exe: &worker_exe(&self.shared.exe),
            namespace: &self.config.namespace,
            name,
            relay: self.shared.relay,
            limits: self.config.limits,
            cgroup: &sandbox.cgroup,
            who: crate::sandbox::Identity {
                uid: sandbox.uid,
                gid: sandbox.gid,
                limits: self.shared.limits,
            },
            artifact,
            kill_all: &self.shared.kill_all,
        };
        let process = process::spawn(spec, &self.shared.tasks)
            .await
            .map_err(|e| format!("cannot start Worker {name}: {e}"))?;
        tracing::info!(
            namespace = %self.config.namespace,
            worker = %name,
            pid = process.pid,
            component = %artifact.hash.short(),
            ms = started.elapsed().as_millis() as u64,
            "Worker process started"
        );
        Ok(process)
    }

    /// The file is gone: retire its process.
    async fn forget(&self, name: &str) {
        let Some(slot) = self.existing_slot(name) else {
            return;
        };
        let mut state = slot.update.lock().await;
        *state = SlotState::default();
        if let Some(old) = slot.take_current() {
            tracing::info!(
                namespace = %self.config.namespace,
                worker = %name,
                pid = old.pid,
                "Worker removed; retiring its process"
            );
            old.retire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(7), Duration::from_secs(5));
        assert_eq!(backoff(40), Duration::from_secs(5));
    }
}
