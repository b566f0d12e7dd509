//! Upstream HTTP(S) servers on loopback addresses that record what reached them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    connections: Arc<Mutex<usize>>,
}

impl Upstream {
    /// An HTTP server on `addr` (e.g. `127.0.0.2:0`), answering
    /// `200 hello from <addr> <path>` to everything (`?size=N`: N bytes of `x`;
    /// `?wait=MS`: the same, MS milliseconds later),
    /// and switching to an echo for `Upgrade: websocket` that closes after echoing
    /// `bye` (`?switch`: a bare `101`).
    pub fn start(addr: &str) -> Upstream {
        Self::start_inner(addr, None)
    }

    /// The same over TLS, with a self-signed certificate for `names`; returns the
    /// certificate's PEM too.
    pub fn start_tls(addr: &str, names: &[&str]) -> (Upstream, String) {
        let cert = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let pem = cert.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        (
            Self::start_inner(
                addr,
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            ),
            pem,
        )
    }

    fn start_inner(addr: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (sink, count) = (requests.clone(), connections.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    *count.lock().unwrap() += 1;
                    let sink = sink.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                // `Upgrade: websocket`: switches, then echoes
                                // every byte back behind `echo:`.
                                let websocket =
                                    req.headers().get(hyper::header::UPGRADE).is_some_and(|v| {
                                        v.as_bytes().eq_ignore_ascii_case(b"websocket")
                                    });
                                let upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
                                // `?switch`: a `101` nobody asked for.
                                if req.uri().query() == Some("switch") {
                                    let mut switching = Response::new(Full::new(Bytes::new()));
                                    *switching.status_mut() =
                                        hyper::StatusCode::SWITCHING_PROTOCOLS;
                                    return Ok(switching);
                                }
                                // `?wait=MS`: answers that much later.
                                if let Some(ms) = req
                                    .uri()
                                    .query()
                                    .and_then(|q| q.strip_prefix("wait="))
                                    .and_then(|n| n.parse::<u64>().ok())
                                {
                                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                                }
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let path = parts.uri.path().to_string();
                                sink.lock().unwrap().push(RecordedRequest {
                                    method: parts.method.to_string(),
                                    uri: parts.uri.to_string(),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(k, v)| {
                                            (k.to_string(), v.to_str().unwrap_or("").to_string())
                                        })
                                        .collect(),
                                    body: body.to_vec(),
                                });
                                if let Some(upgrade) = upgrade {
                                    tokio::spawn(async move {
                                        let Ok(upgraded) = upgrade.await else { return };
                                        let mut io = TokioIo::new(upgraded);
                                        let mut buf = [0u8; 1024];
                                        loop {
                                            match io.read(&mut buf).await {
                                                Ok(0) | Err(_) => return,
                                                Ok(n) => {
                                                    let mut echo = b"echo:".to_vec();
                                                    echo.extend_from_slice(&buf[..n]);
                                                    if io.write_all(&echo).await.is_err() {
                                                        return;
                                                    }
                                                    // `bye`: the upstream closes first.
                                                    if &buf[..n] == b"bye" {
                                                        return;
                                                    }
                                                }
                                            }
                                        }
                                    });
                                    let mut switching = Response::new(Full::new(Bytes::new()));
                                    *switching.status_mut() =
                                        hyper::StatusCode::SWITCHING_PROTOCOLS;
                                    switching.headers_mut().insert(
                                        hyper::header::CONNECTION,
                                        hyper::header::HeaderValue::from_static("upgrade"),
                                    );
                                    switching.headers_mut().insert(
                                        hyper::header::UPGRADE,
                                        hyper::header::HeaderValue::from_static("websocket"),
                                    );
                                    return Ok::<_, Infallible>(switching);
                                }
                                // `?size=N` asks for a body of N bytes instead.
                                let text = match parts
                                    .uri
                                    .query()
                                    .and_then(|q| q.strip_prefix("size="))
                                    .and_then(|n| n.parse::<usize>().ok())
                                {
                                    Some(n) => "x".repeat(n),
                                    None => format!("hello from {addr} {path}"),
                                };
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                            }
                        });
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), service)
                                        .with_upgrades()
                                        .await;
                                }
                            }
                            None => {
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                    });
                }
            });
        });
        Upstream {
            addr,
            requests,
            connections,
        }
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted so far (TLS handshakes included, completed or not).
    pub fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}
