//! Forwarding to the host's resolvers over a small fixed pool of UDP sockets per
//! address family, shared by every query: a burst of queries to a silent
//! resolver costs entries in a table, not descriptors. A reply is matched to its
//! query by the socket it came in on, the resolver it came from, a random id and
//! the question; anything else that arrives (stale, unasked, forged) is dropped.
//! A truncated reply to a TCP client's query is fetched again over TCP.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::ProtoError;
use tokio::net::{TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, OnceCell};
use tokio_util::sync::CancellationToken;

use super::message::{self, Transport};

/// How long one resolver has to answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// Sockets per address family: each has its own source port, so a forger must
/// guess the port too, not only the 16-bit id.
const POOL_SOCKETS: usize = 4;
/// Random ids tried before giving up (only when nearly all 65536 are waiting).
const ID_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no resolver to forward to")]
    NoResolvers,
    #[error("no reply within {}s", FORWARD_TIMEOUT.as_secs())]
    Timeout,
    #[error("no free query id for {0}")]
    NoFreeId(SocketAddr),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("DNS message: {0}")]
    Message(#[from] ProtoError),
}

/// The resolvers and the sockets that reach them.
pub struct Forwarder {
    servers: Vec<SocketAddr>,
    /// Where the sockets and their receivers live, whichever runtime (the UDP
    /// listener's, or a relay thread's for DNS over TCP) forwards first: the one
    /// `new` was called in, which outlives the relay threads.
    runtime: Option<Handle>,
    v4: OnceCell<Pool>,
    v6: OnceCell<Pool>,
}

impl Forwarder {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Forwarder {
            servers: servers.into_iter().map(plain).collect(),
            runtime: Handle::try_current().ok(),
            v4: OnceCell::new(),
            v6: OnceCell::new(),
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks each resolver in turn for `question` (the judged question of
    /// `request`); the first reply wins.
    pub async fn forward(
        &self,
        request: &Message,
        question: &Query,
        transport: Transport,
    ) -> Result<(Message, SocketAddr), ForwardError> {
        let mut last = ForwardError::NoResolvers;
        for &server in &self.servers {
            let reply = match self.ask_udp(server, request, question, transport).await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::debug!(%server, "dns forward: {e}");
                    last = e;
                    continue;
                }
            };
            if transport == Transport::Tcp && reply.truncated() {
                match ask_tcp(server, request, question).await {
                    Ok(whole) => return Ok((whole, server)),
                    // The truncated reply is still better than none.
                    Err(e) => tracing::debug!(%server, "dns forward over TCP: {e}"),
                }
            }
            return Ok((reply, server));
        }
        Err(last)
    }

    async fn pool(&self, server: SocketAddr) -> io::Result<&Pool> {
        let (cell, any): (_, SocketAddr) = if server.is_ipv4() {
            (&self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        let runtime = match &self.runtime {
            Some(runtime) => runtime.clone(),
            None => Handle::try_current().map_err(io::Error::other)?,
        };
        cell.get_or_try_init(|| async { Pool::bind(any, &runtime) })
            .await
    }

    async fn ask_udp(
        &self,
        server: SocketAddr,
        request: &Message,
        question: &Query,
        transport: Transport,
    ) -> Result<Message, ForwardError> {
        let pool = self.pool(server).await?;
        let socket = rand::random_range(0..pool.sockets.len());
        let (waiting, reply) = pool.wait_for(socket, server, question)?;
        let bytes = message::rebuild(request, question, waiting.key.id, transport)?;
        pool.sockets[socket].send_to(&bytes, server).await?;
        let reply = tokio::time::timeout(FORWARD_TIMEOUT, reply)
            .await
            .map_err(|_| ForwardError::Timeout)?
            .map_err(|_| ForwardError::Timeout)?;
        drop(waiting);
        Ok(reply)
    }

    /// Queries waiting for a reply now, over all sockets.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        [&self.v4, &self.v6]
            .iter()
            .filter_map(|cell| cell.get())
            .map(|pool| pool.waiting.lock().map_or(0, |w| w.len()))
            .sum()
    }
}

/// A resolver's address as replies' source addresses compare with it.
fn plain(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port())
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    socket: usize,
    server: SocketAddr,
    id: u16,
}

struct Waiter {
    question: Query,
    /// Tells a waiter from a later one that drew the same key.
    serial: u64,
    reply: oneshot::Sender<Message>,
}

type Waiting = Mutex<HashMap<Key, Waiter>>;

struct Pool {
    sockets: Vec<Arc<UdpSocket>>,
    waiting: Arc<Waiting>,
    serial: AtomicU64,
    /// Stops the sockets' receivers when the pool goes.
    stop: CancellationToken,
}

impl Pool {
    fn bind(any: SocketAddr, runtime: &Handle) -> io::Result<Pool> {
        let waiting = Arc::new(Waiting::default());
        let stop = CancellationToken::new();
        let mut sockets = Vec::with_capacity(POOL_SOCKETS);
        // Registered with `runtime`'s reactor, whichever runtime runs this.
        let _entered = runtime.enter();
        for index in 0..POOL_SOCKETS {
            let socket = std::net::UdpSocket::bind(any)?;
            socket.set_nonblocking(true)?;
            let socket = Arc::new(UdpSocket::from_std(socket)?);
            runtime.spawn(receive(
                index,
                socket.clone(),
                waiting.clone(),
                stop.clone(),
            ));
            sockets.push(socket);
        }
        Ok(Pool {
            sockets,
            waiting,
            serial: AtomicU64::new(0),
            stop,
        })
    }

    /// Registers a query for `question` to `server` on socket `socket` under a
    /// random id no other waiting query there has.
    fn wait_for(
        &self,
        socket: usize,
        server: SocketAddr,
        question: &Query,
    ) -> Result<(Registration<'_>, oneshot::Receiver<Message>), ForwardError> {
        let (tx, rx) = oneshot::channel();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..ID_ATTEMPTS {
            let key = Key {
                socket,
                server,
                id: rand::random(),
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = waiting.entry(key) {
                slot.insert(Waiter {
                    question: question.clone(),
                    serial,
                    reply: tx,
                });
                let registration = Registration {
                    waiting: &self.waiting,
                    key,
                    serial,
                };
                return Ok((registration, rx));
            }
        }
        Err(ForwardError::NoFreeId(server))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A waiting query's entry, removed when the query is done (answered, timed out
/// or abandoned).
struct Registration<'a> {
    waiting: &'a Waiting,
    key: Key,
    serial: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting
            .get(&self.key)
            .is_some_and(|w| w.serial == self.serial)
        {
            waiting.remove(&self.key);
        }
    }
}

/// Hands each reply arriving on socket `index` to the query it answers.
async fn receive(
    index: usize,
    socket: Arc<UdpSocket>,
    waiting: Arc<Waiting>,
    stop: CancellationToken,
) {
    // Larger than any UDP payload we advertise: a reply is never cut short.
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            () = stop.cancelled() => return,
        };
        let (len, from) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("dns forwarding socket: {e}");
                continue;
            }
        };
        let Ok(reply) = Message::from_vec(&buf[..len]) else {
            tracing::debug!(%from, "dns: unreadable reply dropped");
            continue;
        };
        let key = Key {
            socket: index,
            server: plain(from),
            id: reply.id(),
        };
        let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
        let matched = waiting
            .get(&key)
            .is_some_and(|w| message::answers(&reply, key.id, &w.question));
        if !matched {
            tracing::debug!(%from, id = key.id, "dns: stale or unmatched reply dropped");
            continue;
        }
        if let Some(waiter) = waiting.remove(&key) {
            let _ = waiter.reply.send(reply);
        }
    }
}

/// One query over a fresh TCP connection (RFC 7766), for a reply too large for UDP.
async fn ask_tcp(
    server: SocketAddr,
    request: &Message,
    question: &Query,
) -> Result<Message, ForwardError> {
    let id = rand::random();
    let bytes = message::rebuild(request, question, id, Transport::Tcp)?;
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        super::write_framed(&mut stream, &bytes).await?;
        loop {
            let reply = Message::from_vec(&super::read_framed(&mut stream).await?)?;
            if message::answers(&reply, id, question) {
                return Ok::<_, ForwardError>(reply);
            }
        }
    };
    tokio::time::timeout(FORWARD_TIMEOUT, exchange)
        .await
        .map_err(|_| ForwardError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::MessageType;
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr;

    fn request(name: &str) -> (Message, Query) {
        let q = Query::query(Name::from_str(name).unwrap(), RecordType::A);
        let mut m = Message::new();
        m.set_id(0x1234).add_query(q.clone());
        (m, q)
    }

    fn reply(to: &Message) -> Vec<u8> {
        let mut r = to.clone();
        r.set_message_type(MessageType::Response);
        r.to_vec().unwrap()
    }

    /// A resolver on loopback answering each query with a reply to each of the
    /// messages `answers` makes of it, in order.
    async fn resolver(answers: fn(&Message) -> Vec<Message>) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let server = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..n]).unwrap();
                for answer in answers(&query) {
                    udp.send_to(&reply(&answer), from).await.unwrap();
                }
            }
        });
        server
    }

    /// A resolver that, for each query, first sends a reply under another id
    /// and one for another question, then the real one.
    #[tokio::test]
    async fn replies_are_matched_by_id_and_question_and_strays_are_dropped() {
        let server = resolver(|query| {
            let mut wrong_id = query.clone();
            wrong_id.set_id(query.id().wrapping_add(1));
            let mut wrong_question = query.clone();
            wrong_question.queries_mut()[0].set_name(Name::from_str("evil.test.").unwrap());
            vec![wrong_id, wrong_question, query.clone()]
        })
        .await;
        let forwarder = Arc::new(Forwarder::new(vec![server]));
        let (m, q) = request("api.test.");
        // All waiting at once, on the same sockets.
        let mut asks = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (forwarder, m, q) = (forwarder.clone(), m.clone(), q.clone());
            asks.spawn(async move { forwarder.forward(&m, &q, Transport::Udp).await });
        }
        while let Some(result) = asks.join_next().await {
            let (got, from) = result.unwrap().unwrap();
            assert_eq!(from, server);
            assert_eq!(got.queries(), std::slice::from_ref(&q));
        }
        assert_eq!(forwarder.waiting(), 0, "every entry removed");
    }

    #[tokio::test]
    async fn a_silent_resolver_times_out_and_leaves_nothing_waiting() {
        let silent = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let forwarder = Forwarder::new(vec![silent.local_addr().unwrap()]);
        let (m, q) = request("api.test.");
        let err = forwarder.forward(&m, &q, Transport::Udp).await.unwrap_err();
        assert!(matches!(err, ForwardError::Timeout), "{err}");
        assert_eq!(forwarder.waiting(), 0);
        assert_eq!(forwarder.v4.get().unwrap().sockets.len(), POOL_SOCKETS);
    }

    /// DNS over TCP is served on relay threads, each a runtime of its own: the
    /// sockets stay with the runtime the forwarder was made in, so they work
    /// after the runtime that forwarded first is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sockets_outlive_the_runtime_that_forwarded_first() {
        let server = resolver(|query| vec![query.clone()]).await;
        let forwarder = Arc::new(Forwarder::new(vec![server]));
        let (m, q) = request("api.test.");
        let first = {
            let (forwarder, m, q) = (forwarder.clone(), m.clone(), q.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async { forwarder.forward(&m, &q, Transport::Tcp).await.is_ok() })
            })
            .join()
            .unwrap()
        };
        assert!(first, "answered on the other runtime");
        let (got, _) = forwarder.forward(&m, &q, Transport::Udp).await.unwrap();
        assert_eq!(got.queries(), std::slice::from_ref(&q));
    }

    /// A resolver whose UDP replies are truncated and whose TCP replies are
    /// whole, as a real one's are for a large answer.
    #[tokio::test]
    async fn a_truncated_reply_is_fetched_again_over_tcp_for_a_tcp_query() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let server = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind(server).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let mut r = Message::from_vec(&buf[..n]).unwrap();
                r.set_message_type(MessageType::Response)
                    .set_truncated(true);
                udp.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let query = super::super::read_framed(&mut stream).await.unwrap();
                let query = Message::from_vec(&query).unwrap();
                super::super::write_framed(&mut stream, &reply(&query))
                    .await
                    .unwrap();
            }
        });
        let forwarder = Forwarder::new(vec![server]);
        let (m, q) = request("api.test.");
        let (got, from) = forwarder.forward(&m, &q, Transport::Tcp).await.unwrap();
        assert_eq!(from, server);
        assert!(!got.truncated(), "fetched whole over TCP");
        let (got, _) = forwarder.forward(&m, &q, Transport::Udp).await.unwrap();
        assert!(got.truncated(), "passed on for the client to retry");

        // A resolver that cannot be reached over TCP: the truncated reply is
        // still better than none.
        let udp_only = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let udp_only_addr = udp_only.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = udp_only.recv_from(&mut buf).await.unwrap();
            let mut r = Message::from_vec(&buf[..n]).unwrap();
            r.set_message_type(MessageType::Response)
                .set_truncated(true);
            udp_only.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        });
        let forwarder = Forwarder::new(vec![udp_only_addr]);
        let (got, _) = forwarder.forward(&m, &q, Transport::Tcp).await.unwrap();
        assert!(got.truncated());
    }
}
