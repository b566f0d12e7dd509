//! Byte streams: TLS judged by the ClientHello's SNI and relayed untouched (no
//! decryption), and any other TCP judged by destination address and port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tls_parser::{
    parse_tls_extensions, parse_tls_message_handshake, SNIType, TlsExtension, TlsMessage,
    TlsMessageHandshake,
};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::http::elapsed_ms;
use super::sniff::{client_hello, Prefixed, RequestLines, TLS_HANDSHAKE};
use super::upstream::{self, Refusal};
use super::{copy_until_stopped, Connection, RelayContext};
use crate::logs::{LogEntry, Proto, Verdict};
use crate::policy::{Action, Decision};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the ClientHello that opens a TLS stream says of where it goes.
enum HelloName {
    Sni(String),
    /// A readable ClientHello without a host name.
    NoSni,
    /// Cut short, paused past the sniff deadline, too long, or malformed: it
    /// could hide any name, so it is refused whatever the default.
    Unreadable,
}

fn client_hello_name(prefix: &[u8]) -> HelloName {
    let Some(message) = client_hello(prefix) else {
        return HelloName::Unreadable;
    };
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(&message)
    else {
        return HelloName::Unreadable;
    };
    let Some(ext) = hello.ext else {
        return HelloName::NoSni;
    };
    let Ok((_, extensions)) = parse_tls_extensions(ext) else {
        return HelloName::Unreadable;
    };
    let name = extensions.into_iter().find_map(|ext| match ext {
        TlsExtension::SNI(names) => names
            .into_iter()
            .find(|(kind, _)| *kind == SNIType::HostName)
            .and_then(|(_, name)| std::str::from_utf8(name).ok().map(str::to_ascii_lowercase)),
        _ => None,
    });
    name.map_or(HelloName::NoSni, HelloName::Sni)
}

pub async fn relay_tls(
    stream: Prefixed<TcpStream>,
    conn: Connection,
    ctx: Arc<RelayContext>,
    started: Instant,
) {
    let hello = client_hello_name(stream.prefix());
    let policy = &conn.sandbox.tenant.policy;
    let port = conn.dst.port();
    let (decision, target) = match &hello {
        HelloName::Sni(sni) => {
            let decision = policy.decide_host(sni);
            if decision.action == Action::Block {
                (decision, None)
            } else {
                match upstream::choose(&ctx.resolver, policy, &ctx.local, sni, port).await {
                    Ok(addr) => (decision, Some(addr)),
                    Err(Refusal::Blocked(d)) => (d, None),
                    Err(Refusal::Unresolvable(why)) => {
                        let mut entry = conn.entry(
                            Proto::Tls,
                            &Decision {
                                action: Action::Block,
                                rule: "resolve".into(),
                            },
                            Verdict::Error,
                        );
                        entry.host = Some(sni.clone());
                        entry.error = Some(format!("cannot resolve: {why}"));
                        entry.duration_ms = elapsed_ms(started);
                        ctx.recorder.record(&entry, conn.log_enabled());
                        return;
                    }
                }
            }
        }
        // Without SNI there is no host an allow rule could match: under a default of
        // block that holds whatever the address (SPEC §5); else the dialled address
        // is all there is to judge.
        HelloName::NoSni => match conn.sandbox.tenant.policy.default_action() {
            Action::Block => (Decision::block("default:block"), None),
            Action::Allow => judge_address(&conn, &ctx),
        },
        HelloName::Unreadable => (Decision::block("tls:unreadable"), None),
    };
    let mut entry = conn.entry(Proto::Tls, &decision, Verdict::Allow);
    if let HelloName::Sni(sni) = hello {
        entry.host = Some(sni);
    }
    pipe(stream, &conn, &ctx, entry, target, started).await;
}

/// An upstream connection already open when the client's bytes are classified.
pub struct Connected {
    pub server: TcpStream,
    pub target: SocketAddr,
    pub decision: Decision,
}

/// Waits until `socket` has a byte to read, or its end: readiness alone may be
/// a false positive, and a silent side taken for one that spoke would decide
/// the wrong way.
async fn input(socket: &TcpStream) -> io::Result<()> {
    loop {
        socket.readable().await?;
        let peeked = socket.try_io(Interest::READABLE, || {
            SockRef::from(socket).peek(&mut [MaybeUninit::uninit(); 1])
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // A byte, the end, or an error the reader will meet: it spoke.
            _ => return Ok(()),
        }
    }
}

/// Relays any other TCP, judged by the dialled address: `connected` when a
/// connection to it was already made while the client was silent, and
/// `server_spoke` when that server spoke first.
pub async fn relay_opaque(
    stream: Prefixed<TcpStream>,
    conn: Connection,
    ctx: Arc<RelayContext>,
    started: Instant,
    connected: Option<Connected>,
    server_spoke: bool,
) {
    let watched = Watched::new(stream, server_spoke);
    match connected {
        Some(connected) => {
            let mut entry = conn.entry(Proto::Tcp, &connected.decision, Verdict::Allow);
            entry.upstream = Some(connected.target.to_string());
            relay(watched, connected.server, &conn, &ctx, entry, started).await;
        }
        None => {
            let (decision, target) = judge_address(&conn, &ctx);
            let entry = conn.entry(Proto::Tcp, &decision, Verdict::Allow);
            pipe(watched, &conn, &ctx, entry, target, started).await;
        }
    }
}

/// Who speaks first on a connection whose client has said nothing yet.
pub enum FirstSpeaker {
    /// The server, at the dialled address (which was judged, and allowed).
    Server(Connected),
    /// The client (or it closed): its bytes are to be classified, with the
    /// connection to the dialled address when one was made.
    Client(Option<Connected>),
    /// Neither, and the connection is over (logged).
    Neither,
}

/// How long a silent client waits for its first byte when the dialled address
/// is blocked (so no server can speak first): as long as an idle HTTP client
/// connection, so a connection opened ahead of its request is still judged by
/// the request.
const SILENT_BLOCKED: Duration = Duration::from_secs(75);

/// A client silent past [`super::sniff::SILENCE`] may be waiting for a server
/// that speaks first (SMTP, SSH servers, databases). When the dialled address is
/// allowed, the relay connects to it and waits for either side: a server that
/// speaks first makes the stream opaque; a client that speaks first is
/// classified as any other (a late HTTP request or ClientHello is judged by its
/// host, never passed as bytes). When the address is blocked, it waits for the
/// client alone.
pub async fn first_speaker(
    client: &TcpStream,
    conn: &Connection,
    ctx: &RelayContext,
    started: Instant,
) -> FirstSpeaker {
    let (decision, target) = judge_address(conn, ctx);
    let Some(target) = target else {
        let waited = tokio::select! {
            spoke = input(client) => spoke.is_ok(),
            () = tokio::time::sleep(SILENT_BLOCKED) => false,
            () = ctx.shutdown.cancelled() => false,
        };
        if waited {
            return FirstSpeaker::Client(None);
        }
        let mut entry = conn.entry(Proto::Tcp, &decision, Verdict::Block);
        entry.error = Some("the client sent nothing".to_string());
        entry.duration_ms = elapsed_ms(started);
        ctx.recorder.record(&entry, conn.log_enabled());
        return FirstSpeaker::Neither;
    };
    let mut entry = conn.entry(Proto::Tcp, &decision, Verdict::Allow);
    entry.upstream = Some(target.to_string());
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
    let server = match connected {
        Ok(Ok(server)) => server,
        Ok(Err(e)) => {
            fail(ctx, conn, entry, started, &e.to_string());
            return FirstSpeaker::Neither;
        }
        Err(_) => {
            fail(ctx, conn, entry, started, "connect timed out");
            return FirstSpeaker::Neither;
        }
    };
    let _ = server.set_nodelay(true);
    let server_first = tokio::select! {
        // Both at once: the server spoke first, the client answers it.
        biased;
        _ = input(&server) => true,
        _ = input(client) => false,
        () = ctx.shutdown.cancelled() => return FirstSpeaker::Neither,
    };
    let connected = Connected {
        server,
        target,
        decision,
    };
    if server_first {
        FirstSpeaker::Server(connected)
    } else {
        FirstSpeaker::Client(Some(connected))
    }
}

/// Judges the dialled address itself; `Some` address when it may be connected to.
fn judge_address(conn: &Connection, ctx: &RelayContext) -> (Decision, Option<SocketAddr>) {
    let policy = &conn.sandbox.tenant.policy;
    let dst = SocketAddr::new(conn.dst.ip().to_canonical(), conn.dst.port());
    if let Some(refused) = upstream::refuse_address(policy, &ctx.local, dst) {
        return (refused, None);
    }
    let decision = policy.decide_opaque(dst.ip(), dst.port());
    let target = (decision.action == Action::Allow).then_some(dst);
    (decision, target)
}

/// Connects to `target` (or refuses when `None`) and relays.
async fn pipe<S: AsyncRead + AsyncWrite + Unpin + Refusing>(
    client: S,
    conn: &Connection,
    ctx: &RelayContext,
    mut entry: LogEntry,
    target: Option<SocketAddr>,
    started: Instant,
) {
    let Some(target) = target else {
        entry.decision = Verdict::Block;
        entry.duration_ms = elapsed_ms(started);
        ctx.recorder.record(&entry, conn.log_enabled());
        return;
    };
    entry.upstream = Some(target.to_string());
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
    let server = match connected {
        Ok(Ok(server)) => server,
        Ok(Err(e)) => return fail(ctx, conn, entry, started, &e.to_string()),
        Err(_) => return fail(ctx, conn, entry, started, "connect timed out"),
    };
    let _ = server.set_nodelay(true);
    relay(client, server, conn, ctx, entry, started).await;
}

/// Copies bytes both ways until either side closes (or the client's side
/// refuses what it carries); records the outcome.
async fn relay<S: AsyncRead + AsyncWrite + Unpin + Refusing>(
    client: S,
    server: TcpStream,
    conn: &Connection,
    ctx: &RelayContext,
    mut entry: LogEntry,
    started: Instant,
) {
    // Counted as they are read, so a connection that ends in a reset still
    // reports what crossed it.
    let mut client = ReadCounter::new(client);
    let mut server = ReadCounter::new(server);
    if let Err(e) = copy_until_stopped(&mut client, &mut server, &ctx.shutdown).await {
        entry.error = Some(e.to_string());
    }
    if let Some(rule) = client.inner.refused() {
        entry.decision = Verdict::Block;
        entry.rule = rule.to_string();
    }
    entry.finished(client.count, server.count, started);
    ctx.recorder.record(&entry, conn.log_enabled());
}

/// A client stream that may refuse what it carries (ending the relay).
pub(super) trait Refusing {
    /// The rule that refused it, if one did.
    fn refused(&self) -> Option<&'static str> {
        None
    }
}

impl Refusing for Prefixed<TcpStream> {}

/// The client's side of a stream relayed as bytes, watched for what should
/// have been judged by a host: a line an HTTP server could take as a request
/// line, anywhere in the stream (after junk lines, or after the server spoke
/// first), or, when the server spoke first, a TLS handshake as the client's
/// first bytes. Either ends the stream before those bytes are sent on.
pub(super) struct Watched<S> {
    inner: S,
    lines: RequestLines,
    /// Nothing read yet, and a TLS handshake now would be refused.
    tls_first_refused: bool,
    refused: Option<&'static str>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, server_spoke: bool) -> Self {
        Watched {
            inner,
            lines: RequestLines::default(),
            tls_first_refused: server_spoke,
            refused: None,
        }
    }
}

impl<S> Refusing for Watched<S> {
    fn refused(&self) -> Option<&'static str> {
        self.refused
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(rule) = self.refused {
            return Poll::Ready(Err(refusal(rule)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        let Some(&first) = read.first() else {
            return Poll::Ready(Ok(()));
        };
        let refused = if self.tls_first_refused && first == TLS_HANDSHAKE {
            Some("tcp:tls")
        } else if self.lines.watch(read) {
            Some("tcp:http")
        } else {
            None
        };
        self.tls_first_refused = false;
        if let Some(rule) = refused {
            // Not a byte of what was refused goes on.
            buf.set_filled(before);
            self.refused = Some(rule);
            return Poll::Ready(Err(refusal(rule)));
        }
        Poll::Ready(Ok(()))
    }
}

fn refusal(rule: &str) -> io::Error {
    let what = match rule {
        "tcp:tls" => "a TLS handshake after the server spoke first",
        _ => "an HTTP request line in a stream relayed as bytes",
    };
    io::Error::new(io::ErrorKind::PermissionDenied, format!("refused: {what}"))
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn fail(ctx: &RelayContext, conn: &Connection, mut entry: LogEntry, started: Instant, why: &str) {
    entry.decision = Verdict::Error;
    entry.rule = "upstream".to_string();
    entry.error = Some(format!("connect: {why}"));
    entry.duration_ms = elapsed_ms(started);
    ctx.recorder.record(&entry, conn.log_enabled());
}

/// Counts the bytes read from a stream.
pub(super) struct ReadCounter<S> {
    pub inner: S,
    pub count: u64,
}

impl<S> ReadCounter<S> {
    pub fn new(inner: S) -> Self {
        ReadCounter { inner, count: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadCounter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.count += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadCounter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
