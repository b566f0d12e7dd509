//! [`LogEntry`]: one line of a tenant's log.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::LogError;

/// The protocol the relay saw on a connection.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Http,
    Tls,
    Tcp,
    Dns,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http => "http",
            Proto::Tls => "tls",
            Proto::Tcp => "tcp",
            Proto::Dns => "dns",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = LogError;
    fn from_str(s: &str) -> Result<Self, LogError> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Ok(Proto::Http),
            "tls" => Ok(Proto::Tls),
            "tcp" => Ok(Proto::Tcp),
            "dns" => Ok(Proto::Dns),
            _ => Err(LogError::BadProto(s.to_owned())),
        }
    }
}

/// What was decided for a request or connection (`decision` in the log).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Block,
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
            Verdict::Error => "error",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Verdict {
    type Err = LogError;
    fn from_str(s: &str) -> Result<Self, LogError> {
        match s.to_ascii_lowercase().as_str() {
            "allow" => Ok(Verdict::Allow),
            "block" => Ok(Verdict::Block),
            "error" => Ok(Verdict::Error),
            _ => Err(LogError::BadDecision(s.to_owned())),
        }
    }
}

/// One subrequest (HTTP request, TLS or TCP connection, DNS query) of a tenant: one line
/// of `<log_dir>/<tenant>.jsonl`.
///
/// Every field is always serialized, in this order; absent values are `null`. `ts` is
/// RFC 3339 in UTC with millisecond precision (`2024-05-01T12:00:00.123Z`). `url` is
/// written without any `user:password@` part (credentials never reach a log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When the request was seen.
    #[serde(with = "ts_serde")]
    pub ts: OffsetDateTime,
    pub tenant: String,
    /// The User Worker, where there is one.
    #[serde(default)]
    pub worker: Option<String>,
    /// The sandboxed process that connected, when known.
    #[serde(default)]
    pub pid: Option<u32>,
    pub proto: Proto,
    /// HTTP method (http only).
    #[serde(default)]
    pub method: Option<String>,
    /// Full request URL (http only).
    #[serde(default, serialize_with = "ser_url")]
    pub url: Option<String>,
    /// The host judged: Host header / URI host, SNI, or DNS query name.
    #[serde(default)]
    pub host: Option<String>,
    /// What the sandbox asked for, `ip:port` (`[::1]:80` for IPv6).
    pub dst: String,
    /// Where the relay connected, `ip:port`, when it did.
    #[serde(default)]
    pub upstream: Option<String>,
    pub decision: Verdict,
    /// What decided it (e.g. `allow:api.example.com`, `default`, `cidr:guarded`).
    #[serde(default)]
    pub rule: String,
    /// HTTP status returned to the sandbox (http only).
    #[serde(default)]
    pub status: Option<u16>,
    /// Bytes sent upstream on behalf of the sandbox.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes received from upstream.
    #[serde(default)]
    pub bytes_received: u64,
    /// Whole milliseconds from the start of the request to its end.
    #[serde(default)]
    pub duration_ms: u64,
    /// The outbound parameters of the request.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Why the request failed (`decision = error`) or its stream ended early
    /// (a reset, a cut at shutdown); `rule` says which step, this says what
    /// happened there.
    #[serde(default)]
    pub error: Option<String>,
}

impl LogEntry {
    /// An entry stamped now, with `decision = allow`, empty `rule`, everything else absent
    /// or zero; set the rest through the public fields or the `with_*` helpers.
    pub fn new(tenant: impl Into<String>, proto: Proto, dst: SocketAddr) -> Self {
        Self::with_dst(tenant, proto, dst.to_string())
    }

    /// [`new`](Self::new) with `dst` already formatted.
    pub fn with_dst(tenant: impl Into<String>, proto: Proto, dst: String) -> Self {
        LogEntry {
            ts: now_ms(),
            tenant: tenant.into(),
            worker: None,
            pid: None,
            proto,
            method: None,
            url: None,
            host: None,
            dst,
            upstream: None,
            decision: Verdict::Allow,
            rule: String::new(),
            status: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            params: BTreeMap::new(),
            error: None,
        }
    }

    /// Fills in what is known once the exchange is over.
    pub fn finished(&mut self, bytes_sent: u64, bytes_received: u64, started: std::time::Instant) {
        self.bytes_sent = bytes_sent;
        self.bytes_received = bytes_received;
        self.duration_ms = started.elapsed().as_millis() as u64;
    }

    pub fn with_decision(mut self, decision: Verdict, rule: impl Into<String>) -> Self {
        self.decision = decision;
        self.rule = rule.into();
        self
    }

    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    pub fn with_upstream(mut self, upstream: SocketAddr) -> Self {
        self.upstream = Some(upstream.to_string());
        self
    }

    pub fn with_worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = Some(worker.into());
        self
    }

    pub fn with_pid(mut self, pid: u32) -> Self {
        self.pid = Some(pid);
        self
    }

    pub fn with_params(mut self, params: BTreeMap<String, String>) -> Self {
        self.params = params;
        self
    }

    /// Sets `duration_ms` from an elapsed time (rounded down to whole milliseconds).
    pub fn set_duration(&mut self, elapsed: std::time::Duration) {
        self.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    }

    /// The entry as one JSON line, without the trailing newline.
    pub fn to_json_line(&self) -> Result<String, LogError> {
        // Sized for a typical line, so it is not regrown field by field.
        let mut line = Vec::with_capacity(512);
        serde_json::to_writer(&mut line, self).map_err(LogError::Serialize)?;
        // serde_json writes UTF-8 only; the lossy path is never taken.
        Ok(String::from_utf8(line)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// Parses one JSON line. Unknown keys are ignored; keys other than `ts`, `tenant`,
    /// `proto`, `dst` and `decision` may be missing.
    pub fn from_json_line(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// The current time in UTC, truncated to milliseconds (what a log line can hold).
pub(crate) fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now)
}

/// Removes a `user[:password]@` part from a URL's authority, if there is one:
/// `https://u:p@host/x` → `https://host/x`. Anything that is not `scheme://…` is
/// returned unchanged.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(scheme_end) = url.find("://") else {
        return url.into();
    };
    let auth_start = scheme_end + 3;
    let rest = &url[auth_start..];
    let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..auth_len].rfind('@') {
        Some(at) => format!("{}{}", &url[..auth_start], &rest[at + 1..]).into(),
        None => url.into(),
    }
}

fn ser_url<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(redact_url(u).as_ref()),
        None => s.serialize_none(),
    }
}

mod ts_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, UtcOffset};

    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );

    /// `FORMAT`, written out by hand: it runs for every log line, and the
    /// general formatter costs several times as much.
    pub fn format(ts: OffsetDateTime) -> String {
        let t = ts.to_offset(UtcOffset::UTC);
        let Ok(year) = u32::try_from(t.year()) else {
            return general(t);
        };
        if year > 9999 {
            return general(t);
        }
        let mut out = String::with_capacity(24);
        let mut digits = |n: u32, width: u32, sep: char| {
            for place in (0..width).rev() {
                out.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
            }
            out.push(sep);
        };
        digits(year, 4, '-');
        digits(u8::from(t.month()).into(), 2, '-');
        digits(t.day().into(), 2, 'T');
        digits(t.hour().into(), 2, ':');
        digits(t.minute().into(), 2, ':');
        digits(t.second().into(), 2, '.');
        digits(t.millisecond().into(), 3, 'Z');
        out
    }

    fn general(t: OffsetDateTime) -> String {
        t.format(FORMAT)
            .unwrap_or_else(|_| "0000-00-00T00:00:00.000Z".to_owned())
    }

    #[cfg(test)]
    #[test]
    fn hand_written_format_matches_the_general_one() {
        let mut ts = OffsetDateTime::UNIX_EPOCH;
        let end = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);
        for t in [
            ts,
            end,
            time::macros::datetime!(2026-11-23 17:05:09.007 +02:00),
        ] {
            assert_eq!(format(t), general(t.to_offset(UtcOffset::UTC)));
        }
        // A walk over many dates and times of day.
        let step = time::Duration::milliseconds(86_399_987_123);
        while let Some(next) = ts.checked_add(step).filter(|t| *t < end) {
            assert_eq!(format(next), general(next));
            ts = next;
        }
        assert_eq!(format(end), "9999-12-31T23:59:59.999Z");
    }

    pub fn serialize<S: Serializer>(ts: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = String::deserialize(d)?;
        OffsetDateTime::parse(&s, &Rfc3339)
            .map(|t| t.to_offset(UtcOffset::UTC))
            .map_err(|e| serde::de::Error::custom(format!("bad ts `{s}`: {e}")))
    }
}

pub(crate) use ts_serde::format as format_ts;
