//! Name resolution as the daemon does it for the relay and the DNS listener:
//! `[resolve]` first (like /etc/hosts), then the host's own resolver.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

/// A host name normalised for lookups and matching: lower case, no trailing dot,
/// IPv6 literals without brackets.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim_end_matches('.');
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.to_ascii_lowercase()
}

pub struct Resolver {
    table: HashMap<String, Vec<IpAddr>>,
}

impl Resolver {
    pub fn new(table: impl IntoIterator<Item = (String, Vec<IpAddr>)>) -> Self {
        Resolver {
            table: table
                .into_iter()
                .map(|(name, ips)| (normalize_host(&name), ips))
                .collect(),
        }
    }

    /// The `[resolve]` entry for `host`, if any.
    pub fn lookup_static(&self, host: &str) -> Option<&[IpAddr]> {
        self.table.get(&normalize_host(host)).map(Vec::as_slice)
    }

    /// Every address `host` resolves to: an IP literal, `[resolve]`, or the system resolver.
    pub async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        let name = normalize_host(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        if let Some(ips) = self.table.get(&name) {
            return Ok(ips.clone());
        }
        let addrs = tokio::net::lookup_host((name.as_str(), 0)).await?;
        let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        ips.dedup();
        if ips.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name}: no address"),
            ));
        }
        Ok(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_entries_and_literals() {
        let r = Resolver::new([(
            "API.example.com.".to_string(),
            vec!["127.0.0.2".parse().unwrap()],
        )]);
        assert_eq!(
            r.resolve("api.EXAMPLE.com").await.unwrap(),
            vec!["127.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            r.resolve("[::1]").await.unwrap(),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
        assert!(r.lookup_static("other.example.com").is_none());
    }
}
