//! The client's side: hyper serving one redirected connection, its heads charged
//! to the head budget, its last response corked with the FIN.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::header::CONNECTION;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::budget::{HeadCharge, CHARGED_READ, HEAD_LIMIT};
use super::pipeline::handle_request;
use super::refused::Refused;
use super::respond::SMALL_BODY;
use super::sniff::Prefixed;
use super::{record, Connection, RelayContext};
use crate::headers::{is_last_request, CLOSE};
use crate::logs::Proto;
use crate::relay::sandbox_entry;

/// A client connection that sends no complete request head for this long,
/// idle between requests or dribbling one, is closed (nginx's keepalive_timeout
/// by default): an abandoned connection does not hold its tenant's quota.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

pub async fn serve(
    stream: Prefixed<TcpStream>,
    conn: Connection,
    ctx: Arc<RelayContext>,
    charge: HeadCharge,
) {
    let conn = Arc::new(conn);
    let started = Instant::now();
    let shutdown = ctx.shutdown.clone();
    let socket = ClientSocket::new(stream, charge);
    let mode = socket.mode.clone();
    let heads = socket.mode.clone();
    let (service_conn, service_ctx) = (conn.clone(), ctx.clone());
    let service = service_fn(move |req: Request<Incoming>| {
        let (conn, ctx, mode) = (service_conn.clone(), service_ctx.clone(), mode.clone());
        async move {
            // The head is read whole: what it held is given back to the budget.
            mode.heads.fetch_add(1, Ordering::Relaxed);
            mode.in_request.store(true, Ordering::Relaxed);
            // Only without a request body: closing a socket with unread input
            // resets the connection, and drops what is still corked with it.
            let last = is_last_request(req.version(), req.headers()) && req.body().is_end_stream();
            let mut response = handle_request(req, &conn, &ctx).await;
            mode.in_request.store(false, Ordering::Relaxed);
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // A tunnel now: its end must reach the client as a FIN.
                mode.upgraded.store(true, Ordering::Relaxed);
                return Ok(response);
            }
            let small = response
                .body()
                .size_hint()
                .exact()
                .is_some_and(|n| n <= SMALL_BODY);
            if last && small {
                // The response and the FIN leave in one segment: one trip through
                // the client's receive path instead of two.
                response.headers_mut().insert(CONNECTION, CLOSE);
                mode.cork.store(true, Ordering::Relaxed);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let http = http1::Builder::new()
        .preserve_header_case(true)
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_IDLE_TIMEOUT)
        // A bigger head gets 431; the buffer that holds it is no bigger.
        .max_header_size(HEAD_LIMIT)
        .max_buf_size(HEAD_LIMIT)
        .serve_connection(TokioIo::new(socket), service)
        .with_upgrades();
    tokio::pin!(http);
    let result = tokio::select! {
        result = &mut http => result,
        () = shutdown.cancelled() => {
            http.as_mut().graceful_shutdown();
            http.await
        }
    };
    // Before any request was read, the connection was taken as HTTP for what it
    // could still become: a head cut short or never finished is logged too.
    let first = heads.heads.load(Ordering::Relaxed) == 0;
    let refused = match result {
        // A request the HTTP server could not read (HTTP/2 with prior knowledge
        // among them) never reached the service: logged here, or not at all.
        Err(e) if e.is_parse_too_large() => Refused::HeadTooLarge,
        Err(e) if e.is_parse() => Refused::Unreadable(e.to_string()),
        Err(e) if first && (e.is_incomplete_message() || e.is_timeout()) => {
            Refused::Unfinished(e.to_string())
        }
        Err(e) => return tracing::debug!("relay http connection: {e}"),
        Ok(()) => return,
    };
    let mut entry = sandbox_entry(&conn.sandbox, Proto::Http, conn.dst_text.clone(), conn.pid);
    refused.log_into(&mut entry);
    record(&ctx, &conn, entry, started);
}

/// The client connection as hyper drives it.
///
/// hyper shuts the write side down before it lets go of a connection, and the
/// socket is closed right after, which sends the FIN anyway: skipping the
/// shutdown saves a syscall per connection. Not so once it is a tunnel
/// (`upgraded`), whose end may come from the upstream while the client still has
/// the socket open.
///
/// A connection's last response is written corked (`cork`): it stays in the
/// socket until the close, which sends it with the FIN. Nothing waits on that:
/// the close follows the write at once (hyper closes after a response marked
/// `Connection: close`), and the kernel uncorks after 200 ms in any case.
///
/// Until a request head is read whole, the bytes read are charged to the
/// connection's [`HeadCharge`] (a read waits while the budget is spent), and
/// given back once the service has the request.
struct ClientSocket {
    io: Prefixed<TcpStream>,
    mode: Arc<SocketMode>,
    charge: HeadCharge,
    /// `mode.heads` when the charge was last given back.
    heads_seen: u64,
}

/// Set by the service for the response it returns.
#[derive(Default)]
struct SocketMode {
    cork: AtomicBool,
    upgraded: AtomicBool,
    /// Request heads read whole.
    heads: AtomicU64,
    /// The service has a request: what is read now is its body, not a head.
    in_request: AtomicBool,
}

impl ClientSocket {
    fn new(io: Prefixed<TcpStream>, charge: HeadCharge) -> Self {
        ClientSocket {
            io,
            mode: Arc::default(),
            charge,
            heads_seen: 0,
        }
    }

    fn cork_if_last(&self) {
        if self.mode.cork.swap(false, Ordering::Relaxed) {
            if let Err(e) = SockRef::from(self.io.get_ref()).set_tcp_cork(true) {
                tracing::debug!("corking the last response: {e}");
            }
        }
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let heads = this.mode.heads.load(Ordering::Relaxed);
        if heads != this.heads_seen {
            this.heads_seen = heads;
            this.charge.release();
        }
        let in_head = !this.mode.in_request.load(Ordering::Relaxed)
            && !this.mode.upgraded.load(Ordering::Relaxed);
        if !in_head {
            this.charge.release();
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        ready!(this.charge.poll_settle(cx));
        let before = buf.filled().len();
        if buf.remaining() > CHARGED_READ {
            let mut limited = buf.take(CHARGED_READ);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            // SAFETY: `limited` is `buf`'s unfilled part, and `n` of its bytes
            // were just filled.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
        } else {
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        }
        this.charge.add(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_last();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mode.upgraded.load(Ordering::Relaxed) {
            return Pin::new(&mut self.io).poll_shutdown(cx);
        }
        // Buffered bytes still go out; only the shutdown(2) itself is skipped.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_last();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
