//! One Worker process: `<exe> worker --name NAME --relay ADDR [--cpu-ms N]
//! [--memory-mb N]`, started in its cgroup as its own uid with no new
//! privileges, in a session of its own, with the environment cleared and
//! exactly these descriptors: 0 and 1 on /dev/null, 2 a pipe the daemon logs,
//! 3 its end of the private channel (a Unix socketpair) and 4 a read-only
//! descriptor of the sealed memfd holding its precompiled component.
//!
//! The daemon speaks HTTP/2 (prior knowledge) over the channel, as the client,
//! many requests at a time. The process is reaped by its monitor task, which is
//! also the only one that signals it, so a pid is never signalled after reuse.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::artifact::{Artifact, ContentHash};
use crate::config::Limits;

/// A retired or stopped process gets this long to exit after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);
/// The descriptor numbers the Worker process finds its channel and component on.
pub use crate::worker::{CHANNEL_FD, COMPONENT_FD};
/// How long a failed request waits to learn whether the process died.
const EXIT_PROBE: Duration = Duration::from_millis(250);
/// The body of the 500 a request gets when its Worker process dies under it.
pub const EXITED_MESSAGE: &str = "Worker process exited";

/// Everything needed to start one Worker process.
pub struct SpawnSpec<'a> {
    /// The executable to run (normally `/proc/self/exe`).
    pub exe: &'a Path,
    pub namespace: &'a str,
    pub name: &'a str,
    pub relay: SocketAddr,
    pub limits: Limits,
    pub cgroup: &'a Path,
    /// The Worker's uid, gid and rlimits.
    pub who: crate::sandbox::Identity,
    pub artifact: &'a Arc<Artifact>,
    /// Cancelling it stops this process (and every other started with it).
    pub kill_all: &'a CancellationToken,
}

struct State {
    inflight: usize,
    /// Since when nothing has been in flight.
    idle_since: Instant,
    retired: bool,
    exit: Option<(Instant, ExitStatus)>,
}

/// A running (or exited, not yet replaced) Worker process.
pub struct Process {
    pub pid: u32,
    /// The uid it runs as.
    pub uid: u32,
    pub hash: ContentHash,
    pub started: Instant,
    sender: http2::SendRequest<Incoming>,
    state: Mutex<State>,
    /// Cancelled to make the monitor terminate the process.
    stop: CancellationToken,
    /// Cancelled by the monitor once the process has been reaped.
    exited: CancellationToken,
}

/// An in-flight request's hold on its process: a retired process is stopped
/// only after the last lease is dropped (its response body included).
pub struct Lease {
    process: Arc<Process>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.process.lock();
        state.inflight -= 1;
        if state.inflight == 0 {
            state.idle_since = Instant::now();
            if state.retired {
                self.process.stop.cancel();
            }
        }
    }
}

impl Lease {
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }
}

impl Process {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease for one request, or `None` when the process is retired or gone.
    pub fn lease(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.lock();
        if state.retired
            || state.exit.is_some()
            || self.exited.is_cancelled()
            || self.sender.is_closed()
        {
            return None;
        }
        state.inflight += 1;
        Some(Lease {
            process: self.clone(),
        })
    }

    /// No new requests; stopped once the ones in flight are done.
    pub fn retire(&self) {
        let mut state = self.lock();
        state.retired = true;
        if state.inflight == 0 {
            self.stop.cancel();
        }
    }

    /// Stops the process now, whatever is in flight.
    pub fn kill(&self) {
        self.lock().retired = true;
        self.stop.cancel();
    }

    /// When and how it exited, once reaped.
    pub fn exit(&self) -> Option<(Instant, ExitStatus)> {
        self.lock().exit
    }

    pub fn has_exited(&self) -> bool {
        self.exited.is_cancelled()
    }

    pub fn inflight(&self) -> usize {
        self.lock().inflight
    }

    /// How long it has had nothing in flight; `None` while it has.
    pub fn idle_for(&self) -> Option<Duration> {
        let state = self.lock();
        (state.inflight == 0).then(|| state.idle_since.elapsed())
    }

    /// Sends a request over the channel. On failure, the message the client gets.
    pub async fn send(&self, request: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let mut sender = self.sender.clone();
        match sender.send_request(request).await {
            Ok(response) => Ok(response),
            Err(e) => {
                // A channel error is almost always the process dying; give the
                // monitor a moment to reap it so the answer says so.
                let _ = tokio::time::timeout(EXIT_PROBE, self.exited.cancelled()).await;
                if self.has_exited() {
                    Err(EXITED_MESSAGE.to_string())
                } else {
                    Err(format!("Worker channel error: {e}"))
                }
            }
        }
    }
}

/// Moves `fd` to a descriptor number of at least `min` (close-on-exec).
fn raise_fd(fd: OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= min {
        return Ok(fd);
    }
    // SAFETY: fcntl on a descriptor we own; the new one is ours too.
    let raised = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if raised < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor returned by fcntl.
    Ok(unsafe { OwnedFd::from_raw_fd(raised) })
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Starts a Worker process and opens the HTTP/2 channel to it. The monitor,
/// channel and stderr tasks run on `tasks`.
pub async fn spawn(spec: SpawnSpec<'_>, tasks: &TaskTracker) -> io::Result<Arc<Process>> {
    let procs = crate::sandbox::open_cgroup_procs(spec.cgroup)?;
    let procs: OwnedFd = raise_fd(procs.into(), COMPONENT_FD + 1)?;
    let (ours, theirs) = socketpair()?;
    let theirs = raise_fd(theirs, COMPONENT_FD + 1)?;
    let component = raise_fd(spec.artifact.open_read_only()?, COMPONENT_FD + 1)?;
    let filter = crate::sandbox::syscall_filter().map_err(io::Error::other)?;
    let ruleset = crate::sandbox::isolation_ruleset()?
        .map(|fd| raise_fd(fd, COMPONENT_FD + 1))
        .transpose()?;

    let mut cmd = Command::new(spec.exe);
    cmd.arg("worker")
        .arg("--name")
        .arg(spec.name)
        .arg("--relay")
        .arg(spec.relay.to_string());
    if let Some(cpu) = spec.limits.cpu_ms {
        cmd.arg("--cpu-ms").arg(cpu.to_string());
    }
    if let Some(mem) = spec.limits.memory_mb {
        cmd.arg("--memory-mb").arg(mem.to_string());
    }
    // The daemon's environment may hold credentials (`{env:NAME}`): none of it
    // goes into the sandbox, except the log filter. Its stderr lines are
    // logged again by the daemon: no colours.
    cmd.env_clear().env("NO_COLOR", "1");
    if let Some(filter) = std::env::var_os("INTERCEPTOR_LOG") {
        cmd.env("INTERCEPTOR_LOG", filter);
    }
    cmd.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    let (procs_fd, channel_fd, component_fd) =
        (procs.as_raw_fd(), theirs.as_raw_fd(), component.as_raw_fd());
    let ruleset_fd = ruleset.as_ref().map(|fd| fd.as_raw_fd());
    let who = spec.who;
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // The sources are all >= 5, so neither dup2 clobbers the other; dup2
            // clears close-on-exec on the copies, which `enter` leaves alone.
            if libc::dup2(channel_fd, CHANNEL_FD) != CHANNEL_FD
                || libc::dup2(component_fd, COMPONENT_FD) != COMPONENT_FD
            {
                return Err(io::Error::last_os_error());
            }
            crate::sandbox::enter(procs_fd, who, ruleset_fd, filter, (COMPONENT_FD + 1) as u32)
        });
    }
    let mut child = cmd.spawn()?;
    drop((procs, theirs, component, ruleset));
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the Worker process vanished at start"))?;
    let label = format!("{}/{}", spec.namespace, spec.name);
    if let Some(stderr) = child.stderr.take() {
        forward_stderr(stderr, tasks, label.clone(), pid);
    }

    // A child of `kill_all`: the daemon's stop reaches retired processes too.
    let stop = spec.kill_all.child_token();
    let exited = CancellationToken::new();
    // From here on the monitor owns the child: it alone signals and reaps it.
    let (state_tx, state_rx) = tokio::sync::oneshot::channel::<Arc<Process>>();
    {
        let stop = stop.clone();
        let exited = exited.clone();
        let label = label.clone();
        tasks.spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                () = stop.cancelled() => terminate(&mut child, pid).await,
            };
            let process = state_rx.await.ok();
            match &status {
                Ok(s) => {
                    let stopping = stop.is_cancelled();
                    if stopping {
                        tracing::debug!(worker = %label, pid, "Worker process stopped ({})", describe(s));
                    } else {
                        tracing::warn!(worker = %label, pid, "Worker process exited ({})", describe(s));
                    }
                    if let Some(p) = &process {
                        p.lock().exit = Some((Instant::now(), *s));
                    }
                }
                Err(e) => tracing::error!(worker = %label, pid, "waiting for the Worker process: {e}"),
            }
            exited.cancel();
        });
    }
    let process = match open_channel(ours, tasks, &label, pid).await {
        Ok(sender) => Arc::new(Process {
            pid,
            uid: who.uid,
            hash: spec.artifact.hash,
            started: Instant::now(),
            sender,
            state: Mutex::new(State {
                inflight: 0,
                idle_since: Instant::now(),
                retired: false,
                exit: None,
            }),
            stop,
            exited,
        }),
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    let _ = state_tx.send(process.clone());
    Ok(process)
}

/// The HTTP/2 client side of the channel.
async fn open_channel(
    ours: OwnedFd,
    tasks: &TaskTracker,
    label: &str,
    pid: u32,
) -> io::Result<http2::SendRequest<Incoming>> {
    let stream = std::os::unix::net::UnixStream::from(ours);
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_reset_streams(1024)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    let label = label.to_string();
    tasks.spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(worker = %label, pid, "Worker channel closed: {e}");
        }
    });
    Ok(sender)
}

/// SIGTERM, then SIGKILL after [`TERM_GRACE`]; reaps the process.
async fn terminate(child: &mut tokio::process::Child, pid: u32) -> io::Result<ExitStatus> {
    if child.id().is_some() {
        // SAFETY: kill(2) on our own child, not yet reaped (only we reap it).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    match tokio::time::timeout(TERM_GRACE, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            tracing::warn!(pid, "Worker process ignored SIGTERM; killing it");
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

/// Logs what a Worker process writes to stderr, one line at a time.
fn forward_stderr(
    stderr: tokio::process::ChildStderr,
    tasks: &TaskTracker,
    label: String,
    pid: u32,
) {
    tasks.spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "interceptor::worker", worker = %label, pid, "{line}");
        }
    });
}
