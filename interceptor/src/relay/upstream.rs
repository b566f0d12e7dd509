//! Where the relay connects: an address *it* resolved for the host it judged,
//! never blindly the one the sandbox dialled, and never a guarded range (SPEC §5)
//! or the daemon's own listeners.

use std::net::SocketAddr;

use crate::policy::{Action, Decision, OutboundPolicy};
use crate::resolve::Resolver;

/// The daemon's own listening addresses; connecting to them would loop.
#[derive(Clone, Debug, Default)]
pub struct LocalAddresses {
    pub listeners: Vec<SocketAddr>,
}

impl LocalAddresses {
    pub(crate) fn is_local_listener(&self, addr: SocketAddr) -> bool {
        self.listeners.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == addr.ip() || addr.ip().is_unspecified() || l.ip().is_unspecified())
        })
    }
}

/// Why no upstream address could be used.
pub enum Refusal {
    /// Every address is refused by policy (guarded range, or a loop to the relay).
    Blocked(Decision),
    /// The name did not resolve.
    Unresolvable(String),
}

/// Judges one candidate address; `Some` refuses it.
pub fn refuse_address(
    policy: &OutboundPolicy,
    local: &LocalAddresses,
    addr: SocketAddr,
) -> Option<Decision> {
    if local.is_local_listener(addr) {
        return Some(Decision {
            action: Action::Block,
            rule: "loop".to_string(),
        });
    }
    policy.refuse_address(addr.ip())
}

/// The first address of `host` the policy lets the relay connect to, on `port`.
pub async fn choose(
    resolver: &Resolver,
    policy: &OutboundPolicy,
    local: &LocalAddresses,
    host: &str,
    port: u16,
) -> Result<SocketAddr, Refusal> {
    let ips = resolver
        .resolve(host)
        .await
        .map_err(|e| Refusal::Unresolvable(e.to_string()))?;
    let mut first_refusal = None;
    for ip in ips {
        // IPv4-mapped IPv6 addresses are connected to as the IPv4 address they carry.
        let addr = SocketAddr::new(ip.to_canonical(), port);
        match refuse_address(policy, local, addr) {
            None => return Ok(addr),
            Some(d) => {
                first_refusal.get_or_insert(d);
            }
        }
    }
    Err(match first_refusal {
        Some(d) => Refusal::Blocked(d),
        None => Refusal::Unresolvable(format!("{host}: no address")),
    })
}
