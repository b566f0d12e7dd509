//! The upstream's answer, sent back: a small body already here goes out with its
//! log line written first; a larger one is streamed and logged at its end; a
//! WebSocket becomes a tunnel.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::upgrade::OnUpgrade;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::body::Metered;
use super::pipeline::{Forwarded, Subrequest};
use super::stream::ReadCounter;
use super::{copy_until_stopped, Connection, RelayContext};
use crate::headers::{restore_websocket_upgrade, strip_hop_by_hop};
use crate::logs::{LogEntry, Verdict};

pub(super) type RelayBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// What the upstream answered, on its way to the client; logged once it is
/// known how much of it crossed.
pub(super) async fn relayed(
    ctx: &RelayContext,
    conn: &Arc<Connection>,
    sub: Subrequest,
    forwarded: Forwarded,
    started: Instant,
) -> Response<RelayBody> {
    let Subrequest { mut entry, sent } = sub;
    let Forwarded {
        response,
        client_upgrade,
    } = forwarded;
    if let Some(client) = client_upgrade {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return switch_to_websocket(ctx, conn, entry, response, client, sent, started);
        }
    }
    let (mut parts, mut body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    entry.status = Some(parts.status.as_u16());
    let log = conn.log_enabled();
    let body = match take_if_arrived(&mut body) {
        // The common small response, already read whole with its head: its line
        // joins this thread's next batched log write, and the response goes out,
        // head and body in one write, once the line is in the file.
        Arrived::Whole(whole) => {
            entry.finished(sent.load(Ordering::Relaxed), whole.len() as u64, started);
            if let Some(logged) = ctx.recorder.record_batched(&entry, log) {
                logged.await;
            }
            return Response::from_parts(parts, full(whole));
        }
        Arrived::Started(first) => Replay::new(first, body).boxed_unsync(),
        Arrived::Nothing => body.boxed_unsync(),
    };
    let recorder = ctx.recorder.clone();
    let on_end = Box::new(move |received: u64| {
        entry.finished(sent.load(Ordering::Relaxed), received, started);
        recorder.record(&entry, log);
    });
    let body = Metered::new(body, Arc::new(AtomicU64::new(0)), Some(on_end));
    Response::from_parts(parts, body.boxed_unsync())
}

/// The upstream agreed to a WebSocket: the client gets the `101`; once both sides
/// have switched, bytes are copied both ways until either closes, and the request
/// is logged then with what crossed the tunnel (like TLS and TCP streams).
fn switch_to_websocket(
    ctx: &RelayContext,
    conn: &Arc<Connection>,
    mut entry: LogEntry,
    mut response: Response<Incoming>,
    client: OnUpgrade,
    sent: Arc<AtomicU64>,
    started: Instant,
) -> Response<RelayBody> {
    let upstream = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    restore_websocket_upgrade(&mut parts.headers);
    entry.status = Some(StatusCode::SWITCHING_PROTOCOLS.as_u16());
    let (recorder, log, shutdown) = (
        ctx.recorder.clone(),
        conn.log_enabled(),
        ctx.shutdown.clone(),
    );
    // The tunnel counts as the tenant's connection until it ends.
    let conn = conn.clone();
    ctx.tasks.spawn(async move {
        let _conn = conn;
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let mut client = ReadCounter::new(TokioIo::new(client));
                let mut upstream = ReadCounter::new(TokioIo::new(upstream));
                if let Err(e) = copy_until_stopped(&mut client, &mut upstream, &shutdown).await {
                    entry.error = Some(e.to_string());
                }
                let request_body = sent.load(Ordering::Relaxed);
                entry.finished(request_body + client.count, upstream.count, started);
            }
            Err(e) => {
                entry.decision = Verdict::Error;
                entry.rule = "upgrade".to_string();
                entry.error = Some(e.to_string());
                entry.finished(sent.load(Ordering::Relaxed), 0, started);
            }
        }
        recorder.record(&entry, log);
    });
    Response::from_parts(parts, full(Bytes::new()))
}

/// Bodies up to this size are taken whole when they arrived with the head.
pub(super) const SMALL_BODY: u64 = 64 * 1024;

/// What [`take_if_arrived`] found.
enum Arrived {
    /// The whole body, of known length up to [`SMALL_BODY`], already read.
    Whole(Bytes),
    /// Not whole: the first frame (or error), which was taken and must be replayed.
    Started(Result<Frame<Bytes>, hyper::Error>),
    /// Nothing taken.
    Nothing,
}

/// Takes a small body that is already here in one frame, without waiting.
fn take_if_arrived(body: &mut Incoming) -> Arrived {
    let Some(len) = body.size_hint().exact().filter(|&n| n <= SMALL_BODY) else {
        return Arrived::Nothing;
    };
    if len == 0 && body.is_end_stream() {
        return Arrived::Whole(Bytes::new());
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut *body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if data.len() as u64 == len && body.is_end_stream() => Arrived::Whole(data),
            Ok(data) => Arrived::Started(Ok(Frame::data(data))),
            Err(frame) => Arrived::Started(Ok(frame)),
        },
        Poll::Ready(Some(Err(e))) => Arrived::Started(Err(e)),
        Poll::Ready(None) | Poll::Pending => Arrived::Nothing,
    }
}

/// A body whose first frame was already taken from it.
struct Replay<B: Body> {
    first: Option<Result<Frame<Bytes>, B::Error>>,
    rest: B,
}

impl<B: Body> Replay<B> {
    fn new(first: Result<Frame<Bytes>, B::Error>, rest: B) -> Self {
        Replay {
            first: Some(first),
            rest,
        }
    }
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let first = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |b| b.len() as u64),
            _ => 0,
        };
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// A body the relay already holds whole.
pub(super) fn full(bytes: Bytes) -> RelayBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

pub(super) fn json(status: StatusCode, body: serde_json::Value) -> Response<RelayBody> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;
    use tokio::io::AsyncWriteExt;

    /// A response read by a real hyper client from a server that sends `first`,
    /// then, once the head has been parsed, `rest` (or hangs up when there is
    /// none); what `take_if_arrived` made of it, and the body a client then gets.
    async fn respond(
        first: impl Into<Vec<u8>>,
        rest: Option<&'static [u8]>,
    ) -> (&'static str, Result<Bytes, hyper::Error>) {
        let first = first.into();
        let (client, mut server) = tokio::io::duplex(4096);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut server, &mut request).await;
            server.write_all(&first).await.unwrap();
            let Some(rest) = rest else {
                return;
            };
            let _ = rx.await;
            server.write_all(rest).await.unwrap();
            let mut rest = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut server, &mut rest).await;
        });
        let request = Request::get("/").body(Full::new(Bytes::new())).unwrap();
        let mut body = sender.send_request(request).await.unwrap().into_body();
        let (kind, body) = match take_if_arrived(&mut body) {
            Arrived::Whole(whole) => (
                "whole",
                Full::new(whole).map_err(|n| match n {}).boxed_unsync(),
            ),
            Arrived::Started(first) => ("started", Replay::new(first, body).boxed_unsync()),
            Arrived::Nothing => ("nothing", body.boxed_unsync()),
        };
        let _ = tx.send(());
        (kind, body.collect().await.map(|b| b.to_bytes()))
    }

    #[tokio::test]
    async fn a_small_body_is_taken_whole_or_replayed_from_what_arrived() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
        let (kind, body) = respond(format!("{head}helloworld"), Some(b"")).await;
        assert_eq!((kind, &body.unwrap()[..]), ("whole", &b"helloworld"[..]));
        let (kind, body) = respond(format!("{head}hello"), Some(b"world")).await;
        assert_eq!((kind, &body.unwrap()[..]), ("started", &b"helloworld"[..]));
        let (kind, body) = respond(head, Some(b"helloworld")).await;
        assert_eq!((kind, &body.unwrap()[..]), ("nothing", &b"helloworld"[..]));
        // An upstream that hangs up mid-body: the client gets the error, not a
        // silently shortened body, whatever was taken first.
        for first in [format!("{head}hel"), head.to_string()] {
            let (kind, body) = respond(first, None).await;
            assert!(body.is_err(), "{kind}: {body:?}");
        }
        // Too big to be taken, even when it is all there.
        let big = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 70000\r\n\r\n{}",
            "x".repeat(70_000)
        );
        let (kind, body) = respond(big, Some(b"")).await;
        assert_eq!((kind, body.unwrap().len()), ("nothing", 70_000));
    }
}
