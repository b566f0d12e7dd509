//! The DNS listener: sandboxed UDP port-53 traffic is redirected here by the eBPF
//! hooks (TCP port-53 connections reach the relay, which hands them to
//! [`serve_tcp`]). Only a standard query with one question is served (see
//! [`message`]); names the tenant's outbound Worker blocks get NXDOMAIN; `[resolve]`
//! names are answered locally; the rest is forwarded, rebuilt around its question,
//! to the host's resolvers (see [`forward`]), at most `dns_max_in_flight_per_tenant`
//! at a time per tenant. Every message is logged as `proto = "dns"`.

mod forward;
mod message;
mod origin;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ebpf::{DestinationTable, OriginalDestination};
use crate::logs::{LogEntry, Proto, Verdict};
use crate::policy::Action;
use crate::record::Recorder;
use crate::resolve::{normalize_host, Resolver};
use crate::tenants::{Sandbox, SandboxRegistry};

pub use forward::{ForwardError, Forwarder};
use message::Transport;

const STATIC_TTL: u32 = 60;
/// How long a DNS-over-TCP connection may sit between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

pub struct DnsContext {
    pub destinations: DestinationTable,
    pub sandboxes: Arc<SandboxRegistry>,
    pub recorder: Arc<Recorder>,
    pub resolver: Arc<Resolver>,
    /// The resolvers queries are forwarded to, and the sockets that reach them.
    pub forwarder: Forwarder,
    /// Forwards each tenant has waiting.
    pub in_flight: InFlightLimit,
}

/// Where queries are forwarded: `configured` (`[interceptor] dns_forwarders`),
/// else the `nameserver`s of `resolv_conf`; never the daemon's own listeners.
pub fn forwarders(
    configured: Option<&[SocketAddr]>,
    resolv_conf: &str,
    own: &[SocketAddr],
) -> Vec<SocketAddr> {
    match configured {
        Some(list) => list.iter().copied().filter(|a| !own.contains(a)).collect(),
        None => forwarders_from_resolv_conf(resolv_conf, own),
    }
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

/// A per-tenant cap on forwards waiting for a resolver, so one tenant's burst
/// (to a silent resolver, say) cannot hold what every tenant's queries need.
pub struct InFlightLimit {
    limit: Option<usize>,
    counts: Mutex<HashMap<String, usize>>,
}

impl InFlightLimit {
    /// `None`: no limit.
    pub fn new(limit: Option<usize>) -> Self {
        InFlightLimit {
            limit,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// One more forward of `tenant`'s, unless it already has the limit waiting.
    fn start(&self, tenant: &str) -> Result<InFlight<'_>, usize> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(tenant.to_string()).or_default();
        if self.limit.is_some_and(|limit| *count >= limit) {
            return Err(*count);
        }
        *count += 1;
        Ok(InFlight {
            limit: self,
            tenant: tenant.to_string(),
        })
    }
}

/// One forward being counted against its tenant until dropped.
struct InFlight<'a> {
    limit: &'a InFlightLimit,
    tenant: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self.limit.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
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

/// DNS over TCP (RFC 7766: each message after its two-byte length), from a sandboxed
/// connection to port 53 the relay identified: answered like UDP queries, so a TCP
/// query is judged and logged too. Anything that is not a DNS query ends the connection.
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

/// Answers one message of `sandbox`'s, sent to `original`, and logs it; `None`:
/// no reply (not a DNS query).
async fn answer_for(
    ctx: &DnsContext,
    sandbox: &Sandbox,
    original: &OriginalDestination,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let policy = &sandbox.tenant.policy;
    let mut entry = LogEntry::new(&sandbox.tenant.id.0, Proto::Dns, original.socket_addr());
    entry.worker = sandbox.worker.as_ref().map(|w| w.name.clone());
    entry.pid = Some(original.pid);
    entry.params = sandbox.params.clone();
    entry.bytes_sent = query.len() as u64;

    let reply = judge(ctx, sandbox, query, transport, &mut entry).await;
    entry.bytes_received = reply.as_ref().map_or(0, |r| r.len() as u64);
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.recorder.record(&entry, policy.log_enabled());
    reply
}

/// The reply to `query`, with what decided it written into `entry`.
async fn judge(
    ctx: &DnsContext,
    sandbox: &Sandbox,
    query: &[u8],
    transport: Transport,
    entry: &mut LogEntry,
) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(request) => request,
        Err(e) => {
            entry.decision = Verdict::Block;
            entry.rule = "dns:malformed".to_string();
            entry.error = Some(format!("not a DNS message: {e}"));
            return None;
        }
    };
    if let Some(first) = request.queries().first() {
        entry.method = Some(first.query_type().to_string());
        entry.host = Some(normalize_host(&first.name().to_ascii()));
    }
    let question = match message::question(&request) {
        Ok(question) => question.clone(),
        Err(refusal) => {
            entry.decision = Verdict::Block;
            entry.rule = refusal.rule.to_string();
            entry.error = Some(refusal.error);
            return refusal
                .code
                .and_then(|code| message::respond(&request, code, Vec::new()));
        }
    };
    let name = normalize_host(&question.name().to_ascii());
    let decision = sandbox.tenant.policy.decide_host(&name);
    entry.rule = decision.rule.clone();
    if decision.action == Action::Block {
        entry.decision = Verdict::Block;
        return message::respond(&request, ResponseCode::NXDomain, Vec::new());
    }
    if let Some(ips) = ctx.resolver.lookup_static(&name) {
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
        return message::respond(&request, ResponseCode::NoError, records);
    }
    let _counted = match ctx.in_flight.start(&sandbox.tenant.id.0) {
        Ok(counted) => counted,
        Err(waiting) => {
            entry.decision = Verdict::Block;
            entry.rule = "limit:dns".to_string();
            entry.error = Some(format!(
                "the tenant already has {waiting} DNS forwards waiting"
            ));
            return message::respond(&request, ResponseCode::Refused, Vec::new());
        }
    };
    let forwarded = ctx
        .forwarder
        .forward(&request, &question, transport)
        .await
        .and_then(|(reply, server)| Ok((message::to_client(&request, reply, transport)?, server)));
    match forwarded {
        Ok((reply, server)) => {
            entry.decision = Verdict::Allow;
            entry.upstream = Some(server.to_string());
            Some(reply)
        }
        Err(e) => {
            entry.decision = Verdict::Error;
            entry.rule = "resolve".to_string();
            entry.error = Some(format!(
                "{e} (from {} resolver(s))",
                ctx.forwarder.servers().len()
            ));
            message::respond(&request, ResponseCode::ServFail, Vec::new())
        }
    }
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

    #[test]
    fn configured_forwarders_replace_resolv_conf_but_never_name_the_listener() {
        let own: Vec<SocketAddr> = vec!["127.0.0.1:15053".parse().unwrap()];
        let conf = "nameserver 10.0.0.2\n";
        let configured: Vec<SocketAddr> = vec![
            "127.0.0.2:5353".parse().unwrap(),
            "127.0.0.1:15053".parse().unwrap(),
        ];
        assert_eq!(
            forwarders(Some(&configured), conf, &own),
            vec!["127.0.0.2:5353".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            forwarders(None, conf, &own),
            vec!["10.0.0.2:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn in_flight_forwards_are_capped_per_tenant_and_given_back() {
        let limit = InFlightLimit::new(Some(2));
        let a1 = limit.start("a").unwrap();
        let _a2 = limit.start("a").unwrap();
        assert_eq!(limit.start("a").err(), Some(2), "over the cap");
        let _b = limit.start("b").expect("another tenant is not held back");
        drop(a1);
        let _a3 = limit.start("a").expect("given back when done");
        let unlimited = InFlightLimit::new(None);
        let held: Vec<_> = (0..1000).map(|_| unlimited.start("a").unwrap()).collect();
        drop(held);
        assert!(unlimited.counts.lock().unwrap().is_empty());
    }
}
