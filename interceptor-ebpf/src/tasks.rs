//! The task-keyed line of the cgroup programs, attached to the root of the
//! cgroup v2 hierarchy (so they see every socket of the host): a sandboxed
//! task may connect, send to an address, or bind only inet sockets created in
//! the subtree. A socket created outside and handed in (`SCM_RIGHTS`) is not
//! followed by the subtree's socket-keyed hooks, so it would otherwise go
//! anywhere. These hooks run in the system call of the task that makes it.
//!
//! Not covered here: sending on a socket an outside process has already
//! connected (no cgroup hook sees a send on a connected socket; the LSM
//! programs close it where the kernel takes them). Each program lets every
//! other task through at once.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::bpf_get_current_ancestor_cgroup_id, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use interceptor_common::Counter;

use crate::{count, ALLOW, REDIRECT_CONFIG, REFUSE, SANDBOX_SOCKETS};

/// `struct sock_common`: the address pair (8), the hash (4), the port pair (4),
/// then `skc_family`; unchanged since Linux 2.6.
pub(crate) const SOCK_FAMILY: usize = 16;

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
fn created_in_subtree_only(ctx: &SockAddrContext) -> i32 {
    if !sandboxed_task() {
        return ALLOW;
    }
    // SAFETY: `sk` is the context's (never null) socket; its address is the key.
    let sk = unsafe { read_volatile(&(*ctx.sock_addr).__bindgen_anon_1.sk) } as u64;
    // SAFETY: the value is only tested for presence.
    if unsafe { SANDBOX_SOCKETS.get(&sk) }.is_some() {
        ALLOW
    } else {
        count(Counter::CallsRefused);
        REFUSE
    }
}

#[cgroup_sock_addr(connect4)]
pub fn icpt_t_conn4(ctx: SockAddrContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn icpt_t_conn6(ctx: SockAddrContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn icpt_t_send4(ctx: SockAddrContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn icpt_t_send6(ctx: SockAddrContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn icpt_t_bind4(ctx: SockAddrContext) -> i32 {
    created_in_subtree_only(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn icpt_t_bind6(ctx: SockAddrContext) -> i32 {
    created_in_subtree_only(&ctx)
}
