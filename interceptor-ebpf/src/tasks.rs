//! The task-keyed line of the cgroup programs, attached to the root of the
//! cgroup v2 hierarchy (so they see every socket of the host): a sandboxed
//! task may connect, send to an address, or bind only sockets it created in
//! the subtree. A socket created outside and handed in (`SCM_RIGHTS`, an
//! inherited descriptor) is not followed by the subtree's socket-keyed hooks,
//! so it would otherwise go anywhere.
//!
//! Each program first asks whether the calling task is below the daemon's
//! subtree and allows everything else at once. These hooks run in the system
//! call of the task that makes it, so the current task is the socket's user.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use interceptor_common::Counter;

use crate::{count, ALLOW, REDIRECT_CONFIG, REFUSE, SANDBOX_SOCKETS};

/// Whether the current task is below the daemon's subtree root.
#[inline(always)]
pub(crate) fn sandboxed_task() -> bool {
    let Some(cfg) = REDIRECT_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: `cfg` points into the array map's value.
    let (id, level) = unsafe {
        (
            read_volatile(&cfg.subtree_cgroup_id),
            read_volatile(&cfg.subtree_level),
        )
    };
    // SAFETY: a plain helper call.
    id != 0 && unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) } == id
}

#[inline(always)]
fn own_sockets_only(ctx: &SockAddrContext) -> i32 {
    if !sandboxed_task() {
        return ALLOW;
    }
    // SAFETY: a plain helper call; the value is only tested for presence.
    let known = unsafe { SANDBOX_SOCKETS.get(&bpf_get_socket_cookie(ctx.as_ptr())) }.is_some();
    if known {
        ALLOW
    } else {
        count(Counter::CallsRefused);
        REFUSE
    }
}

#[cgroup_sock_addr(connect4)]
pub fn icpt_t_conn4(ctx: SockAddrContext) -> i32 {
    own_sockets_only(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn icpt_t_conn6(ctx: SockAddrContext) -> i32 {
    own_sockets_only(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn icpt_t_send4(ctx: SockAddrContext) -> i32 {
    own_sockets_only(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn icpt_t_send6(ctx: SockAddrContext) -> i32 {
    own_sockets_only(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn icpt_t_bind4(ctx: SockAddrContext) -> i32 {
    own_sockets_only(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn icpt_t_bind6(ctx: SockAddrContext) -> i32 {
    own_sockets_only(&ctx)
}
