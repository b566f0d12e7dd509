//! How a process enters a sandbox: it joins its cgroup, gets an IPC namespace
//! and rlimits of its own, drops to its uid with no new privileges, enters a
//! Landlock domain of its own and the syscall filter ([`syscall_filter`]), and
//! keeps none of its parent's descriptors. Used between fork and exec by
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
use std::sync::OnceLock;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::config::SandboxLimits;

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

/// The seccomp-BPF programs every sandbox runs under, compiled once. What a
/// sandboxed program never needs and could use to get around the cgroup hooks
/// or reach another tenant is refused:
///
/// - new namespaces: `unshare` and `clone` with any `CLONE_NEW*` flag, and
///   `setns` (EPERM). `clone3`, whose flags sit in memory a filter cannot
///   read, answers ENOSYS, so libc falls back to `clone` (as Docker's profile
///   does);
/// - `io_uring_setup`/`_enter`/`_register`: ENOSYS, "this kernel has none",
///   which every io_uring user falls back from (EPERM is also read as
///   "disabled by sysctl" by some, but not all);
/// - `socket`/`socketpair` of any family but AF_UNIX, AF_INET, AF_INET6 and
///   AF_NETLINK with protocol NETLINK_ROUTE (getaddrinfo's interface query):
///   EPERM;
/// - what Docker's default profile refuses that an unprivileged process could
///   still do: kernel keyrings (`keyctl`, `add_key`, `request_key`: the user
///   keyring is shared by every process of a uid), `bpf`, `perf_event_open`,
///   `userfaultfd`, `syslog`; and, though they need capabilities a sandbox
///   lacks, mounts (`mount`, `umount2`, `pivot_root`, the new mount API),
///   modules, `kexec_load`, `reboot`, `swapon`/`swapoff`, `acct`,
///   `open_by_handle_at`: EPERM.
///
/// Syscalls of another ABI (32-bit x86, AArch32) kill the process: the rules
/// are in the native numbering only. On x86_64, x32 syscalls (same audit
/// arch, numbers from 0x40000000) answer ENOSYS. `ptrace` and
/// `process_vm_readv` stay: a debugger inside a sandbox is legitimate, and
/// the Landlock domain keeps them inside it.
pub struct SyscallFilter {
    programs: Vec<Vec<libc::sock_filter>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the sandbox's syscall filter: {0}")]
pub struct FilterError(String);

/// The filter, built on first use (before any fork: [`enter`] only installs it).
pub fn syscall_filter() -> Result<&'static SyscallFilter, FilterError> {
    static FILTER: OnceLock<Result<SyscallFilter, String>> = OnceLock::new();
    FILTER
        .get_or_init(|| build_filter().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| FilterError(e.clone()))
}

const CLONE_NEW_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];
/// Only for `unshare`: in `clone`'s flags this bit is part of the exit signal.
const CLONE_NEWTIME: i32 = 0x80;
const NETLINK_ROUTE: u64 = 0;

fn build_filter() -> Result<SyscallFilter, seccompiler::Error> {
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into()?;
    let cond = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
    };
    let any_flag = |flags: &[i32]| -> Result<Vec<SeccompRule>, seccompiler::Error> {
        flags
            .iter()
            .map(|&flag| {
                let flag = flag as u32 as u64;
                Ok(SeccompRule::new(vec![cond(
                    0,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?])?)
            })
            .collect()
    };
    let mut unshare_flags = CLONE_NEW_FLAGS.to_vec();
    unshare_flags.push(CLONE_NEWTIME);
    // socket(domain, type, protocol): refused when the domain is none of the
    // allowed ones, or is netlink with another protocol than NETLINK_ROUTE.
    let families = || -> Result<Vec<SeccompRule>, seccompiler::Error> {
        let netlink = libc::AF_NETLINK as u64;
        Ok(vec![
            SeccompRule::new(
                [
                    libc::AF_UNIX,
                    libc::AF_INET,
                    libc::AF_INET6,
                    libc::AF_NETLINK,
                ]
                .iter()
                .map(|&family| cond(0, SeccompCmpOp::Ne, family as u64))
                .collect::<Result<_, _>>()?,
            )?,
            SeccompRule::new(vec![
                cond(0, SeccompCmpOp::Eq, netlink)?,
                cond(2, SeccompCmpOp::Ne, NETLINK_ROUTE)?,
            ])?,
        ])
    };
    let mut refused: Vec<(i64, Vec<SeccompRule>)> = vec![
        (libc::SYS_unshare, any_flag(&unshare_flags)?),
        (libc::SYS_clone, any_flag(&CLONE_NEW_FLAGS)?),
        (libc::SYS_setns, vec![]),
        (libc::SYS_socket, families()?),
        (libc::SYS_socketpair, families()?),
    ];
    for always in [
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_syslog,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_open_by_handle_at,
    ] {
        refused.push((always, vec![]));
    }
    let absent: Vec<(i64, Vec<SeccompRule>)> = [
        libc::SYS_clone3,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, vec![]))
    .collect();
    // One filter per answer: seccompiler gives each filter a single action.
    let compile = |rules: Vec<(i64, Vec<SeccompRule>)>, errno: i32| {
        let filter = SeccompFilter::new(
            rules.into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )?;
        let program: seccompiler::BpfProgram = filter.try_into()?;
        Ok::<_, seccompiler::Error>(
            program
                .into_iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect(),
        )
    };
    let mut programs = vec![
        compile(refused, libc::EPERM)?,
        compile(absent, libc::ENOSYS)?,
    ];
    if cfg!(target_arch = "x86_64") {
        programs.push(x32_refused());
    }
    Ok(SyscallFilter { programs })
}

/// x32 syscalls share x86_64's audit arch, with numbers from 0x40000000: the
/// rules above would not see them. ENOSYS, as on a kernel without x32.
fn x32_refused() -> Vec<libc::sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld, jeq, jge, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    vec![
        op(ld, 0, 0, 4), // seccomp_data.arch
        op(jeq, 0, 3, AUDIT_ARCH_X86_64),
        op(ld, 0, 0, 0), // seccomp_data.nr
        op(jge, 0, 1, X32_SYSCALL_BIT),
        op(ret, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        op(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

impl SyscallFilter {
    /// Installs every program on the calling thread; no_new_privs must be set.
    /// Async-signal-safe: no allocation.
    ///
    /// # Safety
    /// Only the calling thread is filtered: call it where that is the whole
    /// process (a forked child before exec).
    pub unsafe fn install(&self) -> io::Result<()> {
        for program in &self.programs {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr().cast_mut(),
            };
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Who a sandbox's processes are, and what holds them, for [`enter`].
#[derive(Clone, Copy)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub limits: SandboxLimits,
}

/// In the child, between fork and exec: moves this process into the cgroup
/// whose `cgroup.procs` is open as `procs_fd`, into a new IPC namespace (no
/// SysV queue, semaphore, shared memory or POSIX message queue of another
/// sandbox is visible), sets the rlimits (soft and hard, so they cannot be
/// raised again), drops every group and becomes `uid`/`gid`, sets
/// no_new_privs, restricts itself with `ruleset` (from [`isolation_ruleset`]),
/// marks every descriptor from `keep_below` up close-on-exec, and installs
/// `filter`. Only async-signal-safe system calls.
///
/// # Safety
/// Call only in a freshly forked child (e.g. from `pre_exec`).
pub unsafe fn enter(
    procs_fd: RawFd,
    who: Identity,
    ruleset: Option<RawFd>,
    filter: &SyscallFilter,
    keep_below: u32,
) -> io::Result<()> {
    let fail = || Err(io::Error::last_os_error());
    let Identity { uid, gid, limits } = who;
    if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
        return fail();
    }
    // Still privileged: the namespace needs CAP_SYS_ADMIN, the limits may be
    // above the caller's hard ones.
    if libc::unshare(libc::CLONE_NEWIPC) != 0 {
        return fail();
    }
    for (resource, value) in [
        (libc::RLIMIT_NOFILE, limits.nofile),
        (libc::RLIMIT_NPROC, limits.nproc),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        if libc::setrlimit(resource, &limit) != 0 {
            return fail();
        }
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
    filter.install()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Runs a Python script under no_new_privs and the syscall filter alone
    /// (no root needed); returns what it printed.
    fn filtered_python(script: &str) -> String {
        let filter = syscall_filter().expect("the filter builds on this architecture");
        let mut cmd = std::process::Command::new("python3");
        cmd.args(["-c", script]);
        // SAFETY: prctl and seccomp only; `install` does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                filter.install()
            });
        }
        let out = cmd.output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed
    }

    #[test]
    fn the_filter_refuses_namespaces_io_uring_and_other_socket_families() {
        let x32 = if cfg!(target_arch = "x86_64") {
            format!("call('x32-getpid',0x40000000|{})\n", libc::SYS_getpid)
        } else {
            "print('x32-getpid ENOSYS')\n".to_string()
        };
        let printed = filtered_python(&format!(
            "import ctypes,os,socket,errno\n\
             libc=ctypes.CDLL(None,use_errno=True)\n\
             def call(name,*args):\n\
             \x20 r=libc.syscall(*args)\n\
             \x20 print(name, 'ok' if r>=0 else errno.errorcode[ctypes.get_errno()])\n\
             call('unshare-user',{unshare},0x10000000)\n\
             call('unshare-net',{unshare},0x40000000)\n\
             call('unshare-time',{unshare},0x80)\n\
             call('setns',{setns},0,0)\n\
             call('clone3',{clone3},0,0)\n\
             p=(ctypes.c_ubyte*120)()\n\
             call('io_uring_setup',{io_uring_setup},8,p)\n\
             call('keyctl',{keyctl},0,0)\n\
             {x32}\
             def sock(name,*args):\n\
             \x20 try:\n\
             \x20\x20 socket.socket(*args).close(); print(name,'ok')\n\
             \x20 except OSError as e: print(name, errno.errorcode[e.errno])\n\
             sock('vsock',40,1,0)\n\
             sock('packet',17,3,0)\n\
             sock('netlink-audit',16,3,9)\n\
             sock('netlink-route',16,3,0)\n\
             sock('unix',1,1,0)\n\
             sock('inet',2,1,0)\n\
             sock('inet6',10,2,0)\n\
             try:\n\
             \x20 socket.socketpair(40,1,0); print('socketpair-vsock ok')\n\
             except OSError as e: print('socketpair-vsock', errno.errorcode[e.errno])\n\
             socket.socketpair(1,1,0); print('socketpair-unix ok')\n\
             call('unshare-files',{unshare},0x400)\n",
            unshare = libc::SYS_unshare,
            setns = libc::SYS_setns,
            clone3 = libc::SYS_clone3,
            io_uring_setup = libc::SYS_io_uring_setup,
            keyctl = libc::SYS_keyctl,
        ));
        let want = [
            "unshare-user EPERM",
            "unshare-net EPERM",
            "unshare-time EPERM",
            "setns EPERM",
            "clone3 ENOSYS",
            "io_uring_setup ENOSYS",
            "keyctl EPERM",
            "x32-getpid ENOSYS",
            "vsock EPERM",
            "packet EPERM",
            "netlink-audit EPERM",
            "netlink-route ok",
            "unix ok",
            "inet ok",
            "inet6 ok",
            "socketpair-vsock EPERM",
            "socketpair-unix ok",
            "unshare-files ok",
        ];
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines, want, "{printed}");
    }

    /// clone3 answers ENOSYS, so threads and child processes still start
    /// (through clone, without namespace flags).
    #[test]
    fn programs_still_start_threads_and_processes_under_the_filter() {
        let printed = filtered_python(
            "import threading,subprocess\n\
             t=threading.Thread(target=lambda: print('thread ran')); t.start(); t.join()\n\
             print(subprocess.run(['sh','-c','echo child ran'],capture_output=True,text=True).stdout.strip())\n",
        );
        assert_eq!(printed, "thread ran\nchild ran\n");
    }

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
