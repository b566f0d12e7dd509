//! The packet-level backstop, attached to the subtree root like the socket
//! hooks: whatever a socket option, ancillary data or a bypass nobody has found
//! yet makes of a packet, a sandbox's socket sends only to the relay or the
//! DNS listener and receives only from them. Everything else is dropped and
//! counted.
//!
//! A packet passes only with a plain header: no IPv4 options, no fragments,
//! no IPv6 extension headers (routing headers among them), TCP to the relay's
//! address and port or UDP to the DNS listener's (from them, on ingress).
//! Return values: `1` passes, `0` drops.

use core::ptr::read_volatile;

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use interceptor_common::{Counter, RedirectConfig};

use crate::{config, count, IPPROTO_TCP, IPPROTO_UDP};

const PASS: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP: u8 = IPPROTO_TCP as u8;
const UDP: u8 = IPPROTO_UDP as u8;

/// Which end of the packet the daemon must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// The destination (what a sandbox sends).
    Egress,
    /// The source (what a sandbox receives).
    Ingress,
}

/// The (address, port, protocol) end of a packet the daemon's listeners may be.
#[inline(always)]
fn daemon_end4(cfg: &RedirectConfig, ip: [u8; 4], port: u16, protocol: u8) -> bool {
    (protocol == TCP && ip == cfg.relay_ip4 && port == cfg.relay_port)
        || (protocol == UDP && ip == cfg.dns_ip4 && port == cfg.dns_port)
}

#[inline(always)]
fn daemon_end6(cfg: &RedirectConfig, ip: &[u8; 16], port: u16, protocol: u8) -> bool {
    (protocol == TCP && *ip == cfg.relay_ip6 && port == cfg.relay_port)
        || (protocol == UDP && *ip == cfg.dns_ip6 && port == cfg.dns_port)
}

/// The (source, destination) ports of the transport header at `offset`.
#[inline(always)]
fn ports(ctx: &SkBuffContext, offset: usize) -> Option<(u16, u16)> {
    let p: [u8; 4] = ctx.load(offset).ok()?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

#[inline(always)]
fn from_or_to_daemon(ctx: &SkBuffContext, direction: Direction) -> Option<bool> {
    let cfg = config()?;
    // SAFETY: `skb` is the program's context; `protocol` is the L3 protocol
    // in network order in the low 16 bits.
    let protocol = u16::from_be(unsafe { read_volatile(&(*ctx.skb.skb).protocol) } as u16);
    if protocol == ETH_P_IP {
        let h: [u8; 20] = ctx.load(0).ok()?;
        // Version 4, no options; no fragment (only the DF bit may be set).
        if h[0] != 0x45 || h[6] & 0xbf != 0 || h[7] != 0 {
            return Some(false);
        }
        let (src_port, dst_port) = ports(ctx, 20)?;
        Some(match direction {
            Direction::Egress => daemon_end4(cfg, [h[16], h[17], h[18], h[19]], dst_port, h[9]),
            Direction::Ingress => daemon_end4(cfg, [h[12], h[13], h[14], h[15]], src_port, h[9]),
        })
    } else if protocol == ETH_P_IPV6 {
        let h: [u8; 40] = ctx.load(0).ok()?;
        // Version 6, and the next header is the transport: no extension header.
        if h[0] >> 4 != 6 {
            return Some(false);
        }
        let (src_port, dst_port) = ports(ctx, 40)?;
        let mut ip = [0u8; 16];
        let start = if direction == Direction::Egress {
            24
        } else {
            8
        };
        let mut i = 0;
        while i < 16 {
            ip[i] = h[start + i];
            i += 1;
        }
        let port = if direction == Direction::Egress {
            dst_port
        } else {
            src_port
        };
        Some(daemon_end6(cfg, &ip, port, h[6]))
    } else {
        Some(false)
    }
}

#[inline(always)]
fn judge(ctx: &SkBuffContext, direction: Direction, dropped: Counter) -> i32 {
    if from_or_to_daemon(ctx, direction) == Some(true) {
        PASS
    } else {
        count(dropped);
        DROP
    }
}

#[cgroup_skb(egress)]
pub fn icpt_egress(ctx: SkBuffContext) -> i32 {
    judge(&ctx, Direction::Egress, Counter::EgressDropped)
}

#[cgroup_skb(ingress)]
pub fn icpt_ingress(ctx: SkBuffContext) -> i32 {
    judge(&ctx, Direction::Ingress, Counter::IngressDropped)
}
