//! The relay's upstream HTTP connections, kept alive per (address, TLS server
//! name) and reused by one relay thread.
//!
//! TLS is what the relay originates itself: a User Worker's `https://`
//! subrequests reach the relay in the clear (absolute-form), so the outbound
//! Worker sees and changes them; the relay then speaks TLS to the upstream,
//! verifying its certificate against the system roots plus `upstream_ca`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::body::Metered;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections parked per (address, server name) and relay thread, idle or
/// still streaming a response: enough that a few hundred concurrent requests
/// reuse connections instead of opening one each (32 made 128 concurrent
/// clients cost a new upstream connection per request), few enough that an
/// idle pool stays a few MiB (about 18 KiB per connection).
const MAX_PARKED: usize = 256;
/// Connections parked per relay thread over all upstreams: requests to many
/// hosts must not pile up descriptors either. Past it, a connection is closed
/// after its response instead of parked.
const MAX_PARKED_TOTAL: usize = 4096;
/// A connection unused this long is closed: the pool shrinks back after a burst.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Body = Metered<Incoming>;
/// An upstream: its address and TLS server name (none for plain HTTP).
type PoolKey = (SocketAddr, Option<String>);

/// A connection back in the pool once its response headers arrived; it is
/// reusable when hyper says it is ready (the response body is done).
struct Parked {
    sender: SendRequest<Body>,
    /// When it was parked: a response streaming longer than [`IDLE_TIMEOUT`]
    /// loses its connection's place when it ends.
    since: Instant,
}

/// Parked connections per upstream, oldest first.
type IdlePool = HashMap<PoolKey, VecDeque<Parked>>;

#[derive(Debug, thiserror::Error)]
pub enum OriginTlsError {
    #[error("upstream_ca {path}: {source}")]
    Ca { path: PathBuf, source: io::Error },
    #[error("upstream_ca {path}: no usable certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Connections to upstreams, reused per (address, TLS server name).
pub struct UpstreamPool {
    connector: TlsConnector,
    idle: Mutex<IdlePool>,
}

impl UpstreamPool {
    pub fn new(extra_ca: &[PathBuf]) -> Result<Self, OriginTlsError> {
        let mut roots = RootCertStore::empty();
        // Unreadable system certificates are skipped; an operator's own CA files are not.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        for path in extra_ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| OriginTlsError::Ca {
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })?
                .filter_map(Result::ok)
                .collect();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(OriginTlsError::NoCertificate { path: path.clone() });
            }
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(UpstreamPool {
            connector: TlsConnector::from(Arc::new(config)),
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// Another pool with the same verification settings (one per relay thread).
    pub fn fresh_pool(&self) -> Self {
        UpstreamPool {
            connector: self.connector.clone(),
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` (origin-form) to `addr`: over TLS verified for
    /// `server_name` when there is one, else plain HTTP/1.1. A request that asks
    /// to switch protocols (`upgrade`) goes on a new connection of its own, never
    /// pooled: it may become the request's tunnel.
    pub async fn send(
        &self,
        addr: SocketAddr,
        server_name: Option<&str>,
        request: Request<Body>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, String> {
        let key: PoolKey = (addr, server_name.map(str::to_string));
        let idle = if upgrade { None } else { self.take_idle(&key) };
        let (mut sender, pooled) = match idle {
            Some(sender) => (sender, true),
            None => (
                Box::pin(self.connect(addr, server_name, upgrade)).await?,
                false,
            ),
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut failed) => match failed.take_message() {
                // The upstream closed an idle connection just as it was reused:
                // the request never left, so it goes again on a new connection.
                Some(request) if pooled => {
                    sender = Box::pin(self.connect(addr, server_name, false)).await?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(|e| format!("upstream: {e}"))?
                }
                _ => return Err(format!("upstream: {}", failed.error())),
            },
        };
        // The connection is reusable once the response body is done; hyper tells us
        // through readiness, so park it and let `take_idle` check.
        if !upgrade {
            self.park(key, sender);
        }
        Ok(response)
    }

    /// The most recently parked ready connection: the busiest connections stay
    /// in use and the rest age out. Busy ones (a response body still streaming)
    /// are left where they are.
    fn take_idle(&self, key: &PoolKey) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let parked = idle.get_mut(key)?;
        let mut i = parked.len();
        while i > 0 {
            i -= 1;
            if parked[i].sender.is_closed() {
                parked.remove(i);
            } else if parked[i].sender.is_ready() {
                return parked.remove(i).map(|p| p.sender);
            }
        }
        None
    }

    fn park(&self, key: PoolKey, sender: SendRequest<Body>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.values().map(VecDeque::len).sum::<usize>() >= MAX_PARKED_TOTAL {
            return;
        }
        let parked = idle.entry(key).or_default();
        if parked.len() >= MAX_PARKED {
            parked.retain(|p| !p.sender.is_closed());
            if parked.len() >= MAX_PARKED {
                parked.pop_front();
            }
        }
        parked.push_back(Parked { sender, since: now });
        expire(parked, now);
    }

    /// Closes the connections unused for [`IDLE_TIMEOUT`] and forgets upstreams
    /// left without any: run now and then, so a pool that has gone quiet lets go
    /// of its connections too.
    pub fn expire_idle(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, parked| {
            parked.retain(|p| !p.sender.is_closed());
            expire(parked, now);
            !parked.is_empty()
        });
    }

    /// Boxed by its callers: a TLS handshake's state is kilobytes, and keeping it
    /// inline would make every request's future (moved and allocated per
    /// request and per connection) that large, though most requests reuse a
    /// pooled connection.
    async fn connect(
        &self,
        addr: SocketAddr,
        server_name: Option<&str>,
        upgrades: bool,
    ) -> Result<SendRequest<Body>, String> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "upstream: connect timed out".to_string())?
            .map_err(|e| format!("upstream: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let Some(server_name) = server_name else {
            return handshake(tcp, upgrades).await;
        };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| format!("{server_name:?} is not a valid TLS server name"))?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("upstream TLS: {e}"))?;
        handshake(tls, upgrades).await
    }
}

/// Drops the oldest connections parked longer than [`IDLE_TIMEOUT`] (dropping a
/// sender closes its connection once any response on it is done).
fn expire(parked: &mut VecDeque<Parked>, now: Instant) {
    while parked
        .front()
        .is_some_and(|p| now.duration_since(p.since) > IDLE_TIMEOUT)
    {
        parked.pop_front();
    }
}

/// `upgrades`: the connection may be handed over after a `101` response.
async fn handshake<S>(io: S, upgrades: bool) -> Result<SendRequest<Body>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("upstream: {e}"))?;
    tokio::spawn(async move {
        let ended = if upgrades {
            connection.with_upgrades().await
        } else {
            connection.await
        };
        if let Err(e) = ended {
            tracing::debug!("upstream connection: {e}");
        }
    });
    Ok(sender)
}
