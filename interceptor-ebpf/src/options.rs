//! Socket options that would send a packet somewhere other than where the
//! hooks sent it, refused on every socket of the subtree.

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use crate::{ALLOW, REFUSE};

const SOL_IP: i32 = 0;
const SOL_SOCKET: i32 = 1;
const SOL_IPV6: i32 = 41;

/// IPv4 options (source routes), IPv6 routing and other extension headers,
/// turning an IPv6 socket into an IPv4 one behind the hooks' back, and binding
/// to a device other than the one the route to the relay takes.
#[inline(always)]
pub(crate) fn redirecting_option(level: i32, optname: i32) -> bool {
    match level {
        // IP_OPTIONS
        SOL_IP => optname == 4,
        // IPV6_ADDRFORM, IPV6_2292HOPOPTS, IPV6_2292DSTOPTS, IPV6_2292RTHDR,
        // IPV6_2292PKTOPTIONS, IPV6_HOPOPTS, IPV6_RTHDRDSTOPTS, IPV6_RTHDR,
        // IPV6_DSTOPTS
        SOL_IPV6 => matches!(optname, 1 | 3 | 4 | 5 | 6 | 54 | 55 | 57 | 59),
        // SO_BINDTODEVICE, SO_BINDTOIFINDEX
        SOL_SOCKET => optname == 25 || optname == 62,
        _ => false,
    }
}

/// Returns `0` to refuse (`EPERM`), `1` to let the kernel handle the option.
#[cgroup_sockopt(setsockopt)]
pub fn icpt_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: `sockopt` is the program's context; 4-byte reads.
    let (level, optname) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.sockopt).level),
            core::ptr::read_volatile(&(*ctx.sockopt).optname),
        )
    };
    if redirecting_option(level, optname) {
        crate::count(interceptor_common::Counter::CallsRefused);
        REFUSE
    } else {
        ALLOW
    }
}
