//! How a process enters a sandbox: it joins its cgroup, drops to the sandbox
//! user with no new privileges, enters a Landlock domain of its own, and keeps
//! none of its parent's descriptors. Used between fork and exec by
//! `interceptor exec` and by the dispatcher's Worker processes.
//!
//! Every sandbox runs as the same `sandbox_user`, and so may other processes
//! on the host (`nobody` is common). Same-uid processes may ptrace each other,
//! write each other's `/proc/PID/mem`, take each other's sockets with
//! `pidfd_getfd`: an escape from the cgroup, or another tenant's connections
//! and credentials. The Landlock domain closes that: a process in it reaches
//! those only inside its own sandbox (and, from Landlock ABI 6, sends signals
//! and connects to abstract Unix sockets only there too).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// `struct landlock_ruleset_attr` (linux/landlock.h); the kernel reads as much
/// of it as the size passed says, which is how older ABIs are served.
#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1 << 0;
const LANDLOCK_ACCESS_FS_REFER: u64 = 1 << 13;
const LANDLOCK_RULE_PATH_BENEATH: u32 = 1;
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;

/// `struct landlock_path_beneath_attr` (packed in the kernel's header too).
#[repr(C, packed)]
struct LandlockPathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ruleset a sandbox's first process restricts itself with, or
/// `None` where the kernel has no usable Landlock (the sandbox then has its
/// cgroup and uid, but not the isolation above; the daemon warns at start).
///
/// It confines nothing on the file system. What matters is the domain it
/// creates (and, from ABI 6, the scopes).
pub fn isolation_ruleset() -> io::Result<Option<OwnedFd>> {
    ruleset_for_abi(landlock_abi())
}

/// The kernel's Landlock ABI version; 0 or less without Landlock.
fn landlock_abi() -> i64 {
    // SAFETY: the version query takes no attribute.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<LandlockRulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    }
}

fn ruleset_for_abi(abi: i64) -> io::Result<Option<OwnedFd>> {
    let (attr, size) = match abi {
        // ABI 1 forbids every cross-directory rename and link once a domain
        // exists: too much to impose on programs.
        ..=1 => return Ok(None),
        // Handling any file-system right makes Landlock refuse cross-directory
        // renames and links (REFER) unless a rule grants it: handled, and
        // granted below `/`.
        2..=5 => (
            LandlockRulesetAttr {
                handled_access_fs: LANDLOCK_ACCESS_FS_REFER,
                handled_access_net: 0,
                scoped: 0,
            },
            if abi < 4 { 8 } else { 16 },
        ),
        _ => (
            LandlockRulesetAttr {
                handled_access_fs: 0,
                handled_access_net: 0,
                scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL,
            },
            std::mem::size_of::<LandlockRulesetAttr>(),
        ),
    };
    // SAFETY: `attr` is a valid landlock_ruleset_attr of at least `size` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const LandlockRulesetAttr,
            size,
            0u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    if attr.handled_access_fs & LANDLOCK_ACCESS_FS_REFER != 0 {
        let root = File::open("/")?;
        let beneath = LandlockPathBeneathAttr {
            allowed_access: LANDLOCK_ACCESS_FS_REFER,
            parent_fd: root.as_raw_fd(),
        };
        // SAFETY: valid descriptors and a valid rule attribute.
        let added = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                LANDLOCK_RULE_PATH_BENEATH,
                &beneath as *const LandlockPathBeneathAttr,
                0u32,
            )
        };
        if added != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Some(ruleset))
}

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
/// `uid`/`gid`, sets no_new_privs, restricts itself with `ruleset` (from
/// [`isolation_ruleset`]), and marks every descriptor from `keep_below` up
/// close-on-exec. Only async-signal-safe system calls.
///
/// # Safety
/// Call only in a freshly forked child (e.g. from `pre_exec`).
pub unsafe fn enter(
    procs_fd: RawFd,
    uid: u32,
    gid: u32,
    ruleset: Option<RawFd>,
    keep_below: u32,
) -> io::Result<()> {
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
    if let Some(ruleset) = ruleset {
        if libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) != 0 {
            return fail();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Whatever the ABI, the domain keeps its process from reaching its parent
    /// and leaves cross-directory renames alone.
    #[test]
    fn each_ruleset_makes_a_domain_that_still_renames_across_directories() {
        let abi = landlock_abi();
        if abi < 6 {
            eprintln!("Landlock ABI {abi}: the ABI 2-5 and 6+ rulesets need a kernel with ABI 6");
            return;
        }
        for abi in [2, 4, abi] {
            let dir = tempfile::tempdir().unwrap();
            let ruleset = ruleset_for_abi(abi).unwrap().expect("a ruleset");
            let fd = ruleset.as_raw_fd();
            let script = "import ctypes,os\n\
                os.makedirs('a');os.makedirs('b');open('a/f','w').close()\n\
                os.rename('a/f','b/f');os.link('b/f','a/g');print('renamed')\n\
                libc=ctypes.CDLL(None,use_errno=True)\n\
                print('ptrace', libc.ptrace(16,os.getppid(),0,0))\n";
            let mut cmd = std::process::Command::new("python3");
            cmd.args(["-c", script]).current_dir(dir.path());
            // SAFETY: only async-signal-safe system calls.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let out = cmd.output().unwrap();
            let printed = String::from_utf8_lossy(&out.stdout);
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(printed.contains("renamed"), "ABI {abi}: {printed}{why}");
            assert!(printed.contains("ptrace -1"), "ABI {abi}: {printed}{why}");
        }
    }
}
