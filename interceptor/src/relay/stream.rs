//! Byte streams: TLS judged by the ClientHello's SNI and relayed untouched (no
//! decryption), and any other TCP judged by destination address and port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tls_parser::{
    parse_tls_extensions, parse_tls_message_handshake, SNIType, TlsExtension, TlsMessage,
    TlsMessageHandshake,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::http::elapsed_ms;
use super::sniff::{client_hello, Prefixed};
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

pub async fn relay_opaque(
    stream: Prefixed<TcpStream>,
    conn: Connection,
    ctx: Arc<RelayContext>,
    started: Instant,
) {
    let (decision, target) = judge_address(&conn, &ctx);
    let entry = conn.entry(Proto::Tcp, &decision, Verdict::Allow);
    pipe(stream, &conn, &ctx, entry, target, started).await;
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

/// Connects to `target` (or refuses when `None`) and copies bytes both ways until
/// either side closes; records the outcome.
async fn pipe<S: AsyncRead + AsyncWrite + Unpin>(
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
    // Counted as they are read, so a connection that ends in a reset still
    // reports what crossed it.
    let mut client = ReadCounter::new(client);
    let mut server = ReadCounter::new(server);
    if let Err(e) = copy_until_stopped(&mut client, &mut server, &ctx.shutdown).await {
        entry.error = Some(e.to_string());
    }
    entry.finished(client.count, server.count, started);
    ctx.recorder.record(&entry, conn.log_enabled());
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
    inner: S,
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
