//! `interceptor exec`: asks the daemon for a fresh sandbox cgroup of the tenant,
//! then runs the command in it as the tenant's uid with no new privileges.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use super::CliError;
use crate::admin::{self, Reply, Request};
use crate::sandbox::Identity;

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

pub fn run(
    admin_socket: &Path,
    tenant: &str,
    params: Vec<(String, String)>,
    command: Vec<OsString>,
) -> Result<i32, CliError> {
    refuse_inherited_sockets()?;
    let params: BTreeMap<String, String> = params.into_iter().collect();
    let reply = admin::call(
        admin_socket,
        &Request::ExecOpen {
            tenant: tenant.to_string(),
            params,
        },
    )?;
    let (cgroup, who, withheld_env) = match reply {
        Reply::Sandbox {
            cgroup,
            uid,
            gid,
            withheld_env,
            limits,
        } => (cgroup, Identity { uid, gid, limits }, withheld_env),
        Reply::Error { message, usage } => {
            return Err(if usage {
                CliError::usage(message)
            } else {
                CliError::failure(message)
            })
        }
        other => return Err(CliError::failure(format!("unexpected reply {other:?}"))),
    };
    let result = spawn_and_wait(&cgroup, who, &withheld_env, &command);
    if let Err(e) = admin::call(admin_socket, &Request::ExecClose { cgroup }) {
        tracing::debug!("closing the sandbox: {e}");
    }
    result
}

/// The command inherits descriptors 0 to 2 (every other is closed). A socket
/// among them other than a Unix one was made outside the subtree: no hook
/// follows it, so a sandbox holding one (an inetd- or systemd-style socket on
/// standard input, a shell's `/dev/tcp`) would talk past the relay.
fn refuse_inherited_sockets() -> Result<(), CliError> {
    for (fd, name) in [
        (0, "standard input"),
        (1, "standard output"),
        (2, "standard error"),
    ] {
        let Some(family) = socket_family(fd) else {
            continue;
        };
        if family != libc::AF_UNIX {
            return Err(CliError::usage(format!(
                "{name} is a socket of address family {family}, not a Unix socket: \
                 a sandbox may hold no network socket from outside it (use a pipe or a file)"
            )));
        }
    }
    Ok(())
}

/// The address family of the socket open as `fd`; `None` for anything else.
fn socket_family(fd: libc::c_int) -> Option<libc::c_int> {
    // SAFETY: fstat and getsockopt on a descriptor number, into locals sized for them.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return None;
        }
        let mut family: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let got = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut family as *mut libc::c_int).cast(),
            &mut len,
        );
        Some(if got == 0 { family } else { -1 })
    }
}

fn spawn_and_wait(
    cgroup: &Path,
    who: Identity,
    withheld_env: &[String],
    command: &[OsString],
) -> Result<i32, CliError> {
    let procs =
        crate::sandbox::open_cgroup_procs(cgroup).map_err(|e| CliError::failure(e.to_string()))?;
    let procs_fd = procs.as_raw_fd();
    let ruleset = crate::sandbox::isolation_ruleset()
        .map_err(|e| CliError::failure(format!("Landlock ruleset: {e}")))?;
    let ruleset_fd = ruleset.as_ref().map(|fd| fd.as_raw_fd());
    let filter = crate::sandbox::syscall_filter().map_err(|e| CliError::failure(e.to_string()))?;
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    // The command gets its caller's environment, but not the daemon's secrets
    // should the caller's shell hold them too.
    for name in withheld_env {
        cmd.env_remove(name);
    }
    // SAFETY: `enter` only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || crate::sandbox::enter(procs_fd, who, ruleset_fd, filter, 3));
    }
    let mut child = cmd.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        CliError {
            code,
            message: format!("cannot run {}: {e}", command[0].to_string_lossy()),
            bare: false,
        }
    })?;
    drop((procs, ruleset));
    CHILD.store(child.id() as i32, Ordering::Relaxed);
    // Like system(3): the terminal's interrupt goes to the child; we wait for it.
    // SAFETY: installing handlers that only call kill(2) / ignoring signals.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(
            libc::SIGTERM,
            forward_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGHUP,
            forward_signal as *const () as libc::sighandler_t,
        );
    }
    let status = child
        .wait()
        .map_err(|e| CliError::failure(format!("waiting for the command: {e}")))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
