//! From an incoming request to a Worker name, and the request the Worker gets.

use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Uri};

use crate::config::is_valid_name;
use crate::headers::strip_hop_by_hop;
use crate::policy::Host;

/// Headers starting with this are the interceptor's own: a client never sets them.
pub const RESERVED_PREFIX: &str = "x-interceptor-";

/// The authority a request names: the absolute-form URI's, else the Host header.
pub fn authority<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers()
        .get(HOST)?
        .to_str()
        .ok()?
        .parse::<Authority>()
        .ok()
}

/// The Worker a host names: its first label, lower case, when the host is a
/// name with at least two labels and the label is a valid Worker name
/// (`[A-Za-z0-9_-]`, not starting with `-`). IP literals name no Worker.
pub fn worker_name(authority: &Authority) -> Option<String> {
    match Host::parse(authority.as_str())? {
        Host::Ip(_) => None,
        Host::Name(name) => {
            let (first, rest) = name.split_once('.')?;
            if rest.is_empty() || !is_valid_name(first) {
                return None;
            }
            Some(first.to_ascii_lowercase())
        }
    }
}

/// The incoming request's full URL, `http://<authority><path?query>`; `None`
/// for a request target that is no URL path (e.g. `*`).
pub fn full_url(authority: &Authority, uri: &Uri) -> Option<Uri> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if !path.starts_with('/') {
        return None;
    }
    Uri::builder()
        .scheme(uri.scheme().cloned().unwrap_or(Scheme::HTTP))
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .ok()
}

/// Removes hop-by-hop headers (and those `Connection` names), `Host` (HTTP/2
/// carries it as `:authority`) and every `x-interceptor-*` header.
pub fn strip_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(HOST);
    let reserved: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(RESERVED_PREFIX))
        .cloned()
        .collect();
    for name in reserved {
        headers.remove(name);
    }
}

/// The signed context as a header value (a JWT is always a valid value).
pub fn context_value(token: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(token).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(host: &str) -> Option<String> {
        worker_name(&host.parse().ok()?)
    }

    #[test]
    fn the_first_label_names_the_worker() {
        assert_eq!(name("hello.example.com").as_deref(), Some("hello"));
        assert_eq!(name("hello.example.com:8080").as_deref(), Some("hello"));
        assert_eq!(name("Hello.Example.COM.").as_deref(), Some("hello"));
        assert_eq!(name("my_worker-2.test").as_deref(), Some("my_worker-2"));
        assert_eq!(name("localhost"), None);
        assert_eq!(name("localhost:8080"), None);
        assert_eq!(name("127.0.0.1:8080"), None);
        assert_eq!(name("[::1]:8080"), None);
        assert_eq!(name("-bad.example.com"), None);
        assert_eq!(name("a%2e.example.com"), None);
        assert_eq!(name("a+b.example.com"), None);
    }

    #[test]
    fn the_full_url_keeps_host_port_path_and_query() {
        let a: Authority = "hello.example.com:8080".parse().unwrap();
        let u: Uri = "/x/y?z=1".parse().unwrap();
        assert_eq!(
            full_url(&a, &u).unwrap().to_string(),
            "http://hello.example.com:8080/x/y?z=1"
        );
        let u: Uri = "*".parse().unwrap();
        assert_eq!(full_url(&a, &u), None);
    }

    #[test]
    fn reserved_and_hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("host", "a.b".parse().unwrap());
        h.insert("connection", "keep-alive, x-foo".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("x-interceptor-context", "forged".parse().unwrap());
        h.insert("X-Interceptor-Other", "forged".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }
}
