//! The accept loop every TCP listener of the daemon runs (relay, dispatchers).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Hands each accepted connection to `serve` until `shutdown`. `what` names the
/// listener in warnings.
pub async fn accept_until(
    listener: TcpListener,
    shutdown: CancellationToken,
    what: &str,
    mut serve: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => serve(stream, peer),
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                tracing::warn!("{what}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one HTTP/1 connection of a daemon listener (dispatchers, metrics)
/// with `service`: heads must arrive within `header_timeout`; on `shutdown`
/// the request in flight finishes and the connection closes.
pub async fn serve_http1<S, B>(
    stream: TcpStream,
    service: S,
    header_timeout: Duration,
    shutdown: CancellationToken,
    what: &str,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("{what} connection: {e}");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
