//! The host a request is judged by, and where it goes, read once from its head.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hyper::header::HOST;
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Request, Version};

use super::refused::Refused;
use crate::policy::{Decision, Host, OutboundPolicy};
use crate::resolve::normalize_host;

/// What the sandbox dialled: the address its connection was redirected from.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dialled {
    pub addr: SocketAddr,
    /// The relay's own address, as for a Worker's subrequests: its port says
    /// nothing about the target's.
    pub is_relay: bool,
}

/// Where the relay connects for a request: an address it resolved for the judged
/// host and the policy let it use, never merely the one the sandbox dialled.
#[derive(Clone, Copy, Debug)]
pub(super) struct Upstream(pub SocketAddr);

pub(super) struct RequestTarget {
    /// Normalised: lower case, no trailing dot, no brackets.
    pub host: String,
    /// `host` as the policy matches it, parsed once; `None` if it cannot be.
    parsed: Option<Host>,
    pub port: u16,
    /// As sent on: `host[:port]`.
    pub authority: Authority,
    /// An absolute-form `https://` request: the relay originates the TLS.
    pub tls: bool,
    pub url: String,
}

impl RequestTarget {
    /// The absolute-form URI wins over the Host header (RFC 9112 §3.2.2). Without a
    /// port in either, the port is the one the sandbox dialled (README, "How
    /// traffic is judged"); only a request sent to the relay's own address (a
    /// Worker's subrequest) has no dialled port to go by, and defaults by scheme.
    pub fn of<B>(req: &Request<B>, dialled: Dialled) -> Result<Self, Refused> {
        let tls = match req.uri().scheme_str() {
            None | Some("http") => false,
            Some("https") => true,
            Some(_) => {
                return Err(Refused::BadTarget(
                    "unsupported scheme in the request target",
                ))
            }
        };
        let default_port = match (dialled.is_relay && req.uri().authority().is_some(), tls) {
            (false, _) => dialled.addr.port(),
            (true, false) => 80,
            (true, true) => 443,
        };
        let authority = match req.uri().authority() {
            Some(a) => a.clone(),
            None => match req.headers().get(HOST) {
                Some(host) => {
                    let host = host
                        .to_str()
                        .map_err(|_| Refused::BadTarget("Host header is not ASCII"))?;
                    Authority::from_str(host)
                        .map_err(|_| Refused::BadTarget("malformed Host header"))?
                }
                // HTTP/1.0 may omit Host: the dialled address is all there is.
                None if req.version() == Version::HTTP_10 => {
                    let literal = match dialled.addr.ip().to_canonical() {
                        IpAddr::V4(v4) => v4.to_string(),
                        IpAddr::V6(v6) => format!("[{v6}]"),
                    };
                    Authority::from_str(&literal)
                        .map_err(|_| Refused::BadTarget("no usable host"))?
                }
                None => return Err(Refused::BadTarget("request without a Host header")),
            },
        };
        if authority.as_str().contains('@') {
            return Err(Refused::BadTarget("userinfo in the request target"));
        }
        let host = normalize_host(authority.host());
        if host.is_empty() {
            return Err(Refused::BadTarget("empty host"));
        }
        // Read from the text: `Authority` drops a port it cannot parse.
        let port_text = authority
            .as_str()
            .strip_prefix(authority.host())
            .and_then(|rest| rest.strip_prefix(':'));
        // An empty port is the default one (RFC 3986 §3.2.3); otherwise digits only.
        let port = match port_text {
            None | Some("") => default_port,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(Refused::BadTarget("invalid port")),
            },
        };
        let path = req
            .uri()
            .path_and_query()
            .map(PathAndQuery::as_str)
            .unwrap_or("/");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{authority}{path}");
        Ok(RequestTarget {
            parsed: Host::parse(&host),
            host,
            port,
            authority,
            tls,
            url,
        })
    }

    /// The policy's decision on the host; one it cannot parse is never allowed.
    pub fn decide(&self, policy: &OutboundPolicy) -> Decision {
        match &self.parsed {
            Some(host) => policy.decide_parsed_host(host),
            None => Decision::block("invalid-host"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_the_named_one_else_the_dialled_one() {
        let dialled: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let relay: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let port = |uri: &str, host: Option<&str>, to: SocketAddr, is_relay: bool| {
            let mut req = Request::get(uri);
            if let Some(host) = host {
                req = req.header(HOST, host);
            }
            let dialled = Dialled { addr: to, is_relay };
            let target = RequestTarget::of(&req.body(()).unwrap(), dialled).unwrap();
            (target.port, target.tls, target.url)
        };
        let url = |s: &str| s.to_string();
        assert_eq!(
            port("/a", Some("api.test"), dialled, false),
            (8080, false, url("http://api.test/a"))
        );
        assert_eq!(port("/a", Some("api.test:81"), dialled, false).0, 81);
        assert_eq!(port("http://api.test/a", None, dialled, false).0, 8080);
        assert_eq!(port("https://api.test/a", None, dialled, false).0, 8080);
        assert_eq!(
            port("http://api.test:82/a", Some("x.test"), dialled, false).0,
            82
        );
        // A Worker's subrequest, sent to the relay itself: by scheme.
        assert_eq!(port("http://api.test/a", None, relay, true).0, 80);
        assert_eq!(
            port("https://api.test/a", None, relay, true),
            (443, true, url("https://api.test/a"))
        );
    }

    #[test]
    fn a_target_the_relay_cannot_judge_is_refused_as_a_bad_request() {
        let dialled = Dialled {
            addr: "127.0.0.2:80".parse().unwrap(),
            is_relay: false,
        };
        let refused = |req: hyper::http::request::Builder| {
            RequestTarget::of(&req.body(()).unwrap(), dialled).err()
        };
        assert_eq!(
            refused(Request::get("/")),
            Some(Refused::BadTarget("request without a Host header"))
        );
        assert_eq!(
            refused(Request::get("/").header(HOST, "api.test:99999")),
            Some(Refused::BadTarget("invalid port"))
        );
        assert_eq!(
            refused(Request::get("ftp://api.test/")),
            Some(Refused::BadTarget(
                "unsupported scheme in the request target"
            ))
        );
        // Control: the same request with a Host is judged.
        assert_eq!(refused(Request::get("/").header(HOST, "api.test")), None);
    }
}
