//! The task-keyed second line: BPF LSM programs that judge what a *sandboxed
//! task* (any task below the subtree root, whatever socket it holds) may do
//! with sockets and namespaces.
//!
//! The cgroup programs follow a socket's cgroup, so they never see a socket
//! created outside the subtree and passed in (`SCM_RIGHTS`, an inherited
//! descriptor), nor a socket family they do not hook. These programs are
//! global (the kernel runs them for every task); each starts by asking whether
//! the current task is below this daemon's subtree and does nothing otherwise.
//!
//! Return values: `0` allows, `-EPERM` refuses. When several BPF LSM programs
//! share a hook the first refusal wins, so a `0` here never overrides another's.

use core::ptr::read_volatile;

use aya_ebpf::{macros::lsm, programs::LsmContext};
use interceptor_common::{Counter, AF_INET, AF_INET6};

use crate::{
    count,
    options::redirecting_option,
    tasks::{sandboxed_task, SOCK_FAMILY},
    SANDBOX_SOCKETS,
};

const EPERM: i32 = 1;
/// LSM hooks allow with 0 and refuse with an errno (the cgroup programs use 1 and 0).
const LSM_ALLOW: i32 = 0;
const LSM_REFUSE: i32 = -EPERM;

const AF_UNIX: u32 = 1;
const AF_NETLINK: u32 = 16;
const NETLINK_ROUTE: u32 = 0;

/// `struct socket`: `state` (4), `type` (2 + 2), `flags` (8), `file` (8), then
/// `sk`: these fields have not moved since Linux 2.6. The verifier checks the
/// load against the kernel's BTF.
const SOCKET_SK: usize = 24;

/// The `struct sock` of a `struct socket` (null while it has none).
#[inline(always)]
unsafe fn sock_of(socket: *const u8) -> *const u8 {
    read_volatile(socket.add(SOCKET_SK) as *const *const u8)
}

#[inline(always)]
fn inet(family: u32) -> bool {
    family == AF_INET as u32 || family == AF_INET6 as u32
}

/// The family of the socket behind `socket`, 0 when it has no `sock`.
#[inline(always)]
fn family_of(socket: *const u8) -> u32 {
    // SAFETY: BTF-checked loads; the kernel turns a faulting one into 0.
    unsafe {
        let sk = sock_of(socket);
        if sk.is_null() {
            return 0;
        }
        u32::from(read_volatile(sk.add(SOCK_FAMILY) as *const u16))
    }
}

/// An inet socket not created in the subtree (the cgroup `sock_create` program
/// records those): passed in or inherited from outside. The cgroup hooks do
/// not follow it, so a sandbox may not use it.
#[inline(always)]
fn foreign_inet(socket: *const u8) -> bool {
    if !inet(family_of(socket)) {
        return false;
    }
    // SAFETY: the socket's address is the key; the value is only tested for presence.
    unsafe { SANDBOX_SOCKETS.get(&(sock_of(socket) as u64)) }.is_none()
}

#[inline(always)]
fn refuse() -> i32 {
    count(Counter::CallsRefused);
    LSM_REFUSE
}

/// Refuses socket calls of sandboxed tasks on inet sockets from outside.
#[inline(always)]
fn created_in_subtree_only(ctx: &LsmContext) -> i32 {
    if !sandboxed_task() {
        return LSM_ALLOW;
    }
    // SAFETY: argument 0 of every socket_* hook below is the `struct socket *`.
    let socket: *const u8 = unsafe { ctx.arg(0) };
    if foreign_inet(socket) {
        refuse()
    } else {
        LSM_ALLOW
    }
}

/// Socket families a sandbox may create: Unix, IPv4, IPv6 (whose types the
/// cgroup `sock_create` program narrows to TCP and UDP), and route netlink
/// (which `getaddrinfo` and `ip` read interfaces through).
#[lsm(hook = "socket_create")]
pub fn icpt_l_create(ctx: LsmContext) -> i32 {
    // SAFETY: socket_create(int family, int type, int protocol, int kern).
    let (family, protocol, kern): (u32, u32, u32) = unsafe { (ctx.arg(0), ctx.arg(2), ctx.arg(3)) };
    if kern != 0 || !sandboxed_task() {
        return LSM_ALLOW;
    }
    let allowed =
        family == AF_UNIX || inet(family) || (family == AF_NETLINK && protocol == NETLINK_ROUTE);
    if allowed {
        LSM_ALLOW
    } else {
        refuse()
    }
}

#[lsm(hook = "socket_connect")]
pub fn icpt_l_connect(ctx: LsmContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[lsm(hook = "socket_bind")]
pub fn icpt_l_bind(ctx: LsmContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[lsm(hook = "socket_sendmsg")]
pub fn icpt_l_sendmsg(ctx: LsmContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[lsm(hook = "socket_recvmsg")]
pub fn icpt_l_recvmsg(ctx: LsmContext) -> i32 {
    created_in_subtree_only(&ctx)
}

/// Refuses sandboxed tasks any use of an inet socket through this hook.
#[inline(always)]
fn no_inet(ctx: &LsmContext) -> i32 {
    if !sandboxed_task() {
        return LSM_ALLOW;
    }
    // SAFETY: argument 0 of the hooks below is the `struct socket *`.
    let socket: *const u8 = unsafe { ctx.arg(0) };
    if inet(family_of(socket)) {
        refuse()
    } else {
        LSM_ALLOW
    }
}

/// No inbound: a sandbox may listen on Unix sockets only.
#[lsm(hook = "socket_listen")]
pub fn icpt_l_listen(ctx: LsmContext) -> i32 {
    no_inet(&ctx)
}

/// Nor accept on an inet socket listening elsewhere and passed in.
#[lsm(hook = "socket_accept")]
pub fn icpt_l_accept(ctx: LsmContext) -> i32 {
    no_inet(&ctx)
}

#[lsm(hook = "socket_setsockopt")]
pub fn icpt_l_setsopt(ctx: LsmContext) -> i32 {
    if !sandboxed_task() {
        return LSM_ALLOW;
    }
    // SAFETY: socket_setsockopt(struct socket *sock, int level, int optname).
    let (socket, level, optname): (*const u8, i32, i32) =
        unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2)) };
    if redirecting_option(level, optname) || foreign_inet(socket) {
        refuse()
    } else {
        LSM_ALLOW
    }
}

/// No user namespaces (and so no network or mount namespaces of a sandbox's own).
#[lsm(hook = "userns_create")]
pub fn icpt_l_userns(_ctx: LsmContext) -> i32 {
    if sandboxed_task() {
        refuse()
    } else {
        LSM_ALLOW
    }
}
