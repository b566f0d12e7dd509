//! The interceptor's cgroup eBPF programs.
//!
//! Attached to the root of the interceptor's cgroup subtree (and so inherited by
//! every cgroup below it), they redirect every outbound TCP connection to the
//! relay and every DNS datagram to the DNS listener, refuse any other UDP and
//! any other kind of inet socket, and record where each socket really wanted to
//! go so that the relay (and `getpeername()` inside the sandbox) can see it.
//!
//! Every program is named `icpt_*` (at most 15 characters, the kernel's limit)
//! so that a restarted daemon can recognise what its predecessor attached.
//!
//! Return values: for connect/sendmsg/sock_create, `1` allows and `0` refuses
//! (the caller gets `EPERM`); recvmsg/getpeername/sock_release/sock_ops must
//! return `1`.
//!
//! Beside these socket-keyed cgroup programs: `options` refuses socket options
//! that route around the rewrite, `backstop` drops packets for or from anywhere
//! but the daemon, `tasks` (attached to the cgroup root) refuses sandboxed
//! tasks the sockets they did not create, and `lsm` is the same task-keyed
//! line as BPF LSM programs where the kernel takes them.
#![no_std]
#![no_main]
// Atomic add on map values (the target has no compare-and-swap, so no `Atomic*` methods).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod backstop;
mod lsm;
mod options;
mod tasks;

use core::{
    ffi::c_void,
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use interceptor_common::{
    ClientSocket, Counter, OriginalDestination, RedirectConfig, AF_INET, AF_INET6,
    MAX_GUARDED_PORTS, MAX_SANDBOX_SOCKETS, MAX_TENANTS, MAX_TRACKED_SOCKETS,
};

/// The LSM programs need a GPL-compatible license; the crate is MIT or GPL-2.0.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Socket cookie → where that socket asked to go.
#[map]
static SOCKET_DESTINATIONS: LruHashMap<u64, OriginalDestination> =
    LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

/// The sandbox end of an established redirected TCP connection → where it
/// asked to go. Filled by `icpt_sockops`, taken (looked up and deleted) by the relay.
#[map]
static RELAY_HANDOFF: LruHashMap<ClientSocket, OriginalDestination> =
    LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

/// One entry, written by the daemon. `ready == 0` refuses everything.
#[map]
static REDIRECT_CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

/// The daemon's listening ports, refused to every bind in the subtree.
#[map]
static GUARDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_GUARDED_PORTS, 0);

/// Each inet socket created in the subtree (its kernel address: a key every
/// hook, the LSM ones included, can read) → the tenant cgroup it counts
/// against. Filled by `sock_create`, emptied on release. Not an LRU: a full
/// map refuses new sockets rather than forgetting live ones; allocated as used
/// (`BPF_F_NO_PREALLOC`), sized far past every tenant's cap together. Pinned,
/// so that a restarted daemon still knows the sockets created before it.
#[map]
static SANDBOX_SOCKETS: HashMap<u64, u64> = HashMap::pinned(MAX_SANDBOX_SOCKETS, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Tenant cgroup (the subtree root's child) → how many inet sockets its
/// sandboxes hold, against `RedirectConfig::sockets_per_tenant`. Pinned with
/// the sockets it counts.
#[map]
static TENANT_SOCKETS: HashMap<u64, i64> = HashMap::pinned(MAX_TENANTS, 0);

/// Per-CPU counts, indexed by [`Counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(n) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot: no other program writes it concurrently.
        unsafe { *n += 1 };
    }
}

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;

/// Where a connect or sendmsg goes after the hook.
enum Route {
    Relay,
    Dns,
    Refuse,
}

/// The redirect configuration, if the daemon has marked it ready.
#[inline(always)]
fn config() -> Option<&'static RedirectConfig> {
    let cfg = REDIRECT_CONFIG.get(0)?;
    // SAFETY: `cfg` points into the array map's value.
    if unsafe { read_volatile(addr_of!(cfg.ready)) } == 0 {
        None
    } else {
        Some(cfg)
    }
}

/// Decides what happens to a connect (`sendmsg == false`) or an unconnected
/// sendmsg (`sendmsg == true`) of a socket of this type and protocol to `port`.
#[inline(always)]
fn route(sock_type: u32, protocol: u32, port: u16, sendmsg: bool) -> Route {
    if sock_type == SOCK_STREAM && protocol == IPPROTO_TCP && !sendmsg {
        Route::Relay
    } else if sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP && port == DNS_PORT {
        Route::Dns
    } else {
        Route::Refuse
    }
}

/// 4-byte context reads and writes: the verifier rejects other access sizes
/// on most `bpf_sock_addr` / `bpf_sock_ops` / `bpf_sock` fields.
#[inline(always)]
fn rd(field: *const u32) -> u32 {
    // SAFETY: `field` points into the program's context.
    unsafe { read_volatile(field) }
}

#[inline(always)]
fn wr(field: *mut u32, value: u32) {
    // SAFETY: `field` points into the program's (writable) context.
    unsafe { write_volatile(field, value) }
}

/// `::ffff:a.b.c.d` for an IPv4 address read from the context (network order).
#[inline(always)]
fn mapped(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let a = words[0].to_ne_bytes();
    let b = words[1].to_ne_bytes();
    let c = words[2].to_ne_bytes();
    let d = words[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn ip6_words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

#[inline(always)]
fn is_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

#[inline(always)]
fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: `sa` is the program's context.
    unsafe {
        [
            rd(addr_of!((*sa).user_ip6[0])),
            rd(addr_of!((*sa).user_ip6[1])),
            rd(addr_of!((*sa).user_ip6[2])),
            rd(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

#[inline(always)]
fn write_user_ip6(sa: *mut bpf_sock_addr, words: [u32; 4]) {
    // SAFETY: `sa` is the program's context.
    unsafe {
        wr(addr_of_mut!((*sa).user_ip6[0]), words[0]);
        wr(addr_of_mut!((*sa).user_ip6[1]), words[1]);
        wr(addr_of_mut!((*sa).user_ip6[2]), words[2]);
        wr(addr_of_mut!((*sa).user_ip6[3]), words[3]);
    }
}

/// The destination port of a `bpf_sock_addr` (stored in network order), in host order.
#[inline(always)]
fn read_user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: `sa` is the program's context.
    u16::from_be(unsafe { rd(addr_of!((*sa).user_port)) } as u16)
}

#[inline(always)]
fn write_user_port(sa: *mut bpf_sock_addr, port: u16) {
    // SAFETY: `sa` is the program's context.
    unsafe { wr(addr_of_mut!((*sa).user_port), port.to_be() as u32) }
}

#[inline(always)]
fn sock_type_protocol(sa: *mut bpf_sock_addr) -> (u32, u32) {
    // SAFETY: `sa` is the program's context.
    unsafe { (rd(addr_of!((*sa).type_)), rd(addr_of!((*sa).protocol))) }
}

/// Records `addr:port` as the original destination of the context's socket.
#[inline(always)]
fn record(ctx: &SockAddrContext, addr: [u8; 16], port: u16, family: u16) -> Result<(), i64> {
    // SAFETY: plain helper calls valid in cgroup sock_addr programs.
    let (cookie, pid_tgid, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_cgroup_id(),
        )
    };
    let dst = OriginalDestination {
        addr,
        port,
        family,
        pid: (pid_tgid >> 32) as u32,
        cgroup_id,
    };
    SOCKET_DESTINATIONS.insert(&cookie, &dst, 0)
}

/// The recorded original destination of the context's socket.
#[inline(always)]
fn recorded(ctx: *mut c_void) -> Option<OriginalDestination> {
    // SAFETY: plain helper call; the map value is copied out at once.
    unsafe {
        let cookie = bpf_get_socket_cookie(ctx);
        SOCKET_DESTINATIONS.get(&cookie).copied()
    }
}

/// connect4 and sendmsg4: record, then rewrite to the relay or DNS listener.
#[inline(always)]
fn redirect4(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    let sa = ctx.sock_addr;
    let (sock_type, protocol) = sock_type_protocol(sa);
    let port = read_user_port(sa);
    let (ip, to_port) = match route(sock_type, protocol, port, sendmsg) {
        Route::Relay => (cfg.relay_ip4, cfg.relay_port),
        Route::Dns => (cfg.dns_ip4, cfg.dns_port),
        Route::Refuse => return REFUSE,
    };
    // SAFETY: `sa` is the program's context.
    let dst_ip = unsafe { rd(addr_of!((*sa).user_ip4)) };
    if record(ctx, mapped(dst_ip), port, AF_INET).is_err() {
        // Without a record the relay could not tell where this was going.
        return REFUSE;
    }
    // SAFETY: `sa` is the program's context.
    unsafe { wr(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(ip)) };
    write_user_port(sa, to_port);
    ALLOW
}

/// connect6 and sendmsg6 (IPv4-mapped destinations included).
#[inline(always)]
fn redirect6(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    let sa = ctx.sock_addr;
    let (sock_type, protocol) = sock_type_protocol(sa);
    let port = read_user_port(sa);
    let (ip, to_port) = match route(sock_type, protocol, port, sendmsg) {
        Route::Relay => (&cfg.relay_ip6, cfg.relay_port),
        Route::Dns => (&cfg.dns_ip6, cfg.dns_port),
        Route::Refuse => return REFUSE,
    };
    let dst = ip6_bytes(read_user_ip6(sa));
    if record(ctx, dst, port, AF_INET6).is_err() {
        return REFUSE;
    }
    write_user_ip6(sa, ip6_words(ip));
    write_user_port(sa, to_port);
    ALLOW
}

/// No socket in the subtree may take one of the daemon's ports (relay, DNS,
/// each dispatch `listen`), on any address: while the daemon is down (its
/// programs and maps stay), a sandbox bound there would keep the restarted
/// daemon from listening, and receive the connections meant for it.
#[inline(always)]
fn guarded_port(port: u16) -> bool {
    // SAFETY: the value is only tested for presence.
    port != 0 && unsafe { GUARDED_PORTS.get(&port) }.is_some()
}

/// No inbound, and no squatting: a sandbox binds no TCP socket (a listener's
/// first step; what `listen()` binds by itself hears nothing, the backstop
/// drops what comes from outside) and no UDP socket to a port of its choosing
/// (it would take a host service's datagrams with `SO_REUSEADDR`); port 0, the
/// kernel's pick, stays for UDP.
#[inline(always)]
fn guard_bind(ctx: &SockAddrContext) -> i32 {
    let (sock_type, _) = sock_type_protocol(ctx.sock_addr);
    if sock_type == SOCK_STREAM || read_user_port(ctx.sock_addr) != 0 {
        REFUSE
    } else {
        ALLOW
    }
}

/// A daemon port the kernel picked on `bind` to port 0 (with
/// `IP_LOCAL_PORT_RANGE` narrowed to it). The kernel runs this hook only from
/// `bind`: a port picked by `listen`, `connect` or `sendto` without `bind` is
/// not seen (keep the daemon's ports out of `ip_local_port_range`; `check`
/// warns).
#[inline(always)]
fn guard_bound(ctx: &SockContext) -> i32 {
    // SAFETY: `ctx.sock` is the program's context; `src_port` is in host order.
    let port = unsafe { rd(addr_of!((*ctx.sock).src_port)) } as u16;
    if guarded_port(port) {
        REFUSE
    } else {
        ALLOW
    }
}

#[cgroup_sock(post_bind4)]
pub fn icpt_postbind4(ctx: SockContext) -> i32 {
    guard_bound(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn icpt_postbind6(ctx: SockContext) -> i32 {
    guard_bound(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn icpt_bind4(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn icpt_bind6(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn icpt_connect4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn icpt_connect6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn icpt_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn icpt_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx, true)
}

/// recvmsg4 / getpeername4: if the address is one of `targets` (ip, port),
/// show the socket's recorded original IPv4 destination instead.
#[inline(always)]
fn restore4(ctx: &SockAddrContext, relay: bool) {
    let Some(cfg) = config() else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context.
    let ip = unsafe { rd(addr_of!((*sa).user_ip4)) };
    let port = read_user_port(sa);
    let is_dns = ip == u32::from_ne_bytes(cfg.dns_ip4) && port == cfg.dns_port;
    let is_relay = relay && ip == u32::from_ne_bytes(cfg.relay_ip4) && port == cfg.relay_port;
    if !is_dns && !is_relay {
        return;
    }
    let Some(dst) = recorded(ctx.as_ptr()) else {
        return;
    };
    if !is_mapped(&dst.addr) {
        return;
    }
    let a = &dst.addr;
    // SAFETY: `sa` is the program's context.
    unsafe {
        wr(
            addr_of_mut!((*sa).user_ip4),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        )
    };
    write_user_port(sa, dst.port);
}

/// recvmsg6 / getpeername6. An IPv6 socket that sent to an IPv4-mapped address
/// went through the IPv4 hooks, to the IPv4 listener: its reply shows that
/// listener's address mapped.
#[inline(always)]
fn restore6(ctx: &SockAddrContext, relay: bool) {
    let Some(cfg) = config() else {
        return;
    };
    let sa = ctx.sock_addr;
    let ip = read_user_ip6(sa);
    let port = read_user_port(sa);
    let is = |ip6: &[u8; 16], ip4: [u8; 4]| {
        ip == ip6_words(ip6) || ip == ip6_words(&mapped(u32::from_ne_bytes(ip4)))
    };
    let is_dns = port == cfg.dns_port && is(&cfg.dns_ip6, cfg.dns_ip4);
    let is_relay = relay && port == cfg.relay_port && is(&cfg.relay_ip6, cfg.relay_ip4);
    if !is_dns && !is_relay {
        return;
    }
    let Some(dst) = recorded(ctx.as_ptr()) else {
        return;
    };
    write_user_ip6(sa, ip6_words(&dst.addr));
    write_user_port(sa, dst.port);
}

#[cgroup_sock_addr(recvmsg4)]
pub fn icpt_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn icpt_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn icpt_peername4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx, true);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn icpt_peername6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx, true);
    1
}

/// When a redirected TCP connection is established, hand its original
/// destination to the relay keyed by the client's local (address, port): what
/// the relay sees as the peer of the accepted connection.
#[sock_ops]
pub fn icpt_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's context.
    let op = unsafe { rd(addr_of!((*ops).op)) };
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let Some(dst) = recorded(ctx.as_ptr()) else {
        return 1;
    };
    // Read every field up front, unconditionally: loads behind a branch can
    // be compiled into a modified context pointer, which the verifier rejects.
    // SAFETY: `ops` is the program's context.
    let (family, port, ip4, ip6) = unsafe {
        (
            rd(addr_of!((*ops).family)),
            rd(addr_of!((*ops).local_port)),
            rd(addr_of!((*ops).local_ip4)),
            [
                rd(addr_of!((*ops).local_ip6[0])),
                rd(addr_of!((*ops).local_ip6[1])),
                rd(addr_of!((*ops).local_ip6[2])),
                rd(addr_of!((*ops).local_ip6[3])),
            ],
        )
    };
    let addr = if family == AF_INET as u32 {
        mapped(ip4)
    } else if family == AF_INET6 as u32 {
        ip6_bytes(ip6)
    } else {
        return 1;
    };
    // `local_port` is in host byte order in sock_ops (measured).
    let key = ClientSocket { addr, port };
    let _ = RELAY_HANDOFF.insert(&key, &dst, 0);
    1
}

/// Forget a socket's destination when it is released.
#[cgroup_sock(sock_release)]
pub fn icpt_release(ctx: SockContext) -> i32 {
    // SAFETY: plain helper call valid in cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCKET_DESTINATIONS.remove(&cookie);
    let sk = ctx.sock as u64;
    // SAFETY: the value is copied out at once.
    if let Some(tenant) = unsafe { SANDBOX_SOCKETS.get(&sk) }.copied() {
        if let Some(held) = TENANT_SOCKETS.get_ptr_mut(&tenant) {
            add(held, -1);
        }
        let _ = SANDBOX_SOCKETS.remove(&sk);
    }
    1
}

/// Counts a new inet socket against its tenant; `false` past `limit` (one
/// tenant cannot take every ephemeral port); 0 is no limit.
#[inline(always)]
fn charge_tenant(tenant: u64, limit: u32) -> bool {
    if TENANT_SOCKETS.get_ptr_mut(&tenant).is_none() {
        // BPF_NOEXIST: another CPU may have added it meanwhile.
        let _ = TENANT_SOCKETS.insert(&tenant, &0, 1);
    }
    let Some(held) = TENANT_SOCKETS.get_ptr_mut(&tenant) else {
        return false;
    };
    // Checked, then added: concurrent creations may pass the limit by at most
    // one each (the target's atomic add returns nothing to compare with).
    // SAFETY: a live map value.
    if limit != 0 && unsafe { read_volatile(held) } >= i64::from(limit) {
        return false;
    }
    add(held, 1);
    true
}

/// Adds `n` to the map value at `value` atomically.
#[inline(always)]
fn add(value: *mut i64, n: i64) {
    // SAFETY: `value` points to a live map value; every update is atomic.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(value, n) };
}

/// Only TCP and UDP inet sockets may be created: no raw, ICMP ping, SCTP,
/// MPTCP, UDP-Lite sockets that the redirect does not cover.
#[cgroup_sock(sock_create)]
pub fn icpt_sockcreate(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: `sk` is the program's context.
    let (family, sock_type, protocol) = unsafe {
        (
            rd(addr_of!((*sk).family)),
            rd(addr_of!((*sk).type_)),
            rd(addr_of!((*sk).protocol)),
        )
    };
    let inet = family == AF_INET as u32 || family == AF_INET6 as u32;
    let tcp = sock_type == SOCK_STREAM && (protocol == IPPROTO_TCP || protocol == 0);
    let udp = sock_type == SOCK_DGRAM && (protocol == IPPROTO_UDP || protocol == 0);
    if !(inet && (tcp || udp)) {
        return REFUSE;
    }
    let Some(cfg) = config() else {
        return REFUSE;
    };
    let sk = ctx.sock as u64;
    // SAFETY: a plain helper call valid in cgroup sock programs.
    let tenant = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.subtree_level as i32 + 1) };
    // A socket address still recorded is one released without the release
    // hook (another program refused its creation): give its charge back.
    // SAFETY: the value is copied out at once.
    if let Some(stale) = unsafe { SANDBOX_SOCKETS.get(&sk) }.copied() {
        if let Some(held) = TENANT_SOCKETS.get_ptr_mut(&stale) {
            add(held, -1);
        }
        let _ = SANDBOX_SOCKETS.remove(&sk);
    }
    if !charge_tenant(tenant, cfg.sockets_per_tenant) {
        count(Counter::CallsRefused);
        return REFUSE;
    }
    if SANDBOX_SOCKETS.insert(&sk, &tenant, 0).is_err() {
        // Full: a socket the task-keyed hooks would take for one passed in.
        if let Some(held) = TENANT_SOCKETS.get_ptr_mut(&tenant) {
            add(held, -1);
        }
        return REFUSE;
    }
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: nothing in these programs can panic (no indexing out of bounds,
    // no arithmetic overflow checks in release); the verifier would reject a loop.
    unsafe { core::hint::unreachable_unchecked() }
}
