//! The admin socket: a root-only Unix socket through which the CLI asks the
//! daemon for an exec sandbox and for its status. One JSON request per
//! connection, one JSON reply.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::record::TenantCounters;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Creates a sandbox cgroup for one `interceptor exec`.
    ExecOpen {
        tenant: String,
        params: BTreeMap<String, String>,
    },
    /// The exec finished: remove its cgroup.
    ExecClose {
        cgroup: PathBuf,
    },
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Sandbox {
        cgroup: PathBuf,
        uid: u32,
        gid: u32,
        /// Environment variables the daemon's injections read (`{env:NAME}`):
        /// `exec` keeps them out of the sandbox, should its caller hold them too.
        #[serde(default)]
        withheld_env: Vec<String>,
        /// The rlimits the command runs under (`sandbox_limits`).
        #[serde(default)]
        limits: crate::config::SandboxLimits,
    },
    Done,
    Status(Box<Status>),
    /// `usage` marks errors in what the caller asked (exit 2), like an unknown tenant.
    Error {
        message: String,
        usage: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub config: PathBuf,
    pub started: String,
    pub cgroup: PathBuf,
    pub relay: Vec<String>,
    pub dns: Vec<String>,
    pub log_dir: PathBuf,
    pub attached: Vec<AttachedProgramStatus>,
    /// `active`, or why the task-keyed LSM programs do not run here.
    #[serde(default)]
    pub lsm: String,
    /// What the programs refused since the daemon started.
    #[serde(default)]
    pub enforcement: crate::ebpf::EnforcementCounts,
    pub tenants: BTreeMap<String, TenantCounters>,
    /// Dispatch namespaces and their running Worker processes.
    #[serde(default)]
    pub dispatch: Vec<crate::dispatch::NamespaceStatus>,
    /// `sandbox_uids`, when set.
    #[serde(default)]
    pub sandbox_uids: Option<String>,
    /// The uid of each sandbox: `tenant:NAME` for every configured tenant,
    /// and with `sandbox_uids` also `worker:NAMESPACE/NAME` for every User
    /// Worker given one so far.
    #[serde(default)]
    pub uids: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachedProgramStatus {
    pub attach_type: String,
    pub id: u32,
    pub name: String,
}

/// What the daemon does with each request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Reply;
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("the daemon is not running (cannot connect to {path}: {source})")]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("cannot reach the daemon: {path} is root-only ({source})")]
    Forbidden { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: bad reply: {source}")]
    BadReply {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Binds the socket, owner-only (0600) in a directory others cannot enter (0700
/// when the daemon creates it). A stale socket left by a crashed daemon is
/// replaced; one a live daemon answers on is not.
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another daemon is listening on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        // Root only, whatever the file mode says.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 => {}
            _ => continue,
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(request) => handler.handle(request),
                Err(e) => Reply::Error {
                    message: format!("bad request: {e}"),
                    usage: true,
                },
            };
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

/// Sends one request to the daemon and waits for its reply (blocking; for the CLI).
pub fn call(path: &Path, request: &Request) -> Result<Reply, AdminError> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
        let path = path.to_path_buf();
        if source.kind() == io::ErrorKind::PermissionDenied {
            AdminError::Forbidden { path, source }
        } else {
            AdminError::NotRunning { path, source }
        }
    })?;
    let io_err = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut text = serde_json::to_string(request).expect("requests serialise");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io_err)?;
    let mut line = String::new();
    io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_err)?;
    serde_json::from_str(&line).map_err(|source| AdminError::BadReply {
        path: path.to_path_buf(),
        source,
    })
}
