//! The task-keyed line of the cgroup programs, attached to the root of the
//! cgroup v2 hierarchy (so they see every socket of the host): a sandboxed
//! task may use only inet sockets created in the subtree. A socket created
//! outside and handed in (`SCM_RIGHTS`, an inherited descriptor) is not
//! followed by the subtree's socket-keyed hooks, so it would otherwise go
//! anywhere.
//!
//! - connect, send to an address, bind: refused at once (these hooks run in
//!   the system call of the task that makes it).
//! - send on a TCP socket already connected (no cgroup hook sees it): the
//!   `tcp:tcp_sendmsg_locked` tracepoint, which fires in the sender's system
//!   call before the data is queued, marks the socket tainted, and the root
//!   `cgroup_skb` programs drop its every packet until it is released. The
//!   packet programs cannot ask who sends (they also run in softirq, on behalf
//!   of anyone); the tracepoint can. (A connected UDP socket handed in has no
//!   such point before its datagram leaves: only BPF LSM closes that.)
//!
//! Each program lets every other task and socket through at once.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_probe_read_kernel},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, raw_tracepoint},
    programs::{RawTracePointContext, SkBuffContext, SockAddrContext, SockContext},
    EbpfContext,
};
use interceptor_common::{Counter, AF_INET, AF_INET6};

use crate::{count, ALLOW, REDIRECT_CONFIG, REFUSE, SANDBOX_SOCKETS, TAINTED_SOCKETS};

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
fn own_sockets_only(ctx: &SockAddrContext) -> i32 {
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

/// `tcp_sendmsg_locked(const struct sock *sk, const struct msghdr *msg,
/// const struct sk_buff *skb, int size_goal)`: a sandboxed task sending on an
/// inet socket from outside taints it.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn icpt_tp_tcpsend(ctx: RawTracePointContext) -> i32 {
    if !sandboxed_task() {
        return 0;
    }
    // SAFETY: the context is the tracepoint's argument array; `sk` is first.
    let sk = unsafe { read_volatile(ctx.as_ptr() as *const u64) };
    if sk == 0 {
        return 0;
    }
    // SAFETY: a probe read of kernel memory; a fault gives an error, not a crash.
    let family = unsafe { bpf_probe_read_kernel((sk as *const u8).add(SOCK_FAMILY) as *const u16) }
        .unwrap_or(0);
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { SANDBOX_SOCKETS.get(&sk) }.is_none() && TAINTED_SOCKETS.insert(&sk, &1, 0).is_ok() {
        count(Counter::CallsRefused);
    }
    0
}

/// Whether the packet's socket is one a sandbox tainted.
#[inline(always)]
fn tainted(ctx: &SkBuffContext) -> bool {
    // SAFETY: `skb` is the program's context; `sk` may be null.
    let sk = unsafe { read_volatile(&(*ctx.skb.skb).__bindgen_anon_2.sk) } as u64;
    // SAFETY: the value is only tested for presence.
    sk != 0 && unsafe { TAINTED_SOCKETS.get(&sk) }.is_some()
}

#[cgroup_skb(egress)]
pub fn icpt_t_egress(ctx: SkBuffContext) -> i32 {
    if tainted(&ctx) {
        count(Counter::EgressDropped);
        0
    } else {
        1
    }
}

#[cgroup_skb(ingress)]
pub fn icpt_t_ingress(ctx: SkBuffContext) -> i32 {
    if tainted(&ctx) {
        count(Counter::IngressDropped);
        0
    } else {
        1
    }
}

/// Forget a tainted socket when it is released (its address will be reused).
#[cgroup_sock(sock_release)]
pub fn icpt_t_release(ctx: SockContext) -> i32 {
    let _ = TAINTED_SOCKETS.remove(&(ctx.sock as u64));
    1
}
