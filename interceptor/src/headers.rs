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

/// Whether a request is the last its client sends on the connection: HTTP/1.1
/// says so with `Connection: close`; HTTP/1.0 unless it asks for `keep-alive`.
pub fn is_last_request(version: hyper::Version, headers: &HeaderMap) -> bool {
    let has_token = |token: &str| {
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        hyper::Version::HTTP_10 => !has_token("keep-alive"),
        _ => has_token("close"),
    }
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
