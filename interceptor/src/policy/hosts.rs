//! Host names and host patterns (`api.example.com`, `*.github.com`, IP literals).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A host as a request names it (Host header, absolute-form URI, TLS SNI), normalized:
/// lower case, trailing dots dropped, a `:port` suffix and IPv6 brackets removed, and IP
/// literals (including the forms `inet_aton` accepts, such as `127.1` or `0x7f000001`,
/// which a system resolver would turn into that address) parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// Normalizes `raw`; `None` when it is not a usable host name or IP literal
    /// (empty, spaces, `/`, `@`, non-ASCII, empty labels, over-long, ...).
    pub fn parse(raw: &str) -> Option<Host> {
        let s = raw.trim();
        if s.is_empty() {
            return None;
        }
        if let Some(rest) = s.strip_prefix('[') {
            let end = rest.find(']')?;
            let after = &rest[end + 1..];
            if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
                return None;
            }
            return parse_v6(&rest[..end]).map(Host::Ip);
        }
        let host = match s.matches(':').count() {
            0 => s,
            1 => {
                let (h, port) = s.split_once(':')?;
                if !is_port(port) {
                    return None;
                }
                h
            }
            _ => return parse_v6(s).map(Host::Ip),
        };
        let host = host.trim_end_matches('.');
        if host.is_empty() || host.len() > 253 {
            return None;
        }
        let host = host.to_ascii_lowercase();
        if let Some(v4) = parse_ipv4_loose(&host) {
            return Some(Host::Ip(IpAddr::V4(v4)));
        }
        for label in host.split('.') {
            if label.is_empty()
                || label.len() > 63
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return None;
            }
        }
        Some(Host::Name(host))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

fn is_port(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u16>().is_ok()
}

fn parse_v6(s: &str) -> Option<IpAddr> {
    // A zone id (`fe80::1%eth0`) does not change which address it is.
    let s = s.split_once('%').map_or(s, |(a, _)| a);
    s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The IPv4 literal forms `inet_aton(3)` accepts: 1 to 4 parts, each decimal, octal
/// (leading `0`) or hex (`0x`), the last part filling the remaining bytes.
fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    if !s.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"))
        {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 8 {
            return None;
        }
        let n = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        nums.push(n);
    }
    let (last, head) = nums.split_last()?;
    let mut value: u32 = 0;
    for (i, n) in head.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let rest_bits = 32 - 8 * head.len() as u32;
    if rest_bits < 32 && u64::from(*last) >= (1u64 << rest_bits) {
        return None;
    }
    Some(Ipv4Addr::from(value | last))
}

/// A host pattern of an `allow`, `block` or `inject.host` entry.
///
/// `api.example.com` matches that name only; `*.github.com` matches every subdomain of
/// `github.com` at any depth but not `github.com` itself; an IP literal (`10.0.0.1`,
/// `[::1]` or `::1`) matches that address written in any form. Matching is
/// case-insensitive and ignores a trailing dot on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// The suffix after `*.`.
    Wildcard(String),
    Ip(IpAddr),
}

impl HostPattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Err("empty host pattern".into());
        }
        if s.contains("://") {
            return Err(format!("`{s}` is a URL; write the host name only"));
        }
        if s.contains('/') {
            return Err(format!("`{s}` must be a host name, without `/`"));
        }
        if s == "*" {
            return Err(
                "`*` alone is not a pattern; use `default` to decide for every host".into(),
            );
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(format!(
                    "`{s}`: `*` is only allowed as the whole first label, as in `*.example.com`"
                ));
            }
            if suffix.contains(':') || suffix.contains('[') {
                return Err(format!(
                    "`{s}`: a wildcard pattern takes a domain name, without a port"
                ));
            }
            return match Host::parse(suffix) {
                Some(Host::Name(n)) => Ok(HostPattern::Wildcard(n)),
                Some(Host::Ip(_)) => Err(format!(
                    "`{s}`: a wildcard cannot stand before an IP address"
                )),
                None => Err(format!("`{s}` is not a valid host pattern")),
            };
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: `*` is only allowed as the whole first label, as in `*.example.com`"
            ));
        }
        if s.starts_with('[') {
            if !s.ends_with(']') {
                return Err(format!("`{s}`: write the host without a port"));
            }
        } else if s.matches(':').count() == 1 {
            return Err(format!("`{s}`: write the host without a port"));
        }
        match Host::parse(s) {
            Some(Host::Name(n)) => Ok(HostPattern::Exact(n)),
            Some(Host::Ip(ip)) => Ok(HostPattern::Ip(ip.to_canonical())),
            None => Err(format!("`{s}` is not a valid host name")),
        }
    }

    /// Whether `host` (raw, as in [`Host::parse`]) matches; an unusable host matches nothing.
    pub fn matches(&self, host: &str) -> bool {
        Host::parse(host).is_some_and(|h| self.matches_host(&h))
    }

    /// Whether an already normalized host matches.
    pub fn matches_host(&self, host: &Host) -> bool {
        match (self, host) {
            (HostPattern::Exact(p), Host::Name(n)) => p == n,
            (HostPattern::Wildcard(sfx), Host::Name(n)) => {
                n.len() > sfx.len() + 1
                    && n.ends_with(sfx.as_str())
                    && n.as_bytes()[n.len() - sfx.len() - 1] == b'.'
            }
            (HostPattern::Ip(p), Host::Ip(ip)) => p.to_canonical() == ip.to_canonical(),
            _ => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
            HostPattern::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            HostPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn exact() {
        assert!(p("api.example.com").matches("api.example.com"));
        assert!(!p("api.example.com").matches("x.api.example.com"));
        assert!(!p("api.example.com").matches("example.com"));
        assert!(!p("api.example.com").matches("api.example.com.evil.net"));
    }

    #[test]
    fn wildcard_depth_and_apex() {
        let w = p("*.github.com");
        assert!(w.matches("api.github.com"));
        assert!(w.matches("a.b.c.github.com"));
        assert!(!w.matches("github.com"));
        assert!(!w.matches("github.com."));
        assert!(!w.matches("evilgithub.com"));
        assert!(!w.matches("github.com.evil.net"));
        assert_eq!(w.to_string(), "*.github.com");
    }

    #[test]
    fn case_trailing_dot_and_port() {
        assert!(p("API.Example.COM.").matches("api.example.com"));
        assert!(p("api.example.com").matches("API.EXAMPLE.COM."));
        assert!(p("api.example.com").matches("api.example.com:8443"));
        assert!(p("*.GitHub.com").matches("Raw.GITHUB.com."));
        assert_eq!(p("API.Example.COM.").to_string(), "api.example.com");
    }

    #[test]
    fn ip_literals() {
        assert!(p("[::1]").matches("::1"));
        assert!(p("::1").matches("[::1]:8080"));
        assert!(p("[::1]").matches("[0:0::1]"));
        assert!(p("127.0.0.1").matches("127.0.0.1:80"));
        assert!(p("127.0.0.1").matches("[::ffff:127.0.0.1]"));
        assert!(p("127.0.0.1").matches("127.1"));
        assert!(p("127.0.0.1").matches("0x7f000001"));
        assert!(p("169.254.169.254").matches("169.254.43518"));
        assert_eq!(p("::1").to_string(), "[::1]");
        // a wildcard never matches an IP literal
        assert!(!p("*.example.com").matches("1.2.3.4"));
    }

    #[test]
    fn bad_patterns() {
        for bad in [
            "",
            "*",
            "*.*.com",
            "a.*.com",
            "foo*.com",
            "http://x.com",
            "x.com/path",
            "x.com:443",
            "a..b",
            "sp ace.com",
            "*.1.2.3.4",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn bad_hosts() {
        for bad in [
            "",
            " ",
            "a..b",
            "x y",
            "user@host",
            "a/b",
            "[::1",
            "[::1]x",
            "h:99999",
            "ünï.com",
        ] {
            assert_eq!(Host::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            Host::parse("Example.COM..").unwrap(),
            Host::Name("example.com".into())
        );
    }

    #[test]
    fn loose_ipv4() {
        assert_eq!(parse_ipv4_loose("127.1"), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            parse_ipv4_loose("0177.0.0.1"),
            Some(Ipv4Addr::new(127, 0, 0, 1))
        );
        assert_eq!(
            parse_ipv4_loose("2130706433"),
            Some(Ipv4Addr::new(127, 0, 0, 1))
        );
        assert_eq!(parse_ipv4_loose("10.0.0.256"), None);
        assert_eq!(parse_ipv4_loose("1.2.3.4.5"), None);
        assert_eq!(parse_ipv4_loose("1abc.com"), None);
        assert_eq!(parse_ipv4_loose("08.1.1.1"), None);
    }
}
