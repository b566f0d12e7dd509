//! How a process enters a sandbox: it joins its cgroup, drops to the sandbox
//! user with no new privileges, and keeps none of its parent's descriptors.
//! Used between fork and exec by `interceptor exec` and by the dispatcher's
//! Worker processes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::RawFd;
use std::path::Path;

/// Opens `<cgroup>/cgroup.procs` for [`enter`]. Call it as root, before the
/// fork: cgroup v2 checks the opener's credentials, so the child can still move
/// itself in after it has dropped them.
pub fn open_cgroup_procs(cgroup: &Path) -> io::Result<File> {
    let path = cgroup.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// In the child, between fork and exec: moves this process into the cgroup
/// whose `cgroup.procs` is open as `procs_fd`, drops every group and becomes
/// `uid`/`gid`, sets no_new_privs, and marks every descriptor from
/// `keep_below` up close-on-exec. Only async-signal-safe system calls.
///
/// # Safety
/// Call only in a freshly forked child (e.g. from `pre_exec`).
pub unsafe fn enter(procs_fd: RawFd, uid: u32, gid: u32, keep_below: u32) -> io::Result<()> {
    let fail = || Err(io::Error::last_os_error());
    if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
        return fail();
    }
    if libc::setgroups(0, std::ptr::null()) != 0
        || libc::setgid(gid) != 0
        || libc::setuid(uid) != 0
        || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
    {
        return fail();
    }
    if libc::syscall(
        libc::SYS_close_range,
        keep_below,
        u32::MAX,
        libc::CLOSE_RANGE_CLOEXEC,
    ) != 0
    {
        return fail();
    }
    Ok(())
}
