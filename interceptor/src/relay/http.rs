//! HTTP/1.x: each request on a kept-alive connection is judged on its own by its
//! host, gets the outbound Worker's injections, and is sent on through a pool of
//! upstream connections; a blocked one gets a 403 and never reaches upstream.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::body::Metered;
use super::budget::{HeadCharge, CHARGED_READ, HEAD_LIMIT};
use super::sniff::Prefixed;
use super::stream::ReadCounter;
use super::upstream::{self, Refusal};
use super::{copy_until_stopped, Connection, RelayContext};
use crate::context::{RequestContext, CONTEXT_HEADER};
use crate::headers::{
    is_last_request, is_websocket_upgrade, restore_websocket_upgrade, strip_hop_by_hop, CLOSE,
};
use crate::logs::{LogEntry, Proto, Verdict};
use crate::policy::{Action, Decision};
use crate::resolve::normalize_host;

type RelayBody = UnsyncBoxBody<Bytes, hyper::Error>;

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
    match result {
        // A request the HTTP server could not read (HTTP/2 with prior knowledge
        // among them) never reached the service: logged here, or not at all.
        Err(e) if e.is_parse_too_large() => {
            let refused = Decision::block("limit:head");
            let mut entry = conn.entry(Proto::Http, &refused, Verdict::Block);
            entry.status = Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.as_u16());
            entry.error = Some(format!("request head over {HEAD_LIMIT} bytes"));
            finish(&ctx, &conn, entry, started);
        }
        Err(e) if e.is_parse() || (first && (e.is_incomplete_message() || e.is_timeout())) => {
            let refused = Decision::block("bad-request");
            let mut entry = conn.entry(Proto::Http, &refused, Verdict::Error);
            if e.is_parse() {
                entry.status = Some(StatusCode::BAD_REQUEST.as_u16());
            }
            entry.error = Some(e.to_string());
            finish(&ctx, &conn, entry, started);
        }
        Err(e) => tracing::debug!("relay http connection: {e}"),
        Ok(()) => {}
    }
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

/// The host a request is judged by, and where it goes.
struct RequestTarget {
    /// Normalised: lower case, no trailing dot, no brackets.
    host: String,
    port: u16,
    /// As sent on: `host[:port]`.
    authority: Authority,
    /// An absolute-form `https://` request: the relay originates the TLS.
    tls: bool,
    url: String,
}

impl RequestTarget {
    /// The absolute-form URI wins over the Host header (RFC 9112 §3.2.2). Without a
    /// port in either, the port is the one the sandbox dialled (SPEC §5); only a
    /// request sent to the relay's own address (a Worker's subrequest) has no dialled
    /// port to go by, and defaults by scheme.
    fn of<B>(
        req: &Request<B>,
        dialled: SocketAddr,
        dialled_relay: bool,
    ) -> Result<Self, &'static str> {
        let tls = match req.uri().scheme_str() {
            None | Some("http") => false,
            Some("https") => true,
            Some(_) => return Err("unsupported scheme in the request target"),
        };
        let default_port = match (dialled_relay && req.uri().authority().is_some(), tls) {
            (false, _) => dialled.port(),
            (true, false) => 80,
            (true, true) => 443,
        };
        let authority = match req.uri().authority() {
            Some(a) => a.clone(),
            None => match req.headers().get(HOST) {
                Some(host) => {
                    let host = host.to_str().map_err(|_| "Host header is not ASCII")?;
                    Authority::from_str(host).map_err(|_| "malformed Host header")?
                }
                // HTTP/1.0 may omit Host: the dialled address is all there is.
                None if req.version() == Version::HTTP_10 => {
                    let ip = dialled.ip().to_canonical();
                    let literal = match ip {
                        IpAddr::V4(v4) => v4.to_string(),
                        IpAddr::V6(v6) => format!("[{v6}]"),
                    };
                    Authority::from_str(&literal).map_err(|_| "no usable host")?
                }
                None => return Err("request without a Host header"),
            },
        };
        if authority.as_str().contains('@') {
            return Err("userinfo in the request target");
        }
        let host = normalize_host(authority.host());
        if host.is_empty() {
            return Err("empty host");
        }
        // Read from the text: `Authority` drops a port it cannot parse.
        let port_text = authority
            .as_str()
            .strip_prefix(authority.host())
            .and_then(|rest| rest.strip_prefix(':'));
        // An empty port is the default one (RFC 3986 §3.2.3); otherwise digits only.
        let port = match port_text {
            None | Some("") => default_port,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err("invalid port"),
            },
        };
        let path = req
            .uri()
            .path_and_query()
            .map(PathAndQuery::as_str)
            .unwrap_or("/");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{authority}{path}");
        Ok(RequestTarget {
            host,
            port,
            authority,
            tls,
            url,
        })
    }
}

async fn handle_request(
    mut req: Request<Incoming>,
    conn: &Arc<Connection>,
    ctx: &RelayContext,
) -> Response<RelayBody> {
    let started = Instant::now();
    let method = req.method().to_string();
    let target = match RequestTarget::of(&req, conn.dst, conn.dialled_relay) {
        Ok(target) => target,
        Err(why) => {
            let decision = Decision {
                action: Action::Block,
                rule: "bad-request".to_string(),
            };
            let mut entry = conn.entry(Proto::Http, &decision, Verdict::Error);
            entry.method = Some(method);
            entry.status = Some(400);
            entry.error = Some(why.to_string());
            finish(ctx, conn, entry, started);
            return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": why }));
        }
    };
    if req.method() == Method::CONNECT {
        // Connections are intercepted without a proxy setting; a tunnel would
        // carry requests the relay could no longer judge one by one.
        let refused = Decision::block("connect");
        let mut entry = conn.entry(Proto::Http, &refused, Verdict::Block);
        entry.method = Some(method);
        entry.host = Some(target.host.clone());
        entry.status = Some(405);
        finish(ctx, conn, entry, started);
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({
                "error": "CONNECT is not supported: connections are intercepted as they are, no proxy setting is needed",
                "host": target.host,
                "rule": "connect",
            }),
        );
    }
    let policy = &conn.sandbox.tenant.policy;
    let context = request_context(&req, conn, ctx);
    // A dispatched Worker's request brings its own parameters.
    let context_params = match &context {
        Ok(Some(context)) => Some(&context.params),
        _ => None,
    };
    let params = context_params.unwrap_or(&conn.sandbox.params);
    let new_entry = |decision: &Decision, verdict: Verdict| {
        let mut entry = conn.entry(Proto::Http, decision, verdict);
        entry.method = Some(method.clone());
        entry.url = Some(target.url.clone());
        entry.host = Some(target.host.clone());
        if let Some(params) = context_params {
            entry.params = params.clone();
        }
        entry
    };
    let refuse = |rule: &str| {
        let refused = Decision {
            action: Action::Block,
            rule: rule.to_string(),
        };
        blocked(
            ctx,
            conn,
            new_entry(&refused, Verdict::Block),
            started,
            &target,
        )
    };

    let context = match &context {
        Ok(context) => context.as_ref(),
        Err(rule) => return refuse(rule),
    };
    if let Some(context) = context {
        if let Some(limit) = context.subrequest_limit {
            if ctx.subrequests.count(context.request_id) > limit {
                return refuse("limit:subrequests");
            }
        }
    }

    let decision = policy.decide_host(&target.host);
    if decision.action == Action::Block {
        return refuse(&decision.rule);
    }

    let mut injected = Vec::new();
    for injection in policy.injections_for(&target.host) {
        match injection.render(params, SystemTime::now()) {
            Ok(header) => injected.push(header),
            Err(e) => {
                // Never send a half-filled credential: the request stops here.
                let failed = Decision {
                    action: Action::Block,
                    rule: format!("inject:{}", injection.header()),
                };
                let mut entry = new_entry(&failed, Verdict::Error);
                entry.status = Some(502);
                entry.error = Some(e.to_string());
                finish(ctx, conn, entry, started);
                return json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({ "error": e.to_string(), "host": target.host }),
                );
            }
        }
    }

    let upstream = match upstream::choose(
        &ctx.resolver,
        policy,
        &ctx.local,
        &target.host,
        target.port,
    )
    .await
    {
        Ok(addr) => addr,
        Err(Refusal::Blocked(refused)) => return refuse(&refused.rule),
        Err(Refusal::Unresolvable(why)) => {
            let failed = Decision {
                action: Action::Block,
                rule: "resolve".to_string(),
            };
            let why = format!("cannot resolve: {why}");
            let mut entry = new_entry(&failed, Verdict::Error);
            entry.status = Some(502);
            entry.error = Some(why.clone());
            finish(ctx, conn, entry, started);
            return json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({ "error": why, "host": target.host }),
            );
        }
    };

    // Taken before the request is passed on: the client's side of a WebSocket,
    // once the upstream agrees to switch.
    let client_upgrade =
        is_websocket_upgrade(req.version(), req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if client_upgrade.is_some() {
        restore_websocket_upgrade(&mut parts.headers);
    }
    parts.headers.remove(CONTEXT_HEADER);
    parts.headers.insert(
        HOST,
        HeaderValue::from_str(target.authority.as_str()).expect("authority is a valid header"),
    );
    for (name, value) in injected {
        parts.headers.insert(name, value);
    }
    let path = parts
        .uri
        .path_and_query()
        .map(PathAndQuery::as_str)
        .unwrap_or("/");
    parts.uri = match Uri::from_str(path) {
        Ok(uri) => uri,
        Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": "bad path" }),
            )
        }
    };
    parts.version = Version::HTTP_11;
    let sent = Arc::new(AtomicU64::new(0));
    let upstream_req = Request::from_parts(parts, Metered::new(body, sent.clone(), None));

    let mut entry = new_entry(&decision, Verdict::Allow);
    entry.upstream = Some(upstream.to_string());
    let server_name = target.tls.then_some(target.host.as_str());
    let sent_on = ctx
        .upstream
        .send(
            upstream,
            server_name,
            upstream_req,
            client_upgrade.is_some(),
        )
        .await
        .and_then(|response| match response.status() {
            // Nothing was asked for: no protocol the relay could follow.
            StatusCode::SWITCHING_PROTOCOLS if client_upgrade.is_none() => {
                Err("upstream switched protocols unasked".to_string())
            }
            _ => Ok(response),
        });
    match (sent_on, client_upgrade) {
        (Ok(response), Some(client)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            switch_to_websocket(ctx, conn, entry, response, client, sent, started)
        }
        (Ok(response), _) => {
            let (mut parts, mut body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            entry.status = Some(parts.status.as_u16());
            let log = conn.log_enabled();
            let body = match take_if_arrived(&mut body) {
                // The common small response, already read whole with its head:
                // its line joins this thread's next batched log write, and the
                // response goes out, head and body in one write, once the line is
                // in the file.
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
        (Err(e), _) => {
            entry.decision = Verdict::Error;
            entry.rule = "upstream".to_string();
            entry.status = Some(502);
            entry.bytes_sent = sent.load(Ordering::Relaxed);
            entry.error = Some(e.clone());
            finish(ctx, conn, entry, started);
            json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({ "error": e, "host": target.host }),
            )
        }
    }
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
const SMALL_BODY: u64 = 64 * 1024;

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

/// The verified request context of a dispatched Worker's subrequest. Only a
/// Worker's sandbox may present one, and only its own: anything else is refused.
fn request_context(
    req: &Request<Incoming>,
    conn: &Connection,
    ctx: &RelayContext,
) -> Result<Option<RequestContext>, &'static str> {
    let Some(token) = req.headers().get(CONTEXT_HEADER) else {
        return Ok(None);
    };
    let Some(worker) = &conn.sandbox.worker else {
        return Err("context:not-a-worker");
    };
    let context = token
        .to_str()
        .ok()
        .and_then(|token| ctx.context_key.verify(token).ok())
        .ok_or("context:invalid")?;
    if context.namespace != worker.namespace || context.worker != worker.name {
        return Err("context:foreign");
    }
    Ok(Some(context))
}

fn blocked(
    ctx: &RelayContext,
    conn: &Connection,
    mut entry: LogEntry,
    started: Instant,
    target: &RequestTarget,
) -> Response<RelayBody> {
    entry.status = Some(403);
    let rule = entry.rule.clone();
    finish(ctx, conn, entry, started);
    json(
        StatusCode::FORBIDDEN,
        serde_json::json!({ "error": "blocked", "host": target.host, "rule": rule }),
    )
}

fn finish(ctx: &RelayContext, conn: &Connection, mut entry: LogEntry, started: Instant) {
    entry.duration_ms = elapsed_ms(started);
    ctx.recorder.record(&entry, conn.log_enabled());
}

pub(super) fn elapsed_ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// A body the relay already holds whole.
fn full(bytes: Bytes) -> RelayBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<RelayBody> {
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

    #[test]
    fn the_port_is_the_named_one_else_the_dialled_one() {
        let dialled: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let relay: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let port = |uri: &str, host: Option<&str>, to: SocketAddr, is_relay: bool| {
            let mut req = Request::get(uri);
            if let Some(host) = host {
                req = req.header(HOST, host);
            }
            let target = RequestTarget::of(&req.body(()).unwrap(), to, is_relay).unwrap();
            (target.port, target.tls, target.url)
        };
        let url = |s: &str| s.to_string();
        assert_eq!(
            port("/a", Some("api.test"), dialled, false),
            (8080, false, url("http://api.test/a"))
        );
        assert_eq!(port("/a", Some("api.test:81"), dialled, false).0, 81);
        assert_eq!(port("http://api.test/a", None, dialled, false).0, 8080);
        assert_eq!(port("https://api.test/a", None, dialled, false).0, 8080);
        assert_eq!(
            port("http://api.test:82/a", Some("x.test"), dialled, false).0,
            82
        );
        // A Worker's subrequest, sent to the relay itself: by scheme.
        assert_eq!(port("http://api.test/a", None, relay, true).0, 80);
        assert_eq!(
            port("https://api.test/a", None, relay, true),
            (443, true, url("https://api.test/a"))
        );
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
