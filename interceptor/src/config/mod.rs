//! The TOML configuration (SPEC §4): loading, validation with `FILE:LINE:COL: message`
//! diagnostics, and the typed, validated [`Config`].
//!
//! Paths in the file that are relative are resolved against the config file's directory.
//! Unknown keys are errors. Every error found is reported, not only the first.

mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};

use hyper::header::HeaderName;
use ipnet::IpNet;
use jsonwebtoken::Algorithm;

use crate::policy::{Action, Host, HostPattern, Template};

/// Default `[interceptor].relay`.
pub const DEFAULT_RELAY: &str = "127.0.0.1:15001";
/// Default `[interceptor].dns`.
pub const DEFAULT_DNS: &str = "127.0.0.1:15053";
/// Default `[interceptor].admin_socket`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/interceptor/admin.sock";
/// Default `[interceptor].log_dir`.
pub const DEFAULT_LOG_DIR: &str = "/var/log/interceptor";
/// Default `[interceptor].state_dir` (the compile cache is its `compiled/`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/interceptor";
/// Default `[interceptor].cgroup`.
pub const DEFAULT_CGROUP: &str = "interceptor";
/// Default `[interceptor].sandbox_user`.
pub const DEFAULT_SANDBOX_USER: &str = "nobody";
/// Default `[interceptor].log_max_bytes`: 64 MiB.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default `[interceptor].log_keep`.
pub const DEFAULT_LOG_KEEP: u32 = 5;
/// Default `[interceptor].max_connections_per_tenant`: far above what one
/// program needs, far below the descriptors the relay has for everyone.
pub const DEFAULT_MAX_CONNECTIONS_PER_TENANT: usize = 4096;
/// Default `[interceptor].dns_max_in_flight_per_tenant`: more than a program's
/// resolver has outstanding at once (a few per lookup), and 64 tenants' worth
/// still holds few resources: forwards share a handful of sockets.
pub const DEFAULT_DNS_MAX_IN_FLIGHT_PER_TENANT: usize = 64;
/// Default `[interceptor].sandbox_limits`: descriptors per sandboxed process
/// (RLIMIT_NOFILE) ...
pub const DEFAULT_SANDBOX_NOFILE: u64 = 4096;
/// ... and processes (threads included) per sandbox uid (RLIMIT_NPROC).
pub const DEFAULT_SANDBOX_NPROC: u64 = 512;
/// Default `jwt.ttl_seconds`.
pub const DEFAULT_JWT_TTL_SECONDS: u64 = 300;
/// Default `[[dispatch_namespaces]].binding`.
pub const DEFAULT_BINDING: &str = "dispatcher";
/// Default `[[dispatch_namespaces]].idle_timeout_seconds`: a Worker process
/// without a request for this long is stopped (the next request starts one).
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u64 = 600;
/// The parameters a dispatcher can pass (`[[dispatch_namespaces]].outbound.parameters`):
/// `customer_name` is the Worker's name, `url` the incoming request's URL.
pub const DISPATCH_PARAMETERS: &[&str] = &["customer_name", "url"];

/// Loads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let fail = |message: String| {
        Err(ConfigError::single(Diagnostic {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message,
        }))
    };
    // Bounded: a path like /dev/zero must end in an error, not fill memory.
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|file| {
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_CONFIG_BYTES + 1),
            &mut text,
        )
    });
    match read {
        Ok(n) if n as u64 > MAX_CONFIG_BYTES => fail(format!(
            "config file is larger than {} MiB",
            MAX_CONFIG_BYTES >> 20
        )),
        Ok(_) => parse(&text, path),
        Err(e) => fail(format!("cannot read config file: {e}")),
    }
}

/// Far above any real configuration.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Parses and validates `text`, the contents of the config file at `path` (used in
/// diagnostics and to resolve relative paths; key files and CA files it names are read).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse::parse(text, path)
}

/// Whether `name` is a valid tenant, outbound or namespace name: `[A-Za-z0-9_-]{1,64}`,
/// not starting with `-` (tenant names become file and cgroup names).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file, as given to [`load`] or [`parse`].
    pub path: PathBuf,
    /// The (absolute) directory relative paths were resolved against.
    pub base_dir: PathBuf,
    pub interceptor: InterceptorConfig,
    /// `[resolve]`: normalized host name (lower case, no trailing dot) → addresses.
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
    pub tenants: BTreeMap<String, TenantConfig>,
    pub dispatch_namespaces: Vec<DispatchNamespace>,
    pub outbound: BTreeMap<String, OutboundConfig>,
}

impl Config {
    /// The JWT signing keys the sandbox user can read (by the file's mode, for
    /// others, or for its owner or group when that is the sandbox user's, and
    /// every directory above it open to it the same way): a sandbox that reads
    /// one can mint the credentials itself.
    pub fn keys_open_to_sandboxes(&self) -> Vec<&Path> {
        use std::os::unix::fs::MetadataExt;
        let user = nix::unistd::User::from_name(&self.interceptor.sandbox_user)
            .ok()
            .flatten();
        let (uid, gid) = user.map_or((u32::MAX, u32::MAX), |u| (u.uid.as_raw(), u.gid.as_raw()));
        // `bits`: the read (4) or search (1) bit, as for "others".
        let open = |path: &Path, bits: u32| {
            std::fs::metadata(path).is_ok_and(|m| {
                let mode = m.mode();
                mode & bits != 0
                    || (m.uid() == uid && mode & (bits << 6) != 0)
                    || (m.gid() == gid && mode & (bits << 3) != 0)
            })
        };
        self.outbound
            .values()
            .flat_map(|o| &o.inject)
            .filter_map(|i| match &i.source {
                InjectSource::Jwt(jwt) => Some(jwt.key_file.as_path()),
                InjectSource::Value(_) => None,
            })
            .filter(|key| open(key, 0o4) && key.ancestors().skip(1).all(|dir| open(dir, 0o1)))
            .collect()
    }

    /// What a check of the host finds worth a warning in this config: signing
    /// keys the sandboxes can read, and listener ports the kernel may hand out
    /// itself (a sandbox's `listen` without `bind` could take one while the
    /// daemon is down; no cgroup hook sees that).
    pub fn host_warnings(&self) -> Vec<String> {
        let mut warnings: Vec<String> = self
            .keys_open_to_sandboxes()
            .into_iter()
            .map(|key| {
                format!(
                    "key_file {} is readable by the sandbox user, so by every sandbox (chmod 600 it, owned by root)",
                    key.display()
                )
            })
            .collect();
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| {
                let mut bounds = text.split_whitespace().map(str::parse::<u16>);
                Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
            });
        if let Some((low, high)) = range {
            let metrics = self.interceptor.metrics.map(|a| ("metrics", a.port()));
            for (what, port) in [
                ("relay", self.interceptor.relay.port()),
                ("dns", self.interceptor.dns.port()),
            ]
            .into_iter()
            .chain(metrics)
            {
                if (low..=high).contains(&port) {
                    warnings.push(format!(
                        "`{what}` port {port} is in the kernel's ephemeral range {low}-{high} (net.ipv4.ip_local_port_range): a sandbox could be handed it while the daemon is down; pick one below {low}"
                    ));
                }
            }
        }
        warnings
    }

    /// The `[resolve]` addresses for `host` (any case, trailing dot and port ignored).
    pub fn resolve_host(&self, host: &str) -> Option<&[IpAddr]> {
        match Host::parse(host)? {
            Host::Name(n) => self.resolve.get(&n).map(Vec::as_slice),
            Host::Ip(_) => None,
        }
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.get(name)
    }

    pub fn outbound(&self, name: &str) -> Option<&OutboundConfig> {
        self.outbound.get(name)
    }

    pub fn namespace(&self, name: &str) -> Option<&DispatchNamespace> {
        self.dispatch_namespaces
            .iter()
            .find(|n| n.namespace == name)
    }
}

/// `[interceptor]`; every key has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptorConfig {
    /// IPv4 relay address; see [`relay_v6`](Self::relay_v6).
    pub relay: SocketAddrV4,
    /// IPv4 DNS address; see [`dns_v6`](Self::dns_v6).
    pub dns: SocketAddrV4,
    pub admin_socket: PathBuf,
    pub log_dir: PathBuf,
    /// `state_dir`: state kept across restarts; the compile cache of Worker
    /// components is `<state_dir>/compiled/`.
    pub state_dir: PathBuf,
    /// Path of the subtree below the cgroup2 mount, without leading `/` (e.g. `interceptor`).
    pub cgroup: String,
    pub sandbox_user: String,
    /// Extra PEM CA files trusted for upstream TLS (besides the system roots).
    pub upstream_ca: Vec<PathBuf>,
    /// Size at which a tenant's log file is rotated.
    pub log_max_bytes: u64,
    /// Rotated log files kept per tenant.
    pub log_keep: u32,
    /// Relay connections one tenant (or one User Worker) may hold open at once;
    /// `None`: no limit.
    pub max_connections_per_tenant: Option<usize>,
    /// `sandbox_uids`: a uid (and gid) of its own for each tenant and User
    /// Worker; `None`: every sandbox runs as `sandbox_user`.
    pub sandbox_uids: Option<UidRange>,
    /// `sandbox_limits`: rlimits set in every sandbox before the privilege drop.
    pub sandbox_limits: SandboxLimits,
    /// Resolvers DNS queries are forwarded to; `None`: the `nameserver`s of
    /// /etc/resolv.conf.
    pub dns_forwarders: Option<Vec<SocketAddr>>,
    /// DNS forwards one tenant (or one User Worker) may have waiting at once;
    /// `None`: no limit.
    pub dns_max_in_flight_per_tenant: Option<usize>,
    /// `metrics`: where Prometheus text is served at `/metrics`; `None`: not served.
    pub metrics: Option<SocketAddr>,
}

impl Default for InterceptorConfig {
    fn default() -> Self {
        InterceptorConfig {
            relay: DEFAULT_RELAY.parse().expect("valid default"),
            dns: DEFAULT_DNS.parse().expect("valid default"),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            log_dir: PathBuf::from(DEFAULT_LOG_DIR),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            cgroup: DEFAULT_CGROUP.to_string(),
            sandbox_user: DEFAULT_SANDBOX_USER.to_string(),
            upstream_ca: Vec::new(),
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            log_keep: DEFAULT_LOG_KEEP,
            max_connections_per_tenant: Some(DEFAULT_MAX_CONNECTIONS_PER_TENANT),
            sandbox_uids: None,
            sandbox_limits: SandboxLimits::default(),
            dns_forwarders: None,
            dns_max_in_flight_per_tenant: Some(DEFAULT_DNS_MAX_IN_FLIGHT_PER_TENANT),
            metrics: None,
        }
    }
}

impl InterceptorConfig {
    /// The IPv6 relay: `[::1]` on the relay's port.
    pub fn relay_v6(&self) -> SocketAddrV6 {
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, self.relay.port(), 0, 0)
    }

    /// The IPv6 DNS address: `[::1]` on the DNS port.
    pub fn dns_v6(&self) -> SocketAddrV6 {
        SocketAddrV6::new(Ipv6Addr::LOCALHOST, self.dns.port(), 0, 0)
    }
}

/// `sandbox_uids = "FIRST-LAST"`: uids (and gids, the same numbers) no account
/// or group of this host has, handed out one per tenant and User Worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// How many uids it holds.
    pub fn size(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// `sandbox_limits = { nofile, nproc }`: set as both soft and hard limits, so
/// a sandbox cannot raise them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxLimits {
    /// RLIMIT_NOFILE: open descriptors per process.
    pub nofile: u64,
    /// RLIMIT_NPROC: processes and threads of the sandbox's uid, host-wide
    /// (so shared by every sandbox without `sandbox_uids`).
    pub nproc: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            nofile: DEFAULT_SANDBOX_NOFILE,
            nproc: DEFAULT_SANDBOX_NPROC,
        }
    }
}

/// `[tenants.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConfig {
    pub name: String,
    /// The `[outbound.*]` its traffic goes through; `None`: no outbound Worker (every host
    /// allowed, guarded ranges still refused — see `OutboundPolicy::default`).
    pub outbound: Option<String>,
    pub params: BTreeMap<String, String>,
}

/// `[[dispatch_namespaces]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchNamespace {
    pub binding: String,
    pub namespace: String,
    pub listen: SocketAddr,
    /// The folder of `NAME.wasm` User Workers (need not exist yet).
    pub workers: PathBuf,
    pub outbound: Option<NamespaceOutbound>,
    pub limits: Limits,
    /// How long a Worker process may go without a request before it is
    /// stopped; `None`: never.
    pub idle_timeout: Option<std::time::Duration>,
}

/// `outbound = { service, parameters }` of a dispatch namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceOutbound {
    pub service: String,
    /// A subset of [`DISPATCH_PARAMETERS`].
    pub parameters: Vec<String>,
}

/// Per incoming request limits; `None`: no limit of that kind was configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub subrequests: Option<u64>,
}

/// `[outbound.NAME]`.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub name: String,
    pub default: Action,
    pub allow: Vec<HostPattern>,
    pub block: Vec<HostPattern>,
    pub allow_cidrs: Vec<IpNet>,
    pub log: bool,
    pub inject: Vec<InjectConfig>,
}

/// `[[outbound.NAME.inject]]`.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub host: HostPattern,
    pub header: HeaderName,
    pub source: InjectSource,
}

/// Exactly one of `value` or `jwt`. `Debug` redacts the value's literal text.
#[derive(Debug, Clone)]
pub enum InjectSource {
    Value(Template),
    Jwt(JwtConfig),
}

/// `jwt = { algorithm, key_file, ttl_seconds, claims, kid }`.
#[derive(Clone)]
pub struct JwtConfig {
    pub algorithm: Algorithm,
    /// Absolute path of the signing key (validated when the config was parsed).
    pub key_file: PathBuf,
    pub ttl_seconds: u64,
    /// Claims as JSON; string values are templates. Never contains `iat` or `exp`.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Optional `kid` header.
    pub kid: Option<String>,
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("key_file", &self.key_file)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("claims", &self.claims.keys().collect::<Vec<_>>())
            .field("kid", &self.kid)
            .finish()
    }
}

/// One problem in a config file, shown as `FILE:LINE:COL: message` (or `FILE: message`
/// when it has no position, e.g. the file cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file.display(), self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            _ => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every problem found in a config file (at least one). `Display` shows one
/// `FILE:LINE:COL: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct ConfigError {
    diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    fn single(d: Diagnostic) -> Self {
        ConfigError {
            diagnostics: vec![d],
        }
    }

    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// One rendered line per problem.
    pub fn lines(&self) -> Vec<String> {
        self.diagnostics.iter().map(ToString::to_string).collect()
    }

    /// Writes one line per problem.
    pub fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        for d in &self.diagnostics {
            writeln!(w, "{d}")?;
        }
        Ok(())
    }

    /// Prints one line per problem to stderr.
    pub fn print(&self) {
        let _ = self.write_to(&mut std::io::stderr().lock());
    }
}

#[cfg(test)]
mod tests;
