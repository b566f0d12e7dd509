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

mod cgroup;
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
    maps::{Array, HashMap, IterableMap, MapData, MapError},
    programs::{Program, ProgramError},
    Ebpf,
};
pub use cgroup::{cgroup2_mount, cgroup_id};
pub use interceptor_common::OriginalDestination;
use interceptor_common::{maps, ClientSocket, RedirectConfig, PROGRAM_PREFIX};

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
        })
    }
}

/// One program of the object and where it goes.
struct ProgramSpec {
    /// Function (and kernel program) name, ≤ 15 characters.
    name: &'static str,
    attach_type: AttachType,
}

/// The cgroup attach types the programs use (`enum bpf_attach_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttachType {
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
    SockRelease = 34,
}

impl AttachType {
    fn name(self) -> &'static str {
        match self {
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
            Self::SockRelease => "sock_release",
        }
    }
}

/// In attach order: bookkeeping first, the redirects last, so a redirected
/// connection always finds the hand-off and restore programs in place.
const PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        name: "icpt_sockcreate",
        attach_type: AttachType::SockCreate,
    },
    ProgramSpec {
        name: "icpt_release",
        attach_type: AttachType::SockRelease,
    },
    ProgramSpec {
        name: "icpt_sockops",
        attach_type: AttachType::SockOps,
    },
    ProgramSpec {
        name: "icpt_recvmsg4",
        attach_type: AttachType::Recvmsg4,
    },
    ProgramSpec {
        name: "icpt_recvmsg6",
        attach_type: AttachType::Recvmsg6,
    },
    ProgramSpec {
        name: "icpt_peername4",
        attach_type: AttachType::Getpeername4,
    },
    ProgramSpec {
        name: "icpt_peername6",
        attach_type: AttachType::Getpeername6,
    },
    ProgramSpec {
        name: "icpt_bind4",
        attach_type: AttachType::Bind4,
    },
    ProgramSpec {
        name: "icpt_bind6",
        attach_type: AttachType::Bind6,
    },
    ProgramSpec {
        name: "icpt_postbind4",
        attach_type: AttachType::PostBind4,
    },
    ProgramSpec {
        name: "icpt_postbind6",
        attach_type: AttachType::PostBind6,
    },
    ProgramSpec {
        name: "icpt_sendmsg4",
        attach_type: AttachType::Sendmsg4,
    },
    ProgramSpec {
        name: "icpt_sendmsg6",
        attach_type: AttachType::Sendmsg6,
    },
    ProgramSpec {
        name: "icpt_connect4",
        attach_type: AttachType::Connect4,
    },
    ProgramSpec {
        name: "icpt_connect6",
        attach_type: AttachType::Connect6,
    },
];

/// The loaded programs and their maps.
pub struct Enforcement {
    ebpf: Ebpf,
    table: DestinationTable,
    targets: RedirectTargets,
}

impl fmt::Debug for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enforcement")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl Enforcement {
    /// Loads every program into the kernel (the verifier checks them here)
    /// and marks the redirect configuration ready. Nothing is attached yet.
    pub fn load(targets: &RedirectTargets) -> Result<Self, EbpfError> {
        let config_value = targets.config()?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(EbpfError::Load)?;

        {
            let map = ebpf
                .map_mut(maps::REDIRECT_CONFIG)
                .ok_or(EbpfError::MissingMap(maps::REDIRECT_CONFIG))?;
            let mut config: Array<_, RedirectConfig> =
                Array::try_from(map).map_err(|source| EbpfError::Map {
                    name: maps::REDIRECT_CONFIG,
                    source,
                })?;
            config
                .set(0, config_value, 0)
                .map_err(|source| EbpfError::Map {
                    name: maps::REDIRECT_CONFIG,
                    source,
                })?;
        }

        for spec in PROGRAMS {
            let program = ebpf
                .program_mut(spec.name)
                .ok_or(EbpfError::MissingProgram(spec.name))?;
            let loaded = match program {
                Program::CgroupSockAddr(p) => p.load(),
                Program::SockOps(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                _ => return Err(EbpfError::UnexpectedProgramType(spec.name)),
            };
            loaded.map_err(|source| EbpfError::Program {
                name: spec.name,
                source,
            })?;
        }

        let destinations = take_hash_map(&mut ebpf, maps::SOCKET_DESTINATIONS)?;
        let handoff = take_hash_map(&mut ebpf, maps::RELAY_HANDOFF)?;
        Ok(Self {
            ebpf,
            table: DestinationTable {
                destinations: Arc::new(destinations),
                handoff: Arc::new(handoff),
            },
            targets: *targets,
        })
    }

    /// Attaches every program to the cgroup `cgroup_dir` (inherited by every
    /// cgroup below it) with `BPF_PROG_ATTACH` and `BPF_F_ALLOW_MULTI`.
    ///
    /// A program of the same name left by a previous daemon is replaced
    /// atomically (`BPF_F_REPLACE`), so there is no moment without
    /// enforcement and no second copy. The programs stay attached after this
    /// process exits; nothing detaches them on drop.
    pub fn attach(&mut self, cgroup_dir: &Path) -> Result<(), EbpfError> {
        let cgroup = open_cgroup(cgroup_dir)?;
        for spec in PROGRAMS {
            let program = self
                .ebpf
                .program(spec.name)
                .ok_or(EbpfError::MissingProgram(spec.name))?;
            let prog_fd = program.fd().map_err(|source| EbpfError::Program {
                name: spec.name,
                source,
            })?;
            let prog_fd = prog_fd.as_fd();
            let (our_id, _) = sys::prog_id_name(prog_fd).map_err(EbpfError::ProgramInfo)?;
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
/// interceptor uses, ours and others', in attach order.
pub fn attached_programs(cgroup_dir: &Path) -> Result<Vec<AttachedProgram>, EbpfError> {
    let cgroup = open_cgroup(cgroup_dir)?;
    let mut out = Vec::new();
    for spec in PROGRAMS {
        for id in query(&cgroup, cgroup_dir, spec.attach_type)? {
            let name = sys::prog_fd_by_id(id)
                .and_then(|fd| sys::prog_id_name(fd.as_fd()))
                .map_or_else(|_| String::from("?"), |(_, name)| name);
            out.push(AttachedProgram {
                attach_type: spec.attach_type.name(),
                id,
                name,
            });
        }
    }
    Ok(out)
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
    Ok(detached)
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

    #[test]
    fn program_names_fit_the_kernel_and_are_distinct() {
        for (i, a) in PROGRAMS.iter().enumerate() {
            assert!(a.name.len() <= 15, "{} is too long", a.name);
            assert!(a.name.starts_with(PROGRAM_PREFIX));
            for b in &PROGRAMS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.attach_type, b.attach_type);
            }
        }
    }

    #[test]
    fn embedded_object_has_every_program_and_map() {
        let obj = aya_obj_names(OBJECT);
        for spec in PROGRAMS {
            assert!(obj.iter().any(|n| n == spec.name), "missing {}", spec.name);
        }
        for map in [
            maps::SOCKET_DESTINATIONS,
            maps::RELAY_HANDOFF,
            maps::REDIRECT_CONFIG,
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
