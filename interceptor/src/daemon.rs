//! `interceptor run`: wires the parts together. Listeners are bound before the
//! eBPF programs are attached, so a port in use fails the start before anything
//! changes in the kernel; the programs are never detached, so sandboxed
//! connections fail (never go out unfiltered) while no daemon runs.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AttachedProgramStatus, Handler, Reply, Request, Status};
use crate::cli::{DaemonPointer, POINTER_FILE};
use crate::config::Config;
use crate::context::ContextKey;
use crate::dispatch::Dispatchers;
use crate::dns::{self, DnsContext};
use crate::ebpf::{self, Enforcement, RedirectTargets};
use crate::logs::LogWriter;
use crate::metrics::{Gauges, Metrics};
use crate::policy::OutboundPolicy;
use crate::record::Recorder;
use crate::relay::{self, LocalAddresses, RelayContext, UpstreamPool};
use crate::resolve::Resolver;
use crate::tenants::{SandboxRegistry, SandboxUids, Tenant, TenantId};

/// In-flight requests get this long to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("interceptor run must be started as root")]
    NotRoot,
    #[error("the daemon's own cgroup {0} is inside the enforced subtree; its traffic would be redirected")]
    InsideSubtree(PathBuf),
    #[error("{what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("sandbox_user {0:?}: no such user")]
    SandboxUser(String),
    #[error("another interceptor daemon serves the cgroup subtree {0}")]
    SubtreeInUse(PathBuf),
    #[error("cgroup subtree {path}: {source}")]
    Subtree { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(transparent)]
    Tenants(#[from] crate::tenants::TenantError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Logs(#[from] crate::logs::LogError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Context(#[from] crate::context::ContextError),
    #[error(transparent)]
    OriginTls(#[from] relay::OriginTlsError),
    #[error(transparent)]
    Dispatch(#[from] crate::dispatch::DispatchError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// `count` listeners on `addr`. More than one share it through `SO_REUSEPORT`
/// (one per relay thread, so the kernel spreads connections over the threads and
/// none is handed from thread to thread); a plain bind first then makes a port
/// held by anyone else (even another root process, which could otherwise join the
/// group) fail the start. Accepted sockets inherit `TCP_NODELAY` from the listener.
fn listen_tcp(
    what: &'static str,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, DaemonError> {
    use socket2::{Domain, Socket, Type};
    let err = |source| DaemonError::Listen { what, addr, source };
    let shared = count > 1;
    let socket = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        Ok(socket)
    };
    if shared {
        socket()
            .and_then(|probe| probe.bind(&addr.into()))
            .map_err(err)?;
    }
    (0..count.max(1))
        .map(|_| {
            let socket = socket()?;
            socket.set_reuse_port(shared)?;
            socket.set_tcp_nodelay(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket.into())
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(err)
}

async fn listen_udp(what: &'static str, addr: SocketAddr) -> Result<UdpSocket, DaemonError> {
    UdpSocket::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { what, addr, source })
}

/// The cgroup v2 path of this process, from /proc/self/cgroup (`0::/path`).
fn own_cgroup(mount: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(path.trim_start_matches('/')))
}

/// Where the daemon serving a subtree holds its lock: root's alone (a lock
/// others could open, they could hold, and keep the daemon from restarting).
const LOCK_DIR: &str = "/run/interceptor/locks";

/// Holds the subtree for this daemon as long as the returned file is open. A
/// second daemon on it would swap in programs that redirect this one's
/// sandboxes to its own relay, and leave them failing when it stops.
fn hold_subtree(root: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let err = |source| DaemonError::Subtree {
        path: root.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .and_then(|()| std::fs::set_permissions(LOCK_DIR, std::fs::Permissions::from_mode(0o700)))
        .map_err(err)?;
    let name = root
        .to_string_lossy()
        .replace('%', "%25")
        .replace('/', "%2F");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(Path::new(LOCK_DIR).join(format!("{name}.lock")))
        .map_err(err)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            DaemonError::SubtreeInUse(root.to_path_buf())
        } else {
            err(e)
        });
    }
    Ok(lock)
}

pub async fn run(config: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DaemonError::NotRoot);
    }
    raise_open_file_limit();
    let settings = &config.interceptor;
    let mount = ebpf::cgroup2_mount()?;
    let root = mount.join(&settings.cgroup);
    if let Some(own) = own_cgroup(&mount) {
        if own.starts_with(&root) {
            return Err(DaemonError::InsideSubtree(own));
        }
    }
    let upstream_pool = UpstreamPool::new(&settings.upstream_ca)?;
    for warning in config.host_warnings() {
        tracing::warn!("{warning}");
    }
    if !matches!(crate::sandbox::isolation_ruleset(), Ok(Some(_))) {
        tracing::warn!(
            "this kernel has no Landlock: sandboxes are not kept from ptracing other processes of sandbox_user"
        );
    }
    let user = nix::unistd::User::from_name(&settings.sandbox_user)
        .ok()
        .flatten()
        .ok_or_else(|| DaemonError::SandboxUser(settings.sandbox_user.clone()))?;

    let policies: BTreeMap<String, Arc<OutboundPolicy>> = OutboundPolicy::all_from_config(&config)?
        .into_iter()
        .map(|(name, policy)| (name, Arc::new(policy)))
        .collect();
    // A tenant that names no outbound Worker: allowed out, guarded ranges still refused.
    let allow_all = Arc::new(OutboundPolicy::default());
    let tenants = config
        .tenants
        .iter()
        .map(|(name, tenant)| {
            let policy = tenant
                .outbound
                .as_ref()
                .and_then(|o| policies.get(o))
                .unwrap_or(&allow_all);
            Tenant::new(
                TenantId(name.clone()),
                tenant.params.clone(),
                policy.clone(),
            )
        })
        .collect();

    // Bind first: a port in use fails the start before the kernel is touched.
    let targets = RedirectTargets {
        relay_v4: settings.relay,
        relay_v6: settings.relay_v6(),
        dns_v4: settings.dns,
        dns_v6: settings.dns_v6(),
    };
    let relay_v4 = SocketAddr::V4(targets.relay_v4);
    let relay_v6 = SocketAddr::V6(targets.relay_v6);
    let dns_v4 = SocketAddr::V4(targets.dns_v4);
    let dns_v6 = SocketAddr::V6(targets.dns_v6);
    let relay_threads = relay_thread_count();
    let relay_listeners = [
        listen_tcp("relay", relay_v4, relay_threads)?,
        listen_tcp("relay", relay_v6, relay_threads)?,
    ];
    let dns_sockets = [
        listen_udp("dns", dns_v4).await?,
        listen_udp("dns", dns_v6).await?,
    ];
    let admin_listener = admin::bind(&settings.admin_socket).await?;
    let dispatch_addrs = Dispatchers::listen_addresses(&config);
    let dispatch_listeners = dispatch_addrs
        .iter()
        .map(|addr| {
            let listener = listen_tcp("dispatcher", *addr, 1)?.remove(0);
            TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
                what: "dispatcher",
                addr: *addr,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metrics_listener = settings
        .metrics
        .map(|addr| {
            let listener = listen_tcp("metrics", addr, 1)?.remove(0);
            TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
                what: "metrics",
                addr,
                source,
            })
        })
        .transpose()?;

    // After the listeners: the same config started twice names its port in use.
    let _serving = hold_subtree(&root)?;
    let uids = sandbox_uids(&config, (user.uid.as_raw(), user.gid.as_raw()))?;
    let sandboxes = Arc::new(SandboxRegistry::create(root.clone(), tenants, uids)?);
    let metrics = settings.metrics.map(|_| Arc::new(Metrics::new()));
    let recorder = Recorder::with_metrics(
        LogWriter::open(&settings.log_dir, settings.log_max_bytes, settings.log_keep)?,
        metrics.clone(),
    );
    let resolver = Arc::new(Resolver::new(config.resolve.clone()));
    // The dispatchers too: a Worker calling a dispatcher would start a fresh
    // request (with a fresh subrequest budget) from inside one.
    let mut own_listeners = vec![relay_v4, relay_v6, dns_v4, dns_v6];
    own_listeners.extend(&dispatch_addrs);
    // And the metrics listener: a sandbox with loopback in `allow_cidrs` still
    // must not read every tenant's counters.
    own_listeners.extend(settings.metrics);
    let local = LocalAddresses {
        listeners: own_listeners,
    };
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let context_key = Arc::new(ContextKey::generate()?);
    let dispatchers = Arc::new(Dispatchers::new(
        &config,
        sandboxes.clone(),
        &policies,
        context_key.clone(),
        settings.sandbox_limits,
    )?);

    // Last of the fallible steps: from here on, the subtree is enforced.
    let mut enforcement = Enforcement::load(&targets, &root)?;
    enforcement.guard_ports(
        dispatch_addrs
            .iter()
            .chain(&settings.metrics)
            .map(SocketAddr::port),
    )?;
    // A tenant holds no more inet sockets than one of its processes may hold
    // descriptors: all of them cannot take every ephemeral port.
    enforcement.limit_sockets_per_tenant(
        u32::try_from(settings.sandbox_limits.nofile).unwrap_or(u32::MAX),
    )?;
    enforcement.attach()?;
    tracing::info!(cgroup = %root.display(), "eBPF programs attached");
    let lsm = match enforcement.lsm_state() {
        ebpf::LsmState::Active => "active".to_string(),
        ebpf::LsmState::Inactive(why) => {
            tracing::warn!(
                "no task-keyed LSM programs: {why}; sandboxes rely on their seccomp filter"
            );
            format!("inactive: {why}")
        }
    };
    dispatchers.serve(dispatch_listeners, &shutdown, &tracker);

    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let dns_ctx = Arc::new(DnsContext {
        destinations: enforcement.destinations(),
        sandboxes: sandboxes.clone(),
        recorder: recorder.clone(),
        resolver: resolver.clone(),
        forwarder: dns::Forwarder::new(dns::forwarders(
            settings.dns_forwarders.as_deref(),
            &resolv_conf,
            &local.listeners,
        )),
        in_flight: dns::InFlightLimit::new(settings.dns_max_in_flight_per_tenant),
    });
    let relay_ctx = RelayContext::new(
        dns_ctx.clone(),
        local.clone(),
        context_key.clone(),
        upstream_pool,
        settings.max_connections_per_tenant,
        &shutdown,
        &tracker,
    );
    // Relay threads (see `relay_thread_count`): each accepts on its own listeners and owns its
    // connections and upstream pools.
    let [v4, v6] = relay_listeners;
    let per_thread = v4.into_iter().zip(v6).map(|(a, b)| vec![a, b]).collect();
    let relay_threads = relay::start_threads(per_thread, &relay_ctx)?;
    for socket in dns_sockets {
        tokio::spawn(dns::serve(
            socket,
            dns_ctx.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    if let (Some(listener), Some(metrics)) = (metrics_listener, metrics) {
        let (sandboxes, dispatchers) = (sandboxes.clone(), dispatchers.clone());
        let gauges = Arc::new(move || metrics_gauges(&sandboxes, &dispatchers));
        tracing::info!(metrics = %listener.local_addr()?, "metrics ready");
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics,
            gauges,
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    let handler = Arc::new(AdminHandler {
        sandboxes,
        dispatchers: dispatchers.clone(),
        recorder: recorder.clone(),
        enforcement: enforcement.counters(),
        limits: settings.sandbox_limits,
        withheld_env: policies
            .values()
            .flat_map(|p| p.injections())
            .flat_map(|i| i.env_vars())
            .map(str::to_string)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        status: Status {
            pid: std::process::id(),
            config: config_path.clone(),
            started: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            cgroup: root.clone(),
            relay: vec![relay_v4.to_string(), relay_v6.to_string()],
            dns: vec![dns_v4.to_string(), dns_v6.to_string()],
            log_dir: settings.log_dir.clone(),
            attached: Vec::new(),
            lsm,
            enforcement: Default::default(),
            tenants: BTreeMap::new(),
            dispatch: Vec::new(),
            sandbox_uids: settings.sandbox_uids.map(|range| range.to_string()),
            uids: BTreeMap::new(),
        },
    });
    tokio::spawn(admin::serve(admin_listener, handler, shutdown.clone()));
    {
        let recorder = recorder.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => recorder.flush(),
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    write_pointer(&DaemonPointer {
        // Absolute: `logs` and `exec` read it from wherever they are run.
        config: std::path::absolute(&config_path).unwrap_or(config_path),
        admin_socket: settings.admin_socket.clone(),
        log_dir: settings.log_dir.clone(),
        pid: std::process::id(),
    });
    tracing::info!(relay = %relay_v4, dns = %dns_v4, admin = %settings.admin_socket.display(), "interceptor ready");
    // Loading the eBPF object (the kernel's BTF above all) leaves tens of MiB freed
    // but still resident; give them back now rather than whenever the allocator
    // next gets around to it.
    // SAFETY: mi_collect takes no pointers; it only releases free memory.
    unsafe { libmimalloc_sys::mi_collect(true) };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // SIGHUP (the unit's ExecReload) must not end the daemon, as by default it would.
    let mut hangup = signal(SignalKind::hangup())?;
    // Under systemd (Type=notify): the programs are attached and every listener serves.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell the service manager we are ready: {e}");
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hangup.recv() => tracing::warn!(
                "SIGHUP: reloading the configuration is not built yet; restart the daemon to apply a new one"
            ),
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: finishing in-flight requests");
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("in-flight connections still open after {DRAIN_TIMEOUT:?}; closing them");
    } else {
        // Drained: each relay thread writes the log lines it still holds, then ends.
        let joined = tokio::task::spawn_blocking(move || {
            for thread in relay_threads {
                let _ = thread.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
    }
    dispatchers.stop().await;
    recorder.flush();
    let _ = std::fs::remove_file(&settings.admin_socket);
    remove_pointer();
    // The programs stay attached: with no relay listening, sandboxed connects fail.
    drop(enforcement);
    tracing::info!("stopped");
    Ok(())
}

/// The gauges of `/metrics`, read as `status` reads them.
fn metrics_gauges(sandboxes: &SandboxRegistry, dispatchers: &Dispatchers) -> Gauges {
    let mut workers = sandboxes.worker_tenants();
    // One entry per sandbox: a Worker's tenant is counted once.
    workers.sort_by_key(Arc::as_ptr);
    workers.dedup_by(|a, b| Arc::ptr_eq(a, b));
    Gauges {
        open_connections: sandboxes
            .tenants()
            .chain(&workers)
            .map(|t| (t.id.0.clone(), t.open_connections() as u64))
            .collect(),
        worker_processes: dispatchers
            .status()
            .into_iter()
            .map(|ns| (ns.namespace, ns.workers.len() as u64))
            .collect(),
    }
}

/// Which uid each sandbox runs as: `shared` (the sandbox user's) for all, or
/// with `sandbox_uids` one per tenant and Worker, recorded under `log_dir`.
fn sandbox_uids(config: &Config, shared: (u32, u32)) -> Result<SandboxUids, DaemonError> {
    let settings = &config.interceptor;
    let Some(range) = settings.sandbox_uids else {
        return Ok(SandboxUids::shared(shared.0, shared.1));
    };
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&settings.log_dir)?;
    Ok(SandboxUids::assigned(
        range,
        settings.log_dir.join(crate::tenants::UID_FILE),
        shared,
        config.tenants.keys().map(String::as_str),
    )?)
}

/// One per CPU but one, unless `INTERCEPTOR_RELAY_THREADS` says otherwise. The
/// relay shares the host with the sandboxes it serves, whose sends and receives
/// are half its work: a relay thread per CPU only adds switches between them
/// (measured on 2 CPUs: one thread relays 10–20% more than two).
fn relay_thread_count() -> usize {
    std::env::var("INTERCEPTOR_RELAY_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
        })
}

/// Each relayed connection holds two descriptors: use all the hard limit allows.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn write_pointer(pointer: &DaemonPointer) {
    let path = Path::new(POINTER_FILE);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::write(
                path,
                serde_json::to_vec_pretty(pointer).expect("pointer serialises"),
            )
        });
    if let Err(e) = written {
        tracing::warn!("cannot write {POINTER_FILE}: {e}");
    }
}

/// Removes the pointer file if it still points at this daemon (a daemon started
/// since, with another config, keeps its own).
fn remove_pointer() {
    let ours = std::fs::read_to_string(POINTER_FILE)
        .ok()
        .and_then(|text| serde_json::from_str::<DaemonPointer>(&text).ok())
        .is_some_and(|pointer| pointer.pid == std::process::id());
    if ours {
        let _ = std::fs::remove_file(POINTER_FILE);
    }
}

struct AdminHandler {
    sandboxes: Arc<SandboxRegistry>,
    dispatchers: Arc<Dispatchers>,
    recorder: Arc<Recorder>,
    /// The rlimits of every sandbox.
    limits: crate::config::SandboxLimits,
    /// What `{env:NAME}` templates read: never passed into a sandbox.
    withheld_env: Vec<String>,
    /// What the eBPF programs count.
    enforcement: ebpf::EnforcementCounters,
    /// The parts of the status that do not change.
    status: Status,
}

impl Handler for AdminHandler {
    fn handle(&self, request: Request) -> Reply {
        match request {
            Request::ExecOpen { tenant, params } => {
                match self.sandboxes.open_exec(&tenant, params) {
                    Ok(sandbox) => Reply::Sandbox {
                        cgroup: sandbox.cgroup.clone(),
                        uid: sandbox.uid,
                        gid: sandbox.gid,
                        withheld_env: self.withheld_env.clone(),
                        limits: self.limits,
                    },
                    Err(e @ crate::tenants::TenantError::UnknownTenant(_)) => Reply::Error {
                        message: e.to_string(),
                        usage: true,
                    },
                    Err(e) => Reply::Error {
                        message: e.to_string(),
                        usage: false,
                    },
                }
            }
            Request::ExecClose { cgroup } => match self.sandboxes.close_exec(&cgroup) {
                Ok(()) => Reply::Done,
                Err(e) => Reply::Error {
                    message: e.to_string(),
                    usage: false,
                },
            },
            Request::Status => {
                let mut status = self.status.clone();
                status.tenants = self.recorder.counters();
                status.dispatch = self.dispatchers.status();
                let uids = self.sandboxes.uids();
                for tenant in self.sandboxes.tenants() {
                    if let Ok((uid, _)) = uids.tenant(&tenant.id.0) {
                        status.uids.insert(format!("tenant:{}", tenant.id), uid);
                    }
                }
                status.uids.extend(uids.all());
                let workers = self.sandboxes.worker_tenants();
                for tenant in self.sandboxes.tenants().chain(&workers) {
                    status
                        .tenants
                        .entry(tenant.id.0.clone())
                        .or_default()
                        .open_connections += tenant.open_connections() as u64;
                }
                status.enforcement = self.enforcement.read();
                status.attached = ebpf::attached_programs(&status.cgroup)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| AttachedProgramStatus {
                        attach_type: p.attach_type.to_string(),
                        id: p.id,
                        name: p.name,
                    })
                    .collect();
                Reply::Status(Box::new(status))
            }
        }
    }
}
