//! HTTP header handling shared by every hop the daemon forwards (relay and
//! dispatcher).

use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// Headers that describe one HTTP/1.1 hop, not the message (RFC 9110 §7.6.1).
/// Parsed names, so that checking a message costs no string parsing.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names present, instead of a lookup per hop-by-hop
    // name: most messages carry none, or only `Connection: keep-alive`.
    let mut remove: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    if remove.is_empty() {
        return;
    }
    remove.extend(
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(name))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()),
    );
    for name in remove {
        headers.remove(name);
    }
}

/// Whether the comma-separated values of header `name` hold `token`.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a request is the last its client sends on the connection: HTTP/1.1
/// says so with `Connection: close`; HTTP/1.0 unless it asks for `keep-alive`.
pub fn is_last_request(version: hyper::Version, headers: &HeaderMap) -> bool {
    match version {
        hyper::Version::HTTP_10 => !has_token(headers, &CONNECTION, "keep-alive"),
        _ => has_token(headers, &CONNECTION, "close"),
    }
}

/// Whether an HTTP/1.1 message asks to switch its connection to WebSocket
/// (RFC 6455 §4): `Connection: upgrade` with `Upgrade: websocket`. Other
/// protocols (h2c above all) are not switched to: the relay could no longer
/// judge the requests that follow.
pub fn is_websocket_upgrade(version: hyper::Version, headers: &HeaderMap) -> bool {
    version == hyper::Version::HTTP_11
        && has_token(headers, &CONNECTION, "upgrade")
        && has_token(headers, &UPGRADE, "websocket")
}

/// Puts back the two headers [`strip_hop_by_hop`] removed from a WebSocket
/// upgrade, for the next hop.
pub fn restore_websocket_upgrade(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
}

/// `Connection: close`, for a response that ends its connection.
pub const CLOSE: HeaderValue = HeaderValue::from_static("close");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_request_on_a_connection() {
        use hyper::Version;
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, value.parse().unwrap());
            h
        };
        assert!(is_last_request(Version::HTTP_11, &with("close")));
        assert!(is_last_request(Version::HTTP_11, &with("x-foo, Close")));
        assert!(!is_last_request(Version::HTTP_11, &with("keep-alive")));
        assert!(!is_last_request(Version::HTTP_11, &HeaderMap::new()));
        assert!(!is_last_request(Version::HTTP_11, &with("closed")));
        assert!(is_last_request(Version::HTTP_10, &HeaderMap::new()));
        assert!(!is_last_request(Version::HTTP_10, &with("Keep-Alive")));
    }

    #[test]
    fn a_websocket_upgrade() {
        use hyper::Version;
        let with = |connection: &str, upgrade: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, connection.parse().unwrap());
            h.insert(UPGRADE, upgrade.parse().unwrap());
            h
        };
        assert!(is_websocket_upgrade(
            Version::HTTP_11,
            &with("Upgrade", "websocket")
        ));
        assert!(is_websocket_upgrade(
            Version::HTTP_11,
            &with("keep-alive, upgrade", "WebSocket")
        ));
        assert!(!is_websocket_upgrade(
            Version::HTTP_11,
            &with("upgrade", "h2c")
        ));
        assert!(!is_websocket_upgrade(
            Version::HTTP_11,
            &with("keep-alive", "websocket")
        ));
        assert!(!is_websocket_upgrade(
            Version::HTTP_10,
            &with("upgrade", "websocket")
        ));
        let mut h = with("upgrade", "websocket");
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        restore_websocket_upgrade(&mut h);
        assert!(is_websocket_upgrade(Version::HTTP_11, &h));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-foo".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("authorization", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["authorization"], "kept");
    }
}
