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
