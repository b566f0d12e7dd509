//! Types shared by the eBPF programs and user space. Every type here crosses the
//! kernel boundary through a map, so each is `#[repr(C)]` with explicit padding.
#![no_std]

/// Where a sandboxed socket asked to go, recorded by the connect/sendmsg hooks.
///
/// `addr` is IPv6; an IPv4 destination is stored IPv4-mapped (`::ffff:a.b.c.d`),
/// with `family` telling which kind of socket dialled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    /// Network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6` of the dialling socket.
    pub family: u16,
    /// Thread-group id (the process id) of the process that connected.
    pub pid: u32,
    /// cgroup v2 id (the inode of the cgroup directory) of that process.
    pub cgroup_id: u64,
}

/// The sandbox end of a redirected TCP connection, as the relay sees its peer.
/// Keys the hand-off map from the sock_ops program to the relay.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientSocket {
    /// Network byte order, IPv4 mapped into IPv6 like [`OriginalDestination::addr`].
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u32,
}

/// Where the hooks send what they redirect. Filled by the daemon at start;
/// while `ready` is 0 every sandboxed connect is refused (fail closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Network byte order.
    pub relay_ip4: [u8; 4],
    /// Network byte order.
    pub dns_ip4: [u8; 4],
    /// Network byte order.
    pub relay_ip6: [u8; 16],
    /// Network byte order.
    pub dns_ip6: [u8; 16],
    /// Host byte order.
    pub relay_port: u16,
    /// Host byte order.
    pub dns_port: u16,
    pub ready: u32,
    /// cgroup v2 id of the subtree root: the task-keyed (LSM) programs act on
    /// the tasks below it, whichever socket they use.
    pub subtree_cgroup_id: u64,
    /// Depth of the subtree root under the cgroup v2 root (its ancestor level).
    pub subtree_level: u32,
    /// Inet sockets the sandboxes of one tenant (a child cgroup of the subtree
    /// root) may hold at once; 0 for no limit.
    pub sockets_per_tenant: u32,
}

/// Names of the maps in the eBPF object, used by user space to find them.
pub mod maps {
    /// `LruHashMap<u64 socket cookie, OriginalDestination>`.
    pub const SOCKET_DESTINATIONS: &str = "SOCKET_DESTINATIONS";
    /// `LruHashMap<ClientSocket, OriginalDestination>`: sock_ops → relay hand-off.
    pub const RELAY_HANDOFF: &str = "RELAY_HANDOFF";
    /// `Array<RedirectConfig>` with one entry.
    pub const REDIRECT_CONFIG: &str = "REDIRECT_CONFIG";
    /// `HashMap<u16 port, u8>`: the daemon's listening ports, refused to every
    /// bind in the subtree (each dispatch `listen` beside relay and DNS).
    pub const GUARDED_PORTS: &str = "GUARDED_PORTS";
    /// `HashMap<u64 socket address, u64 tenant cgroup id>`: inet sockets created
    /// in the subtree. A sandboxed task may use no other (one passed in).
    pub const SANDBOX_SOCKETS: &str = "SANDBOX_SOCKETS";

    /// `HashMap<u64 tenant cgroup id, i64>`: inet sockets each tenant holds.
    pub const TENANT_SOCKETS: &str = "TENANT_SOCKETS";
    /// `PerCpuArray<u64>` indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
}

/// What the programs count, per CPU (`COUNTERS` map index).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets leaving a sandbox's socket for anything but the relay or DNS listener.
    EgressDropped = 0,
    /// Packets reaching a sandbox's socket from anything but the relay or DNS listener.
    IngressDropped = 1,
    /// Socket calls of sandboxed tasks refused: a socket from outside, a
    /// routing option, the per-tenant socket cap, an LSM hook.
    CallsRefused = 2,
}

impl Counter {
    pub const COUNT: u32 = 3;
}

/// Most inet sockets all sandboxes of a subtree hold at once.
pub const MAX_SANDBOX_SOCKETS: u32 = 1 << 20;

/// Most tenants (child cgroups of the subtree root) whose sockets are counted.
pub const MAX_TENANTS: u32 = 16384;

/// Most daemon ports the bind hooks guard (relay, DNS, each dispatch `listen`).
pub const MAX_GUARDED_PORTS: u32 = 256;

/// Map sizes: bounded so a sandbox cannot exhaust kernel memory.
pub const MAX_TRACKED_SOCKETS: u32 = 65536;

/// Prefix of every program name, so a restarted daemon can recognise (and
/// atomically replace) the programs a previous instance left attached.
pub const PROGRAM_PREFIX: &str = "icpt_";

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no implicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::OriginalDestination {}
    unsafe impl aya::Pod for super::ClientSocket {}
    unsafe impl aya::Pod for super::RedirectConfig {}
}

/// `a.b.c.d` as `::ffff:a.b.c.d` octets, the form every address takes in the maps.
pub const fn ipv6_octets(ip: core::net::IpAddr) -> [u8; 16] {
    match ip {
        core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

impl OriginalDestination {
    /// The address the sandbox dialled, as its socket saw it: an `AF_INET`
    /// socket's destination is IPv4; an `AF_INET6` socket's stays IPv6 (an
    /// IPv4-mapped one included; see [`Self::canonical_ip`] for the IPv4 inside).
    pub fn ip(&self) -> core::net::IpAddr {
        let v6 = core::net::Ipv6Addr::from(self.addr);
        match (self.family, v6.to_ipv4_mapped()) {
            (AF_INET, Some(v4)) => core::net::IpAddr::V4(v4),
            _ => core::net::IpAddr::V6(v6),
        }
    }

    /// Like [`Self::ip`], with an IPv4-mapped IPv6 address given as the IPv4 inside.
    pub fn canonical_ip(&self) -> core::net::IpAddr {
        self.ip().to_canonical()
    }

    /// [`Self::ip`] with the port: what `getpeername()` shows inside the sandbox.
    pub fn socket_addr(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(self.ip(), self.port)
    }
}

impl ClientSocket {
    /// The hand-off key for a relay peer, IPv4 or IPv6 (IPv4-mapped included).
    pub fn from_socket_addr(peer: core::net::SocketAddr) -> Self {
        Self {
            addr: ipv6_octets(peer.ip()),
            port: u32::from(peer.port()),
        }
    }
}
