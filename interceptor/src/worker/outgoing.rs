//! The guest's outgoing requests (`wasi:http/outgoing-handler`).
//!
//! Every request gets the incoming request's context token
//! ([`CONTEXT_HEADER`], replacing whatever the guest set) and goes out as plain
//! HTTP/1.1 — never TLS, `https://` included: the relay originates TLS after the
//! outbound Worker has seen the request (SPEC §8) — in absolute-form
//! (`GET https://api.example.com/x HTTP/1.1`, `Host: api.example.com`), so the
//! relay knows the scheme. It is sent to the URI's host when that is an IP
//! literal (port: the URI's, else 80/443 by scheme), else to the relay; the
//! kernel redirects either to the relay, which judges by the Host and URI.
//!
//! Connections are kept alive in a small pool per address: a subrequest
//! usually costs one round trip, not a connect.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::HeaderValue;
use hyper::http::uri::Scheme;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Sleep;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::CONTEXT_HEADER;

/// Idle connections kept per address.
const MAX_IDLE_PER_ADDR: usize = 32;
/// An idle connection older than this is not reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeouts when the guest sets none (what wasmtime's own client uses).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type SendFuture = Box<dyn Future<Output = Result<(Response<WasiBody>, IoFuture), Error>> + Send>;

/// The `wasi:http` hooks of one request: its token and the shared pool.
pub(super) struct Outgoing {
    outbound: Arc<Outbound>,
    token: Option<HeaderValue>,
}

impl Outgoing {
    pub(super) fn new(outbound: Arc<Outbound>, token: Option<HeaderValue>) -> Self {
        Outgoing { outbound, token }
    }
}

impl WasiHttpHooks for Outgoing {
    fn send_request(
        &mut self,
        request: Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> SendFuture {
        let outbound = self.outbound.clone();
        let token = self.token.clone();
        Box::new(async move {
            let response = outbound.send(request, token, options).await?;
            // The connection is driven by a task of its own (see `connect`).
            Ok((response, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

/// Where outgoing requests go, and the kept-alive connections there.
pub(super) struct Outbound {
    relay: SocketAddr,
    idle: Mutex<HashMap<SocketAddr, Vec<IdleConn>>>,
}

struct IdleConn {
    sender: SendRequest<WasiBody>,
    since: Instant,
}

impl Outbound {
    pub(super) fn new(relay: SocketAddr) -> Self {
        Outbound {
            relay,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// The address to dial for `uri`: its host when that is an IP literal,
    /// else the relay.
    pub(super) fn connect_addr(&self, uri: &hyper::Uri) -> Result<SocketAddr, Error> {
        let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?;
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(ip) => {
                let https = uri.scheme() == Some(&Scheme::HTTPS);
                let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
                Ok(SocketAddr::new(ip, port))
            }
            Err(_) => Ok(self.relay),
        }
    }

    async fn send(
        self: Arc<Self>,
        mut request: Request<WasiBody>,
        token: Option<HeaderValue>,
        options: Option<RequestOptions>,
    ) -> Result<Response<WasiBody>, Error> {
        if request.uri().authority().is_none() {
            return Err(Error::HttpRequestUriInvalid);
        }
        let addr = self.connect_addr(request.uri())?;
        let headers = request.headers_mut();
        headers.remove(CONTEXT_HEADER);
        if let Some(token) = token {
            headers.insert(CONTEXT_HEADER, token);
        }
        // The URI stays absolute: hyper writes it as it is, which is the
        // absolute-form the relay reads the scheme from.

        let options = options.unwrap_or_default();
        let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_TIMEOUT);
        let first_byte_timeout = options.first_byte_timeout.unwrap_or(DEFAULT_TIMEOUT);
        let between_bytes_timeout = options
            .between_bytes_timeout
            .unwrap_or(DEFAULT_TIMEOUT)
            .max(Duration::from_nanos(1));

        let deadline = tokio::time::Instant::now() + first_byte_timeout;
        let mut request = request;
        loop {
            let (mut sender, reused) = match self.checkout(addr) {
                Some(sender) => (sender, true),
                None => (connect(addr, connect_timeout).await?, false),
            };
            let sent = tokio::time::timeout_at(deadline, sender.try_send_request(request)).await;
            match sent {
                Err(_) => return Err(Error::ConnectionReadTimeout),
                Ok(Ok(response)) => {
                    let (parts, incoming) = response.into_parts();
                    let body = ResponseBody {
                        incoming,
                        sleep: Box::pin(tokio::time::sleep(between_bytes_timeout)),
                        timeout: between_bytes_timeout,
                        release: Some((self.clone(), addr, sender)),
                    };
                    return Ok(Response::from_parts(parts, body.boxed_unsync()));
                }
                Ok(Err(mut e)) => {
                    // A kept-alive connection the other side closed meanwhile:
                    // the request was not sent, so it can go on a new one.
                    if reused {
                        if let Some(unsent) = e.take_message() {
                            request = unsent;
                            continue;
                        }
                    }
                    let e = e.into_error();
                    return Err(if e.is_timeout() {
                        Error::HttpResponseTimeout
                    } else {
                        Error::Hyper(e)
                    });
                }
            }
        }
    }

    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<WasiBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < IDLE_TIMEOUT && conn.sender.is_ready() {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Keeps `sender` for the next request once its connection is idle (the
    /// response just read to its end).
    fn checkin(self: Arc<Self>, addr: SocketAddr, mut sender: SendRequest<WasiBody>) {
        if sender.is_closed() {
            return;
        }
        let keep = move |sender: SendRequest<WasiBody>| {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let list = idle.entry(addr).or_default();
            list.retain(|c| !c.sender.is_closed());
            if list.len() < MAX_IDLE_PER_ADDR {
                list.push(IdleConn {
                    sender,
                    since: Instant::now(),
                });
            }
        };
        if sender.is_ready() {
            keep(sender);
        } else if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // The connection task has not yet seen the end of the response.
            handle.spawn(async move {
                if tokio::time::timeout(Duration::from_secs(5), sender.ready())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    keep(sender);
                }
            });
        }
    }
}

/// A new HTTP/1.1 connection to `addr`, driven by a task of its own.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<WasiBody>, Error> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(stream) => stream.map_err(Error::Connect)?,
        Err(_) => return Err(Error::ConnectionTimeout),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = tokio::time::timeout(
        timeout,
        http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)?
    .map_err(Error::Hyper)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, "outgoing connection: {e}");
        }
    });
    Ok(sender)
}

/// The response body handed to the guest: the between-bytes timeout, and the
/// connection back to the pool once the body has been read to its end.
struct ResponseBody {
    incoming: Incoming,
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
    release: Option<(Arc<Outbound>, SocketAddr, SendRequest<WasiBody>)>,
}

impl ResponseBody {
    fn release(&mut self) {
        if let Some((outbound, addr, sender)) = self.release.take() {
            outbound.checkin(addr, sender);
        }
    }

    fn at_end(&self) -> bool {
        self.incoming.is_end_stream()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                if this.at_end() {
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.release = None;
                Poll::Ready(Some(Err(if e.is_timeout() {
                    Error::HttpResponseTimeout
                } else {
                    Error::Hyper(e)
                })))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.release = None;
                    Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.at_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Read to its end but never polled past it (an empty body, say): the
        // connection is still good.
        if self.at_end() {
            self.release();
        }
    }
}
