//! The relay: every TCP connection the eBPF hooks redirect lands here. Each one is
//! identified (tenant, original destination), classified from its first bytes,
//! judged by the tenant's outbound policy, relayed or refused, and recorded.

mod body;
mod budget;
mod http;
mod pool;
mod sniff;
mod stream;
mod subrequests;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::accept_until;
use crate::context::ContextKey;
use crate::dns::{self, DnsContext};
use crate::ebpf::DestinationTable;
use crate::logs::{LogEntry, Proto, Verdict};
use crate::policy::Decision;
use crate::record::Recorder;
use crate::resolve::Resolver;
use crate::tenants::{OpenConnection, Sandbox, SandboxRegistry};

pub use pool::{OriginTlsError, UpstreamPool};
pub use upstream::LocalAddresses;

const DNS_PORT: u16 = 53;

/// What every connection handler of one relay thread shares. Everything but the
/// upstream connection pools is shared by all threads.
pub struct RelayContext {
    pub destinations: DestinationTable,
    pub sandboxes: Arc<SandboxRegistry>,
    pub recorder: Arc<Recorder>,
    pub resolver: Arc<Resolver>,
    pub local: LocalAddresses,
    /// Verifies the request contexts dispatched Workers' subrequests carry.
    pub context_key: Arc<ContextKey>,
    /// Answers DNS over TCP (connections to port 53).
    pub dns: Arc<DnsContext>,
    upstream: UpstreamPool,
    /// Connections one tenant may hold open at once (`None`: no limit).
    max_connections_per_tenant: Option<usize>,
    subrequests: Arc<subrequests::SubrequestCounter>,
    /// What unfinished request heads may hold, per tenant and in all.
    heads: Arc<budget::HeadBudgets>,
    /// Ends accepting, requests on kept-alive connections, and byte streams.
    shutdown: CancellationToken,
    /// Every connection's task, and what outlives its HTTP connection (WebSocket
    /// tunnels): the daemon waits for them when it stops.
    tasks: TaskTracker,
}

impl RelayContext {
    /// The relay identifies, records and resolves with what the DNS listener
    /// uses: one view of the sandboxes for both.
    pub fn new(
        dns: Arc<DnsContext>,
        local: LocalAddresses,
        context_key: Arc<ContextKey>,
        upstream: UpstreamPool,
        max_connections_per_tenant: Option<usize>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<Self> {
        Arc::new(RelayContext {
            destinations: dns.destinations.clone(),
            sandboxes: dns.sandboxes.clone(),
            recorder: dns.recorder.clone(),
            resolver: dns.resolver.clone(),
            local,
            context_key,
            dns,
            upstream,
            max_connections_per_tenant,
            subrequests: Default::default(),
            heads: Default::default(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        })
    }

    /// The context for another relay thread: the same state, its own pools (so a
    /// thread's requests never wait on another thread's connections).
    fn for_thread(&self) -> Arc<Self> {
        Arc::new(RelayContext {
            destinations: self.destinations.clone(),
            sandboxes: self.sandboxes.clone(),
            recorder: self.recorder.clone(),
            resolver: self.resolver.clone(),
            local: self.local.clone(),
            context_key: self.context_key.clone(),
            dns: self.dns.clone(),
            upstream: self.upstream.fresh_pool(),
            max_connections_per_tenant: self.max_connections_per_tenant,
            subrequests: self.subrequests.clone(),
            heads: self.heads.clone(),
            shutdown: self.shutdown.clone(),
            tasks: self.tasks.clone(),
        })
    }
}

/// Starts one relay thread per entry of `listeners`. Each runs a single-threaded
/// runtime that accepts on its own listeners (sharing the relay addresses through
/// `SO_REUSEPORT`) and serves those connections with its own upstream pools, so a
/// request and its upstream connection never leave the thread that accepted it.
pub fn start_threads(
    listeners: Vec<Vec<std::net::TcpListener>>,
    ctx: &RelayContext,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (n, listeners) in listeners.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listeners = {
            let _in_runtime = runtime.enter();
            listeners
                .into_iter()
                .map(TcpListener::from_std)
                .collect::<std::io::Result<Vec<_>>>()?
        };
        let ctx = ctx.for_thread();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{n}"))
            .spawn(move || {
                crate::record::batch_on_this_thread();
                runtime.block_on(run_thread(listeners, ctx));
            })?;
        threads.push(thread);
    }
    Ok(threads)
}

/// One relay thread: accepts until shutdown, then finishes its connections and
/// writes the log lines it still holds.
async fn run_thread(listeners: Vec<TcpListener>, ctx: Arc<RelayContext>) {
    for listener in listeners {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            accept_until(listener, ctx.shutdown.clone(), "relay", |stream, peer| {
                ctx.tasks.spawn(handle(stream, peer, ctx.clone()));
            })
            .await
        });
    }
    let pool_ctx = ctx.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(pool::IDLE_TIMEOUT / 3);
        loop {
            every.tick().await;
            pool_ctx.upstream.expire_idle();
        }
    });
    ctx.shutdown.cancelled().await;
    ctx.tasks.wait().await;
    ctx.recorder.write_pending();
}

/// How long streams relayed as bytes (TLS, other TCP, WebSocket) may go on after
/// the daemon is told to stop: they have no request boundary to stop at, so they
/// are cut then, and logged with what crossed them.
const STREAM_GRACE: Duration = Duration::from_secs(1);

/// Copies bytes both ways between `a` and `b` until either closes, or the
/// daemon has been stopping for [`STREAM_GRACE`].
async fn copy_until_stopped<A, B>(
    a: &mut A,
    b: &mut B,
    shutdown: &CancellationToken,
) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        copied = tokio::io::copy_bidirectional(a, b) => copied.map(drop),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(STREAM_GRACE).await;
        } => Err(std::io::Error::other("cut: the daemon is stopping")),
    }
}

/// One redirected connection, once identified.
pub(crate) struct Connection {
    pub sandbox: Arc<Sandbox>,
    /// What the sandbox dialled.
    pub dst: SocketAddr,
    /// `dst` as logged, formatted once for all the connection's requests.
    dst_text: String,
    /// Whether `dst` is the relay itself, as for a Worker's subrequests.
    dialled_relay: bool,
    pub pid: u32,
    /// Counted against the tenant's limit for as long as the connection (or a
    /// tunnel it became) lives.
    _open: OpenConnection,
}

impl Connection {
    /// A log entry for this connection with what every protocol knows.
    fn entry(&self, proto: Proto, decision: &Decision, verdict: Verdict) -> LogEntry {
        let mut entry = sandbox_entry(&self.sandbox, proto, self.dst_text.clone(), self.pid);
        entry.decision = verdict;
        entry.rule = decision.rule.clone();
        entry
    }

    fn log_enabled(&self) -> bool {
        self.sandbox.tenant.policy.log_enabled()
    }
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<RelayContext>) {
    let started = Instant::now();
    // Only connections the hooks redirected have a hand-off entry; anything else
    // (a host process dialling the relay port) is not ours to serve.
    let Some(original) = ctx.destinations.take_for_relay(peer) else {
        tracing::debug!(%peer, "connection without a redirect record; closed");
        return;
    };
    let Some(sandbox) = ctx.sandboxes.lookup(original.cgroup_id) else {
        tracing::warn!(%peer, cgroup_id = original.cgroup_id, "connection from a cgroup outside every tenant; closed");
        return;
    };
    let dst = original.socket_addr();
    let Some(open) = sandbox
        .tenant
        .open_connection(ctx.max_connections_per_tenant)
    else {
        refuse_over_limit(&ctx, &sandbox, dst, original.pid);
        return;
    };
    if dst.port() == DNS_PORT {
        // DNS over TCP is judged and answered as DNS, never relayed as bytes: no
        // resolver outside the policy, no tunnel through port 53.
        dns::serve_tcp(stream, &ctx.dns, &sandbox, &original).await;
        return;
    }
    let conn = Connection {
        sandbox,
        dst,
        dst_text: dst.to_string(),
        dialled_relay: ctx.local.is_local_listener(dst),
        pid: original.pid,
        _open: open,
    };
    // The first bytes (an unfinished head among them) are charged to the
    // tenant's and the relay's budget for buffered heads.
    let mut charge = ctx.heads.charge(&conn.sandbox.tenant.id.0);
    let sniffed = sniff::sniff(&mut stream, &mut charge, Some(sniff::SILENCE)).await;
    let (mut protocol, mut prefix) = match sniffed {
        Ok(sniffed) => sniffed,
        Err(e) => {
            tracing::debug!(%peer, "reading first bytes: {e}");
            return;
        }
    };
    let mut connected = None;
    if protocol == sniff::Protocol::Silent {
        // Boxed, as the paths below: only the few silent connections pay for it.
        let first = Box::pin(stream::first_speaker(&stream, &conn, &ctx, started)).await;
        match first {
            stream::FirstSpeaker::Server(server) => {
                drop(charge);
                let stream = sniff::Prefixed::new(prefix, stream);
                let opaque = stream::relay_opaque(stream, conn, ctx, started, Some(server), true);
                return Box::pin(opaque).await;
            }
            stream::FirstSpeaker::Client(server) => {
                connected = server;
                (protocol, prefix) = match sniff::sniff(&mut stream, &mut charge, None).await {
                    Ok(sniffed) => sniffed,
                    Err(e) => {
                        tracing::debug!(%peer, "reading first bytes: {e}");
                        return;
                    }
                };
            }
            stream::FirstSpeaker::Neither => return,
        }
    }
    let stream = sniff::Prefixed::new(prefix, stream);
    match protocol {
        sniff::Protocol::Http => http::serve(stream, conn, ctx, charge).await,
        // Boxed: every connection's task is as large as its largest path, and the
        // HTTP one, by far the most common, is the smallest.
        sniff::Protocol::Tls => {
            drop(charge);
            Box::pin(stream::relay_tls(stream, conn, ctx, started)).await
        }
        sniff::Protocol::Opaque | sniff::Protocol::Silent => {
            drop(charge);
            let opaque = stream::relay_opaque(stream, conn, ctx, started, connected, false);
            Box::pin(opaque).await
        }
    }
}

/// A log entry with what every connection of `sandbox` knows.
fn sandbox_entry(sandbox: &Sandbox, proto: Proto, dst: String, pid: u32) -> LogEntry {
    let mut entry = LogEntry::with_dst(&sandbox.tenant.id.0, proto, dst);
    entry.worker = sandbox.worker.as_ref().map(|w| w.name.clone());
    entry.pid = Some(pid);
    entry.params = sandbox.params.clone();
    entry
}

/// A connection over its tenant's limit is closed before a byte is read, and
/// logged (as `tcp`: what it would have carried is not known yet).
fn refuse_over_limit(ctx: &RelayContext, sandbox: &Sandbox, dst: SocketAddr, pid: u32) {
    let mut entry = sandbox_entry(sandbox, Proto::Tcp, dst.to_string(), pid)
        .with_decision(Verdict::Block, "limit:connections");
    entry.error = Some(format!(
        "the tenant already holds {} relay connections",
        sandbox.tenant.open_connections()
    ));
    ctx.recorder
        .record(&entry, sandbox.tenant.policy.log_enabled());
}
