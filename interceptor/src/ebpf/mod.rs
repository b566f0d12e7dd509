//! Kernel enforcement: loads the cgroup eBPF programs built from
//! `interceptor-ebpf`, attaches them to the interceptor's cgroup subtree, and
//! reads back where each redirected socket really wanted to go.
//!
//! The programs are attached with the classic `BPF_PROG_ATTACH` (not a
//! `bpf_link`, which dies with its file descriptor), so they stay attached when
//! the daemon exits: sandboxed connections then go to a relay port nobody
//! listens on and fail (fail closed). A restarted daemon swaps its new
//! programs in atomically over the old ones (`BPF_F_REPLACE`), recognising
//! them by name (every program is called `icpt_*`).
//!
//! The task-keyed programs (at the cgroup root, and BPF LSM programs where the
//! kernel takes them), which judge by the calling *task* whatever socket it
//! uses, attach through links instead; those are pinned on a bpffs (see
//! `pins`) so that they too stay when the daemon dies.

mod cgroup;
mod pins;
mod sys;

use std::{
    fmt,
    fs::File,
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray},
    programs::{Program, ProgramError},
    Btf, Ebpf, EbpfLoader,
};
pub use cgroup::{cgroup2_mount, cgroup_id};
pub use interceptor_common::OriginalDestination;
use interceptor_common::{
    maps, ClientSocket, Counter, RedirectConfig, MAX_GUARDED_PORTS, PROGRAM_PREFIX,
};

/// The id of the cgroup v2 hierarchy's root.
const ROOT_CGROUP_ID: u64 = 1;

/// The eBPF object built by `build.rs` from `interceptor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor.bpf.o"));

/// Everything that can go wrong loading, attaching or querying the programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "cannot load the eBPF programs: {0} (this needs root, or CAP_BPF with CAP_NET_ADMIN, \
         and a kernel with BPF and cgroup BPF support)"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "the embedded eBPF object has no program `{0}` (stale build? run `cargo xtask build`)"
    )]
    MissingProgram(&'static str),
    #[error("eBPF program `{0}` has an unexpected program type")]
    UnexpectedProgramType(&'static str),
    #[error("the kernel refused eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the embedded eBPF object has no map `{0}` (stale build? run `cargo xtask build`)")]
    MissingMap(&'static str),
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open cgroup {}: {source}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach eBPF program `{program}` ({attach_type}) to cgroup {}: {source}", cgroup.display())]
    Attach {
        program: &'static str,
        attach_type: &'static str,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot detach eBPF program {id} ({attach_type}) from cgroup {}: {source}", cgroup.display())]
    Detach {
        id: u32,
        attach_type: &'static str,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the {attach_type} eBPF programs of cgroup {}: {source}", cgroup.display())]
    Query {
        attach_type: &'static str,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read eBPF program information: {0}")]
    ProgramInfo(#[source] io::Error),
    #[error("cannot read {}: {source}", path.display())]
    Mounts {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the IPv4 and IPv6 {what} must use the same port (got {v4} and {v6}): \
         the eBPF programs keep one port for both"
    )]
    PortMismatch {
        what: &'static str,
        v4: u16,
        v6: u16,
    },
    #[error(
        "no cgroup v2 filesystem is mounted (no `cgroup2` entry in /proc/self/mounts); \
         interceptor needs cgroup v2"
    )]
    NoCgroup2,
    #[error(
        "cannot read the kernel's BTF (/sys/kernel/btf/vmlinux), which the LSM programs need: {0}"
    )]
    Btf(#[source] aya::BtfError),
    #[error("cannot attach LSM program `{program}` (hook {hook}): {source}")]
    AttachLsm {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("bpffs pin {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the cgroup v2 mount {} is not the hierarchy's root (a cgroup namespace?): \
         interceptor must run where it sees the host's cgroup root",
        .0.display()
    )]
    NotHierarchyRoot(PathBuf),
    #[error("more than {MAX_GUARDED_PORTS} daemon ports to guard")]
    TooManyPorts,
}

/// Where the programs send what they redirect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectTargets {
    /// TCP from `AF_INET` sockets.
    pub relay_v4: SocketAddrV4,
    /// TCP from `AF_INET6` sockets (IPv4-mapped destinations included).
    pub relay_v6: SocketAddrV6,
    /// DNS (UDP port 53) from `AF_INET` sockets.
    pub dns_v4: SocketAddrV4,
    /// DNS from `AF_INET6` sockets.
    pub dns_v6: SocketAddrV6,
}

impl RedirectTargets {
    /// Relay and DNS listener on `127.0.0.1` and `[::1]`, each on one port.
    pub fn loopback(relay_port: u16, dns_port: u16) -> Self {
        use std::net::{Ipv4Addr, Ipv6Addr};
        Self {
            relay_v4: SocketAddrV4::new(Ipv4Addr::LOCALHOST, relay_port),
            relay_v6: SocketAddrV6::new(Ipv6Addr::LOCALHOST, relay_port, 0, 0),
            dns_v4: SocketAddrV4::new(Ipv4Addr::LOCALHOST, dns_port),
            dns_v6: SocketAddrV6::new(Ipv6Addr::LOCALHOST, dns_port, 0, 0),
        }
    }

    fn config(&self) -> Result<RedirectConfig, EbpfError> {
        for (what, v4, v6) in [
            (
                "relay addresses",
                self.relay_v4.port(),
                self.relay_v6.port(),
            ),
            ("DNS addresses", self.dns_v4.port(), self.dns_v6.port()),
        ] {
            if v4 != v6 {
                return Err(EbpfError::PortMismatch { what, v4, v6 });
            }
        }
        Ok(RedirectConfig {
            relay_ip4: self.relay_v4.ip().octets(),
            dns_ip4: self.dns_v4.ip().octets(),
            relay_ip6: self.relay_v6.ip().octets(),
            dns_ip6: self.dns_v6.ip().octets(),
            relay_port: self.relay_v4.port(),
            dns_port: self.dns_v4.port(),
            ready: 1,
            // Set by `Enforcement::load`, which knows the subtree.
            subtree_cgroup_id: 0,
            subtree_level: 0,
            sockets_per_tenant: 0,
        })
    }
}

/// One cgroup program of the object and where it goes.
struct ProgramSpec {
    /// Function (and kernel program) name, ≤ 15 characters.
    name: &'static str,
    attach_type: AttachType,
}

/// The cgroup attach types the programs use (`enum bpf_attach_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttachType {
    InetIngress = 0,
    InetEgress = 1,
    SockCreate = 2,
    SockOps = 3,
    Bind4 = 8,
    Bind6 = 9,
    Connect4 = 10,
    PostBind4 = 12,
    PostBind6 = 13,
    Connect6 = 11,
    Sendmsg4 = 14,
    Sendmsg6 = 15,
    Recvmsg4 = 19,
    Recvmsg6 = 20,
    Getpeername4 = 29,
    Getpeername6 = 30,
    SetSockopt = 22,
    SockRelease = 34,
}

impl AttachType {
    /// As `status` shows a task-keyed program attached at the cgroup root.
    fn root_name(self) -> &'static str {
        match self {
            Self::Bind4 => "root/bind4",
            Self::Bind6 => "root/bind6",
            Self::Sendmsg4 => "root/sendmsg4",
            Self::Sendmsg6 => "root/sendmsg6",
            Self::Connect4 => "root/connect4",
            Self::Connect6 => "root/connect6",
            _ => "root",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::InetIngress => "ingress",
            Self::InetEgress => "egress",
            Self::SockCreate => "sock_create",
            Self::SockOps => "sock_ops",
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::PostBind4 => "post_bind4",
            Self::PostBind6 => "post_bind6",
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::Recvmsg4 => "recvmsg4",
            Self::Recvmsg6 => "recvmsg6",
            Self::Getpeername4 => "getpeername4",
            Self::Getpeername6 => "getpeername6",
            Self::SetSockopt => "setsockopt",
            Self::SockRelease => "sock_release",
        }
    }
}

const fn spec(name: &'static str, attach_type: AttachType) -> ProgramSpec {
    ProgramSpec { name, attach_type }
}

/// In attach order: bookkeeping first, then the guards and the packet
/// backstop, the redirects last, so a redirected connection always finds the
/// hand-off and restore programs in place.
const PROGRAMS: &[ProgramSpec] = &[
    // Release before create: no socket is counted that is never given back.
    spec("icpt_release", AttachType::SockRelease),
    spec("icpt_sockcreate", AttachType::SockCreate),
    spec("icpt_sockops", AttachType::SockOps),
    spec("icpt_recvmsg4", AttachType::Recvmsg4),
    spec("icpt_recvmsg6", AttachType::Recvmsg6),
    spec("icpt_peername4", AttachType::Getpeername4),
    spec("icpt_peername6", AttachType::Getpeername6),
    spec("icpt_bind4", AttachType::Bind4),
    spec("icpt_bind6", AttachType::Bind6),
    spec("icpt_postbind4", AttachType::PostBind4),
    spec("icpt_postbind6", AttachType::PostBind6),
    spec("icpt_setsockopt", AttachType::SetSockopt),
    spec("icpt_egress", AttachType::InetEgress),
    spec("icpt_ingress", AttachType::InetIngress),
    spec("icpt_sendmsg4", AttachType::Sendmsg4),
    spec("icpt_sendmsg6", AttachType::Sendmsg6),
    spec("icpt_connect4", AttachType::Connect4),
    spec("icpt_connect6", AttachType::Connect6),
];

/// The task-keyed programs attached to the root of the cgroup v2 hierarchy
/// (through links pinned in the subtree's bpffs directory, so that each
/// subtree's go with it): they see the sockets created outside the subtree.
const ROOT_PROGRAMS: &[ProgramSpec] = &[
    spec("icpt_t_bind4", AttachType::Bind4),
    spec("icpt_t_bind6", AttachType::Bind6),
    spec("icpt_t_send4", AttachType::Sendmsg4),
    spec("icpt_t_send6", AttachType::Sendmsg6),
    spec("icpt_t_conn4", AttachType::Connect4),
    spec("icpt_t_conn6", AttachType::Connect6),
];

/// One BPF LSM program and its hook.
struct LsmSpec {
    name: &'static str,
    /// `lsm/<hook>`, as `status` shows it.
    attach_type: &'static str,
}

impl LsmSpec {
    fn hook(&self) -> &'static str {
        self.attach_type.trim_start_matches("lsm/")
    }
}

const fn lsm(name: &'static str, attach_type: &'static str) -> LsmSpec {
    LsmSpec { name, attach_type }
}

/// They take the sandbox's own sockets from what the cgroup `sock_create`
/// program records.
const LSM_PROGRAMS: &[LsmSpec] = &[
    lsm("icpt_l_create", "lsm/socket_create"),
    lsm("icpt_l_userns", "lsm/userns_create"),
    lsm("icpt_l_setsopt", "lsm/socket_setsockopt"),
    lsm("icpt_l_listen", "lsm/socket_listen"),
    lsm("icpt_l_accept", "lsm/socket_accept"),
    lsm("icpt_l_bind", "lsm/socket_bind"),
    lsm("icpt_l_connect", "lsm/socket_connect"),
    lsm("icpt_l_sendmsg", "lsm/socket_sendmsg"),
    lsm("icpt_l_recvmsg", "lsm/socket_recvmsg"),
];

/// Whether the task-keyed LSM programs run on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LsmState {
    Active,
    /// Why not: the sandboxes then rely on their seccomp filter alone.
    Inactive(String),
}

/// The loaded programs and their maps.
pub struct Enforcement {
    ebpf: Ebpf,
    table: DestinationTable,
    counters: EnforcementCounters,
    targets: RedirectTargets,
    config: RedirectConfig,
    subtree: PathBuf,
    pin_dir: PathBuf,
    lsm: LsmState,
}

impl fmt::Debug for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enforcement")
            .field("targets", &self.targets)
            .field("subtree", &self.subtree)
            .field("lsm", &self.lsm)
            .finish_non_exhaustive()
    }
}

impl Enforcement {
    /// Loads every program into the kernel (the verifier checks them here) for
    /// the cgroup subtree `subtree` (which must exist), guards the relay's and
    /// DNS listener's ports, and marks the redirect configuration ready.
    /// Nothing is attached yet.
    pub fn load(targets: &RedirectTargets, subtree: &Path) -> Result<Self, EbpfError> {
        let mut config_value = targets.config()?;
        let cgroup_mount = cgroup2_mount()?;
        // The kernel numbers ancestor levels, and the task-keyed programs
        // attach, from the hierarchy's real root (id 1): a mount of anything
        // else (in a cgroup namespace) would make them judge nobody.
        let mount_id = cgroup_id(&cgroup_mount).map_err(|source| EbpfError::OpenCgroup {
            path: cgroup_mount.clone(),
            source,
        })?;
        if mount_id != ROOT_CGROUP_ID {
            return Err(EbpfError::NotHierarchyRoot(cgroup_mount));
        }
        config_value.subtree_cgroup_id =
            cgroup_id(subtree).map_err(|source| EbpfError::OpenCgroup {
                path: subtree.to_path_buf(),
                source,
            })?;
        config_value.subtree_level = subtree
            .strip_prefix(&cgroup_mount)
            .map_or(0, |relative| relative.components().count() as u32);
        pins::remove_stale(&cgroup_mount);
        let pin_dir = pins::subtree_dir(&cgroup_mount, subtree)?;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&pin_dir)
            .load(OBJECT)
            .map_err(EbpfError::Load)?;

        write_config(&mut ebpf, config_value)?;

        for spec in PROGRAMS.iter().chain(ROOT_PROGRAMS) {
            let program = ebpf
                .program_mut(spec.name)
                .ok_or(EbpfError::MissingProgram(spec.name))?;
            let loaded = match program {
                Program::CgroupSockAddr(p) => p.load(),
                Program::SockOps(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                Program::CgroupSkb(p) => p.load(),
                Program::CgroupSockopt(p) => p.load(),
                _ => return Err(EbpfError::UnexpectedProgramType(spec.name)),
            };
            loaded.map_err(|source| EbpfError::Program {
                name: spec.name,
                source,
            })?;
        }

        let lsm = match pins::bpf_lsm_active() {
            Ok(true) => match load_lsm(&mut ebpf) {
                Ok(()) => LsmState::Active,
                // Some kernels (these CI machines among them) refuse every
                // BTF-attached program, to root too (EPERM before the verifier):
                // the cgroup programs stand. Anything else is a fault of ours.
                Err(EbpfError::Program {
                    source: ProgramError::LoadError { io_error, .. },
                    ..
                }) if io_error.raw_os_error() == Some(libc::EPERM) => LsmState::Inactive(
                    "the kernel refuses BTF-attached programs (EPERM at load)".into(),
                ),
                Err(e) => return Err(e),
            },
            Ok(false) => LsmState::Inactive(
                "the BPF LSM is not active on this kernel (`bpf` is missing from \
                 /sys/kernel/security/lsm; add it to the lsm= boot parameter)"
                    .into(),
            ),
            Err(e) => LsmState::Inactive(format!("cannot read the active LSMs: {e}")),
        };

        let destinations = take_hash_map(&mut ebpf, maps::SOCKET_DESTINATIONS)?;
        let handoff = take_hash_map(&mut ebpf, maps::RELAY_HANDOFF)?;
        let counters = ebpf
            .take_map(maps::COUNTERS)
            .ok_or(EbpfError::MissingMap(maps::COUNTERS))?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| EbpfError::Map {
            name: maps::COUNTERS,
            source,
        })?;
        let mut enforcement = Self {
            ebpf,
            table: DestinationTable {
                destinations: Arc::new(destinations),
                handoff: Arc::new(handoff),
            },
            counters: EnforcementCounters(Arc::new(counters)),
            targets: *targets,
            config: config_value,
            subtree: subtree.to_path_buf(),
            pin_dir,
            lsm,
        };
        enforcement.guard_ports([targets.relay_v4.port(), targets.dns_v4.port()])?;
        Ok(enforcement)
    }

    /// Refuses these ports (the daemon's other listeners: each dispatch
    /// `listen`) to every bind in the subtree, as the relay's and DNS's are.
    pub fn guard_ports(&mut self, ports: impl IntoIterator<Item = u16>) -> Result<(), EbpfError> {
        let map = self
            .ebpf
            .map_mut(maps::GUARDED_PORTS)
            .ok_or(EbpfError::MissingMap(maps::GUARDED_PORTS))?;
        let mut guarded: HashMap<_, u16, u8> =
            HashMap::try_from(map).map_err(|source| EbpfError::Map {
                name: maps::GUARDED_PORTS,
                source,
            })?;
        for port in ports {
            guarded.insert(port, 1, 0).map_err(|source| match source {
                MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    EbpfError::TooManyPorts
                }
                source => EbpfError::Map {
                    name: maps::GUARDED_PORTS,
                    source,
                },
            })?;
        }
        Ok(())
    }

    /// Caps the inet sockets the sandboxes of one tenant hold at once (each
    /// child cgroup of the subtree root: a tenant of `exec`, a dispatch
    /// namespace); 0 lifts the cap.
    pub fn limit_sockets_per_tenant(&mut self, limit: u32) -> Result<(), EbpfError> {
        self.config.sockets_per_tenant = limit;
        write_config(&mut self.ebpf, self.config)
    }

    /// Whether the task-keyed LSM programs run here (the task-keyed cgroup
    /// programs run everywhere).
    pub fn lsm_state(&self) -> &LsmState {
        &self.lsm
    }

    /// Attaches every program: the cgroup programs to the subtree root
    /// (inherited by every cgroup below it) with `BPF_PROG_ATTACH` and
    /// `BPF_F_ALLOW_MULTI`, the LSM programs through links pinned in the
    /// subtree's bpffs directory.
    ///
    /// A program of the same name left by a previous daemon is replaced
    /// atomically (`BPF_F_REPLACE`; for an LSM program, the new link is in
    /// place before the old pin goes), so there is no moment without
    /// enforcement and no second copy. The programs stay attached after this
    /// process exits; nothing detaches them on drop.
    pub fn attach(&mut self) -> Result<(), EbpfError> {
        // Task-keyed first: from the moment the subtree's sockets are
        // redirected, sockets from outside are refused too.
        self.attach_to_root()?;
        if self.lsm == LsmState::Active {
            self.attach_lsm()?;
        }
        self.attach_to_cgroup()
    }

    /// The descriptor and kernel id of the loaded program `name`.
    fn loaded(&self, name: &'static str) -> Result<(std::os::fd::BorrowedFd<'_>, u32), EbpfError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or(EbpfError::MissingProgram(name))?;
        let fd = program
            .fd()
            .map_err(|source| EbpfError::Program { name, source })?
            .as_fd();
        let (id, _) = sys::prog_id_name(fd).map_err(EbpfError::ProgramInfo)?;
        Ok((fd, id))
    }

    fn attach_to_root(&mut self) -> Result<(), EbpfError> {
        let root_dir = cgroup2_mount()?;
        let root = open_cgroup(&root_dir)?;
        for spec in ROOT_PROGRAMS {
            let (prog_fd, our_id) = self.loaded(spec.name)?;
            pins::attach_pinned(&self.pin_dir, spec.name, our_id, |path| {
                let link = sys::link_create(prog_fd, root.as_fd(), spec.attach_type as u32)
                    .map_err(|source| EbpfError::Attach {
                        program: spec.name,
                        attach_type: spec.attach_type.name(),
                        cgroup: root_dir.clone(),
                        source,
                    })?;
                sys::obj_pin(link.as_fd(), path).map_err(|source| EbpfError::Pin {
                    path: path.to_path_buf(),
                    source,
                })
            })?;
        }
        Ok(())
    }

    fn attach_lsm(&mut self) -> Result<(), EbpfError> {
        for spec in LSM_PROGRAMS {
            let Some(Program::Lsm(program)) = self.ebpf.program_mut(spec.name) else {
                return Err(EbpfError::MissingProgram(spec.name));
            };
            let attach_error = |source| EbpfError::AttachLsm {
                program: spec.name,
                hook: spec.hook(),
                source,
            };
            let our_id = program.info().map_err(attach_error)?.id();
            pins::attach_pinned(&self.pin_dir, spec.name, our_id, |path| {
                let link = program.attach().map_err(attach_error)?;
                let link = aya::programs::links::FdLink::from(
                    program.take_link(link).map_err(attach_error)?,
                );
                link.pin(path).map(drop).map_err(|e| EbpfError::Pin {
                    path: path.to_path_buf(),
                    source: io::Error::other(e),
                })
            })?;
        }
        Ok(())
    }

    fn attach_to_cgroup(&mut self) -> Result<(), EbpfError> {
        let cgroup_dir = self.subtree.clone();
        let cgroup_dir = cgroup_dir.as_path();
        let cgroup = open_cgroup(cgroup_dir)?;
        for spec in PROGRAMS {
            let (prog_fd, our_id) = self.loaded(spec.name)?;
            let attach_type = spec.attach_type;
            let attach_error = |source| EbpfError::Attach {
                program: spec.name,
                attach_type: attach_type.name(),
                cgroup: cgroup_dir.to_path_buf(),
                source,
            };

            // Programs already attached here under the same name.
            let mut already_ours = false;
            let mut previous: Vec<OwnedFd> = Vec::new();
            for id in query(&cgroup, cgroup_dir, attach_type)? {
                if id == our_id {
                    already_ours = true;
                    continue;
                }
                let Ok(fd) = sys::prog_fd_by_id(id) else {
                    continue; // Unloaded meanwhile.
                };
                let Ok((_, name)) = sys::prog_id_name(fd.as_fd()) else {
                    continue;
                };
                if name.starts_with(PROGRAM_PREFIX) && name == spec.name {
                    previous.push(fd);
                }
            }

            let mut stale = previous.iter();
            if !already_ours {
                let replaced = match stale.next() {
                    Some(old) => {
                        match sys::prog_attach(
                            cgroup.as_fd(),
                            prog_fd,
                            attach_type as u32,
                            sys::BPF_F_ALLOW_MULTI | sys::BPF_F_REPLACE,
                            Some(old.as_fd()),
                        ) {
                            Ok(()) => true,
                            // The old program went away between query and replace.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
                            Err(e) => return Err(attach_error(e)),
                        }
                    }
                    None => false,
                };
                if !replaced {
                    sys::prog_attach(
                        cgroup.as_fd(),
                        prog_fd,
                        attach_type as u32,
                        sys::BPF_F_ALLOW_MULTI,
                        None,
                    )
                    .map_err(attach_error)?;
                }
            }
            // Our program is in place: extra copies of it are redundant.
            for old in stale {
                match sys::prog_detach(cgroup.as_fd(), old.as_fd(), attach_type as u32) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(source) => {
                        let id = sys::prog_id_name(old.as_fd()).map_or(0, |(id, _)| id);
                        return Err(EbpfError::Detach {
                            id,
                            attach_type: attach_type.name(),
                            cgroup: cgroup_dir.to_path_buf(),
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// A shareable handle on the destination maps, for the relay and DNS.
    pub fn destinations(&self) -> DestinationTable {
        self.table.clone()
    }

    /// A shareable handle on what the programs count, for `status`.
    pub fn counters(&self) -> EnforcementCounters {
        self.counters.clone()
    }
}

/// What the programs refused, summed over CPUs since they were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnforcementCounts {
    /// Packets a sandbox's socket sent to anything but the relay or DNS listener.
    pub egress_dropped: u64,
    /// Packets for a sandbox's socket from anything but the relay or DNS listener.
    pub ingress_dropped: u64,
    /// Socket calls of sandboxed tasks refused: a socket from outside, a
    /// routing option, the per-tenant socket cap, an LSM hook.
    pub calls_refused: u64,
}

/// A handle on the `COUNTERS` map.
#[derive(Clone)]
pub struct EnforcementCounters(Arc<PerCpuArray<MapData, u64>>);

impl fmt::Debug for EnforcementCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EnforcementCounters").finish_non_exhaustive()
    }
}

impl EnforcementCounters {
    pub fn read(&self) -> EnforcementCounts {
        let sum = |counter: Counter| {
            self.0
                .get(&(counter as u32), 0)
                .map_or(0, |per_cpu| per_cpu.iter().sum())
        };
        EnforcementCounts {
            egress_dropped: sum(Counter::EgressDropped),
            ingress_dropped: sum(Counter::IngressDropped),
            calls_refused: sum(Counter::CallsRefused),
        }
    }
}

/// A program attached to a cgroup, as `interceptor status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    /// `connect4`, `sock_ops`, ... (the cgroup attach type).
    pub attach_type: &'static str,
    /// Kernel program id.
    pub id: u32,
    /// Kernel program name (ours start with `icpt_`).
    pub name: String,
}

/// Every program attached directly to `cgroup_dir` at the attach types the
/// interceptor uses, ours and others', in attach order; then the LSM programs
/// pinned for that subtree (`lsm/<hook>`).
pub fn attached_programs(cgroup_dir: &Path) -> Result<Vec<AttachedProgram>, EbpfError> {
    let cgroup = open_cgroup(cgroup_dir)?;
    let name_of = |id| {
        sys::prog_fd_by_id(id)
            .and_then(|fd| sys::prog_id_name(fd.as_fd()))
            .map_or_else(|_| String::from("?"), |(_, name)| name)
    };
    let mut out = Vec::new();
    for spec in PROGRAMS {
        for id in query(&cgroup, cgroup_dir, spec.attach_type)? {
            out.push(AttachedProgram {
                attach_type: spec.attach_type.name(),
                id,
                name: name_of(id),
            });
        }
    }
    let pin_dir = pins::existing_subtree_dir(&cgroup2_mount()?, cgroup_dir);
    let pinned = ROOT_PROGRAMS
        .iter()
        .map(|spec| (spec.name, spec.attach_type.root_name()))
        .chain(
            LSM_PROGRAMS
                .iter()
                .map(|spec| (spec.name, spec.attach_type)),
        );
    for (name, attach_type) in pinned {
        if let Some(id) = pins::pinned_program(&pin_dir, name) {
            out.push(AttachedProgram {
                attach_type,
                id,
                name: name_of(id),
            });
        }
    }
    Ok(out)
}

fn write_config(ebpf: &mut Ebpf, value: RedirectConfig) -> Result<(), EbpfError> {
    let map_error = |source| EbpfError::Map {
        name: maps::REDIRECT_CONFIG,
        source,
    };
    let map = ebpf
        .map_mut(maps::REDIRECT_CONFIG)
        .ok_or(EbpfError::MissingMap(maps::REDIRECT_CONFIG))?;
    let mut config: Array<_, RedirectConfig> = Array::try_from(map).map_err(map_error)?;
    config.set(0, value, 0).map_err(map_error)
}

/// Loads the LSM programs against the kernel's BTF.
fn load_lsm(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let btf = Btf::from_sys_fs().map_err(EbpfError::Btf)?;
    for spec in LSM_PROGRAMS {
        let Some(Program::Lsm(program)) = ebpf.program_mut(spec.name) else {
            return Err(EbpfError::MissingProgram(spec.name));
        };
        program
            .load(spec.hook(), &btf)
            .map_err(|source| EbpfError::Program {
                name: spec.name,
                source,
            })?;
    }
    Ok(())
}

/// Detaches every interceptor (`icpt_*`) program from `cgroup_dir`; returns
/// how many. The daemon never does this by itself (enforcement must outlive
/// it); it is for tests and deliberate uninstalls.
pub fn detach_all(cgroup_dir: &Path) -> Result<usize, EbpfError> {
    let cgroup = open_cgroup(cgroup_dir)?;
    let mut detached = 0;
    for spec in PROGRAMS {
        for id in query(&cgroup, cgroup_dir, spec.attach_type)? {
            let Ok(fd) = sys::prog_fd_by_id(id) else {
                continue;
            };
            let Ok((_, name)) = sys::prog_id_name(fd.as_fd()) else {
                continue;
            };
            if !name.starts_with(PROGRAM_PREFIX) {
                continue;
            }
            match sys::prog_detach(cgroup.as_fd(), fd.as_fd(), spec.attach_type as u32) {
                Ok(()) => detached += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(EbpfError::Detach {
                        id,
                        attach_type: spec.attach_type.name(),
                        cgroup: cgroup_dir.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }
    let pin_dir = pins::existing_subtree_dir(&cgroup2_mount()?, cgroup_dir);
    let pinned = ROOT_PROGRAMS.iter().map(|spec| spec.name);
    detached += pinned
        .chain(LSM_PROGRAMS.iter().map(|spec| spec.name))
        .filter(|name| pins::pinned_program(&pin_dir, name).is_some())
        .count();
    forget_subtree(cgroup_dir)?;
    Ok(detached)
}

/// Removes the bpffs pins of the subtree `cgroup_dir` (its LSM programs'
/// links and its map of sandbox sockets), once its cgroup is gone or detached.
/// A daemon's start also removes the pins of every subtree whose cgroup is gone.
pub fn forget_subtree(cgroup_dir: &Path) -> Result<(), EbpfError> {
    let pin_dir = pins::existing_subtree_dir(&cgroup2_mount()?, cgroup_dir);
    pins::remove_subtree(&pin_dir).map_err(|source| EbpfError::Pin {
        path: pin_dir,
        source,
    })
}

/// Where redirected sockets wanted to go, shared by the relay and DNS tasks.
#[derive(Clone)]
pub struct DestinationTable {
    /// `SOCKET_DESTINATIONS`: socket cookie → destination.
    destinations: Arc<HashMap<MapData, u64, OriginalDestination>>,
    /// `RELAY_HANDOFF`: client (address, port) → destination.
    handoff: Arc<HashMap<MapData, ClientSocket, OriginalDestination>>,
}

impl fmt::Debug for DestinationTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestinationTable").finish_non_exhaustive()
    }
}

impl DestinationTable {
    /// The original destination of the redirected TCP connection whose client
    /// end is `peer` (what the relay's `accept()` returned: IPv4, IPv6, or
    /// IPv4-mapped IPv6), removed from the hand-off map. `None` if the
    /// connection was not redirected by our programs.
    pub fn take_for_relay(&self, peer: SocketAddr) -> Option<OriginalDestination> {
        let key = ClientSocket::from_socket_addr(peer);
        // One syscall, and no lock: every relay thread takes from the map at once.
        sys::map_lookup_and_delete(self.handoff.map().fd().as_fd(), &key)
            .ok()
            .flatten()
    }

    /// The recorded original destination of the socket with this cookie
    /// (`SO_COOKIE`), kept until the socket is released.
    pub fn by_cookie(&self, cookie: u64) -> Option<OriginalDestination> {
        self.destinations.get(&cookie, 0).ok()
    }
}

fn take_hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    HashMap::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn open_cgroup(dir: &Path) -> Result<File, EbpfError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|source| EbpfError::OpenCgroup {
            path: dir.to_path_buf(),
            source,
        })
}

fn query(cgroup: &File, cgroup_dir: &Path, attach_type: AttachType) -> Result<Vec<u32>, EbpfError> {
    sys::prog_query(cgroup.as_fd(), attach_type as u32).map_err(|source| EbpfError::Query {
        attach_type: attach_type.name(),
        cgroup: cgroup_dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<DestinationTable>();
        check::<Enforcement>();
    }

    /// Every program's name, whatever it is attached to.
    fn all_names() -> Vec<&'static str> {
        PROGRAMS
            .iter()
            .chain(ROOT_PROGRAMS)
            .map(|spec| spec.name)
            .chain(LSM_PROGRAMS.iter().map(|spec| spec.name))
            .collect()
    }

    #[test]
    fn program_names_fit_the_kernel_and_are_distinct() {
        let names = all_names();
        for (i, a) in names.iter().enumerate() {
            assert!(a.len() <= 15, "{a} is too long");
            assert!(a.starts_with(PROGRAM_PREFIX));
            assert!(!names[i + 1..].contains(a), "{a} twice");
        }
        for programs in [PROGRAMS, ROOT_PROGRAMS] {
            for (i, a) in programs.iter().enumerate() {
                for b in &programs[i + 1..] {
                    assert_ne!(a.attach_type, b.attach_type, "{} and {}", a.name, b.name);
                }
            }
        }
    }

    #[test]
    fn embedded_object_has_every_program_and_map() {
        let obj = aya_obj_names(OBJECT);
        for name in all_names() {
            assert!(obj.iter().any(|n| n == name), "missing {name}");
        }
        for map in [
            maps::SOCKET_DESTINATIONS,
            maps::RELAY_HANDOFF,
            maps::REDIRECT_CONFIG,
            maps::GUARDED_PORTS,
            maps::SANDBOX_SOCKETS,
            maps::TENANT_SOCKETS,
            maps::COUNTERS,
        ] {
            assert!(obj.iter().any(|n| n == map), "missing {map}");
        }
    }

    /// Symbol names in the ELF object (enough to spot a stale or broken build
    /// without loading anything into the kernel).
    fn aya_obj_names(object: &[u8]) -> Vec<String> {
        object
            .split(|&b| b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn config_is_ready_and_in_network_order() {
        let config = RedirectTargets::loopback(15001, 15053).config().unwrap();
        assert_eq!(config.relay_ip4, [127, 0, 0, 1]);
        assert_eq!(config.relay_ip6[15], 1);
        assert_eq!(config.relay_port, 15001);
        assert_eq!(config.dns_port, 15053);
        assert_eq!(config.ready, 1);
    }

    #[test]
    fn handoff_keys_match_for_v4_and_mapped_peers() {
        let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(
            ClientSocket::from_socket_addr(v4),
            ClientSocket::from_socket_addr(mapped)
        );
    }
}
