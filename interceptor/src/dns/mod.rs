//! The DNS listener: sandboxed UDP port-53 traffic is redirected here by the eBPF
//! hooks (TCP port-53 connections reach the relay, which hands them to
//! [`serve_tcp`]). Names the tenant's outbound Worker blocks get NXDOMAIN; `[resolve]`
//! names are answered locally; the rest is forwarded to the host's resolvers.
//! Every query is logged as `proto = "dns"`.

mod origin;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ebpf::{DestinationTable, OriginalDestination};
use crate::logs::{Proto, Verdict};
use crate::policy::Action;
use crate::record::Recorder;
use crate::resolve::{normalize_host, Resolver};
use crate::tenants::{Sandbox, SandboxRegistry};

const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
const STATIC_TTL: u32 = 60;
/// How long a DNS-over-TCP connection may sit between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

pub struct DnsContext {
    pub destinations: DestinationTable,
    pub sandboxes: Arc<SandboxRegistry>,
    pub recorder: Arc<Recorder>,
    pub resolver: Arc<Resolver>,
    /// The host's resolvers, from /etc/resolv.conf.
    pub forwarders: Vec<SocketAddr>,
}

/// The `nameserver`s of a resolv.conf, minus the daemon's own DNS listeners.
pub fn forwarders_from_resolv_conf(text: &str, own: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|addr| !own.contains(addr))
        .collect()
}

pub async fn serve(
    socket: UdpSocket,
    ctx: Arc<DnsContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let socket = Arc::new(socket);
    let local = match socket.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!("dns listener: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 4096];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            () = shutdown.cancelled() => return,
        };
        let (len, client) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("dns recv: {e}");
                continue;
            }
        };
        let query = buf[..len].to_vec();
        let ctx = ctx.clone();
        let socket = socket.clone();
        tracker.spawn(async move {
            if let Some(reply) = answer(&ctx, local, client, &query).await {
                let _ = socket.send_to(&reply, client).await;
            }
        });
    }
}

async fn answer(
    ctx: &DnsContext,
    local: SocketAddr,
    client: SocketAddr,
    query: &[u8],
) -> Option<Vec<u8>> {
    // Only queries from sandboxed sockets the hooks redirected are served.
    let cookie = match origin::socket_cookie(local, client) {
        Ok(cookie) => cookie,
        Err(e) => {
            tracing::debug!(%client, "dns query from an unknown socket: {e}");
            return None;
        }
    };
    let original = ctx.destinations.by_cookie(cookie)?;
    let sandbox = ctx.sandboxes.lookup(original.cgroup_id)?;
    answer_for(ctx, &sandbox, &original, query, Transport::Udp).await
}

/// How a query came, and so how a reply too large for UDP is handled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// A truncated reply is passed on: the client asks again over TCP.
    Udp,
    /// A truncated reply is fetched again over TCP.
    Tcp,
}

/// DNS over TCP (RFC 7766: each message after its two-byte length), from a sandboxed
/// connection to port 53 the relay identified: answered like UDP queries, so a TCP
/// query is judged and logged too. Anything that is not DNS ends the connection.
pub async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    ctx: &DnsContext,
    sandbox: &Sandbox,
    original: &OriginalDestination,
) {
    loop {
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return;
        };
        let Some(reply) = answer_for(ctx, sandbox, original, &query, Transport::Tcp).await else {
            return;
        };
        if write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// Answers one query of `sandbox`'s, sent to `original`, and logs it.
async fn answer_for(
    ctx: &DnsContext,
    sandbox: &Sandbox,
    original: &OriginalDestination,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let name = normalize_host(&question.name().to_ascii());
    let policy = &sandbox.tenant.policy;

    let mut entry =
        crate::logs::LogEntry::new(&sandbox.tenant.id.0, Proto::Dns, original.socket_addr());
    entry.worker = sandbox.worker.as_ref().map(|w| w.name.clone());
    entry.pid = Some(original.pid);
    entry.params = sandbox.params.clone();
    entry.method = Some(question.query_type().to_string());
    entry.host = Some(name.clone());
    entry.bytes_sent = query.len() as u64;

    let decision = policy.decide_host(&name);
    entry.rule = decision.rule.clone();
    let reply = if decision.action == Action::Block {
        entry.decision = Verdict::Block;
        respond(&request, ResponseCode::NXDomain, Vec::new())
    } else if let Some(ips) = ctx.resolver.lookup_static(&name) {
        entry.decision = Verdict::Allow;
        let records = ips
            .iter()
            .filter_map(|ip| match (ip, question.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|rdata| Record::from_rdata(question.name().clone(), STATIC_TTL, rdata))
            .collect();
        respond(&request, ResponseCode::NoError, records)
    } else {
        match forward(&ctx.forwarders, query, transport).await {
            Some((reply, server)) => {
                entry.decision = Verdict::Allow;
                entry.upstream = Some(server.to_string());
                Some(reply)
            }
            None => {
                entry.decision = Verdict::Error;
                entry.rule = "resolve".to_string();
                entry.error = Some(format!(
                    "no reply from {} resolver(s)",
                    ctx.forwarders.len()
                ));
                respond(&request, ResponseCode::ServFail, Vec::new())
            }
        }
    };
    entry.bytes_received = reply.as_ref().map_or(0, |r| r.len() as u64);
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.recorder.record(&entry, policy.log_enabled());
    reply
}

fn respond(request: &Message, code: ResponseCode, answers: Vec<Record>) -> Option<Vec<u8>> {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    response.add_queries(request.queries().iter().cloned());
    response.add_answers(answers);
    response.to_vec().ok()
}

/// Sends the query as it came to each resolver in turn; the first reply wins. A
/// truncated reply to a TCP query is asked for again over TCP.
async fn forward(
    forwarders: &[SocketAddr],
    query: &[u8],
    transport: Transport,
) -> Option<(Vec<u8>, SocketAddr)> {
    for &server in forwarders {
        let Some(reply) = forward_udp(server, query).await else {
            continue;
        };
        if transport == Transport::Tcp && is_truncated(&reply) {
            if let Some(whole) = forward_tcp(server, query).await {
                return Some((whole, server));
            }
        }
        return Some((reply, server));
    }
    None
}

fn is_truncated(reply: &[u8]) -> bool {
    Message::from_vec(reply).is_ok_and(|m| m.truncated())
}

async fn forward_udp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(server).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(FORWARD_TIMEOUT, socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn forward_tcp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(server).await.ok()?;
        write_framed(&mut stream, query).await.ok()?;
        read_framed(&mut stream).await.ok()
    };
    tokio::time::timeout(FORWARD_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

/// One DNS message after its two-byte length (RFC 7766).
async fn read_framed<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut message = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver on loopback whose UDP replies are truncated and whose TCP
    /// replies are whole, as a real one's are for a large answer.
    #[tokio::test]
    async fn a_truncated_reply_is_fetched_again_over_tcp_for_a_tcp_query() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let server = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind(server).await.unwrap();
        let reply = |truncated: bool| {
            let mut m = Message::new();
            m.set_id(7)
                .set_message_type(MessageType::Response)
                .set_truncated(truncated);
            m.to_vec().unwrap()
        };
        let (udp_reply, tcp_reply) = (reply(true), reply(false));
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (_, from) = udp.recv_from(&mut buf).await.unwrap();
                udp.send_to(&udp_reply, from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                read_framed(&mut stream).await.unwrap();
                write_framed(&mut stream, &tcp_reply).await.unwrap();
            }
        });
        let query = Message::new().to_vec().unwrap();
        let (got, from) = forward(&[server], &query, Transport::Tcp).await.unwrap();
        assert_eq!(from, server);
        assert!(!is_truncated(&got), "fetched whole over TCP");
        let (got, _) = forward(&[server], &query, Transport::Udp).await.unwrap();
        assert!(is_truncated(&got), "passed on for the client to retry");

        // A resolver that cannot be reached over TCP: the truncated reply is
        // still better than none.
        let udp_only = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let udp_only_addr = udp_only.local_addr().unwrap();
        let truncated = reply(true);
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (_, from) = udp_only.recv_from(&mut buf).await.unwrap();
            udp_only.send_to(&truncated, from).await.unwrap();
        });
        let (got, _) = forward(&[udp_only_addr], &query, Transport::Tcp)
            .await
            .unwrap();
        assert!(is_truncated(&got));
    }

    #[test]
    fn resolv_conf_nameservers() {
        let own: Vec<SocketAddr> = vec!["127.0.0.1:53".parse().unwrap()];
        let conf =
            "# comment\nnameserver 10.0.0.2\nnameserver 127.0.0.1\nsearch x\nnameserver ::1\n";
        assert_eq!(
            forwarders_from_resolv_conf(conf, &own),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
