//! The built-in outbound Worker's decisions (SPEC §4, §5): which hosts and addresses a
//! tenant may reach, and which credentials are added on the way.
//!
//! Pure logic: the only I/O is reading JWT key files once, in
//! [`OutboundPolicy::from_config`].

mod addresses;
mod hosts;
mod inject;
mod jwt;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use addresses::{allowing_cidr, embedded_ipv4, guarded_range};
pub use hosts::{Host, HostPattern};
pub use inject::{is_param_name, InjectError, Injection, Template};
pub use jwt::{load_key, parse_algorithm, KeyError, ALGORITHMS};

use crate::config::{Config, InjectSource, OutboundConfig};
use inject::InjectKind;
use jwt::{ClaimTemplate, JwtMinter};

/// Outbound parameters of one request (`customer_name`, `url`, a tenant's `params`, ...).
pub type Params = BTreeMap<String, String>;

/// What happens to a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Action::Allow),
            "block" => Ok(Action::Block),
            other => Err(format!("`{other}` is neither \"allow\" nor \"block\"")),
        }
    }
}

/// A decision and the rule that made it, as logged in `rule`: `block:<pattern>`,
/// `allow:<pattern>`, `default:allow`, `default:block`, `guarded:<range>`, `cidr:<net>`,
/// or `invalid-host` for a host name that cannot be judged (always blocked).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    pub rule: String,
}

impl Decision {
    pub fn allow(rule: impl Into<String>) -> Decision {
        Decision {
            action: Action::Allow,
            rule: rule.into(),
        }
    }

    pub fn block(rule: impl Into<String>) -> Decision {
        Decision {
            action: Action::Block,
            rule: rule.into(),
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

/// Why an outbound policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("outbound `{outbound}`: {source}")]
    Key {
        outbound: String,
        #[source]
        source: KeyError,
    },
    #[error("outbound `{outbound}`: invalid claims template: {reason}")]
    Claims { outbound: String, reason: String },
    #[error("outbound `{name}` is not defined")]
    UnknownOutbound { name: String },
}

/// One `[outbound.NAME]`: the built-in outbound Worker's rules. `Debug` never shows
/// credentials (templates' literal text and keys are redacted).
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    name: String,
    default: Action,
    allow: Vec<HostPattern>,
    block: Vec<HostPattern>,
    allow_cidrs: Vec<IpNet>,
    log: bool,
    injections: Vec<Injection>,
}

impl Default for OutboundPolicy {
    /// No outbound Worker configured: every host allowed, guarded ranges refused, logged.
    fn default() -> Self {
        OutboundPolicy {
            name: String::new(),
            default: Action::Allow,
            allow: Vec::new(),
            block: Vec::new(),
            allow_cidrs: Vec::new(),
            log: true,
            injections: Vec::new(),
        }
    }
}

impl OutboundPolicy {
    /// Builds the policy, loading each JWT signing key once.
    pub fn from_config(cfg: &OutboundConfig) -> Result<Self, PolicyError> {
        let mut injections = Vec::with_capacity(cfg.inject.len());
        for inj in &cfg.inject {
            let kind = match &inj.source {
                InjectSource::Value(t) => InjectKind::Value(t.clone()),
                InjectSource::Jwt(j) => {
                    let key =
                        load_key(j.algorithm, &j.key_file).map_err(|source| PolicyError::Key {
                            outbound: cfg.name.clone(),
                            source,
                        })?;
                    let claims =
                        ClaimTemplate::from_json(&serde_json::Value::Object(j.claims.clone()))
                            .map_err(|reason| PolicyError::Claims {
                                outbound: cfg.name.clone(),
                                reason,
                            })?;
                    InjectKind::Jwt(Box::new(JwtMinter {
                        algorithm: j.algorithm,
                        key,
                        ttl_seconds: j.ttl_seconds,
                        kid: j.kid.clone(),
                        claims,
                    }))
                }
            };
            injections.push(Injection {
                host: inj.host.clone(),
                header: inj.header.clone(),
                kind,
            });
        }
        Ok(OutboundPolicy {
            name: cfg.name.clone(),
            default: cfg.default,
            allow: cfg.allow.clone(),
            block: cfg.block.clone(),
            allow_cidrs: cfg.allow_cidrs.clone(),
            log: cfg.log,
            injections,
        })
    }

    /// Builds every `[outbound.*]` of a config, by name.
    pub fn all_from_config(
        config: &Config,
    ) -> Result<BTreeMap<String, OutboundPolicy>, PolicyError> {
        config
            .outbound
            .iter()
            .map(|(name, o)| Ok((name.clone(), OutboundPolicy::from_config(o)?)))
            .collect()
    }

    /// The `[outbound.NAME]` this was built from (empty for [`Default`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The action for hosts on neither list.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// Whether requests through this outbound are logged (`log`).
    pub fn log_enabled(&self) -> bool {
        self.log
    }

    /// The `allow_cidrs` nets.
    pub fn allow_cidrs(&self) -> &[IpNet] {
        &self.allow_cidrs
    }

    fn default_decision(&self) -> Decision {
        match self.default {
            Action::Allow => Decision::allow("default:allow"),
            Action::Block => Decision::block("default:block"),
        }
    }

    /// Judges a host name (Host header, URI authority, SNI): `block` wins over `allow`,
    /// else `default`. A port suffix is ignored. A host that cannot be parsed is blocked
    /// with rule `invalid-host`.
    pub fn decide_host(&self, host: &str) -> Decision {
        match Host::parse(host) {
            Some(h) => self.decide_parsed_host(&h),
            None => Decision::block("invalid-host"),
        }
    }

    /// [`decide_host`](Self::decide_host) for an already normalized host.
    pub fn decide_parsed_host(&self, host: &Host) -> Decision {
        if let Some(p) = self.block.iter().find(|p| p.matches_host(host)) {
            return Decision::block(format!("block:{p}"));
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches_host(host)) {
            return Decision::allow(format!("allow:{p}"));
        }
        self.default_decision()
    }

    /// Judges an address the relay is about to connect to (or the sandbox dialled):
    /// `Some(Allow, "cidr:<net>")` when `allow_cidrs` admits it, `Some(Block,
    /// "guarded:<range>")` when it is in a guarded range, `None` otherwise.
    pub fn decide_address(&self, ip: IpAddr) -> Option<Decision> {
        match allowing_cidr(&self.allow_cidrs, ip) {
            Some(net) => Some(Decision::allow(format!("cidr:{net}"))),
            None => guarded(ip),
        }
    }

    /// The refusal [`decide_address`](Self::decide_address) would give, if any,
    /// without building the allowing decision (the relay asks this per request).
    pub fn refuse_address(&self, ip: IpAddr) -> Option<Decision> {
        match allowing_cidr(&self.allow_cidrs, ip) {
            Some(_) => None,
            None => guarded(ip),
        }
    }

    /// Judges a connection that is neither HTTP nor TLS, by destination: as
    /// [`decide_address`](Self::decide_address), else the default action.
    pub fn decide_opaque(&self, ip: IpAddr, _port: u16) -> Decision {
        self.decide_address(ip)
            .unwrap_or_else(|| self.default_decision())
    }

    /// The injections whose `host` pattern matches `host`, in config order.
    pub fn injections_for<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Injection> + 'a {
        // Most policies inject nothing: don't parse the host for them.
        let host = if self.injections.is_empty() {
            None
        } else {
            Host::parse(host)
        };
        self.injections
            .iter()
            .filter(move |i| host.as_ref().is_some_and(|h| i.host.matches_host(h)))
    }

    /// Every injection, in config order.
    pub fn injections(&self) -> &[Injection] {
        &self.injections
    }
}

/// The refusal of an address in a guarded range (SPEC §5).
fn guarded(ip: IpAddr) -> Option<Decision> {
    guarded_range(ip).map(|r| Decision::block(format!("guarded:{r}")))
}

#[cfg(test)]
mod tests;
