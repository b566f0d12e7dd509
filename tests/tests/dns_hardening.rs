//! End to end: the DNS listener serves one judged question per message and
//! forwards only a query rebuilt around it, and one tenant's burst of forwards
//! cannot take what the others need. The resolver the daemon forwards to is a
//! fake one on a loopback address (`[interceptor] dns_forwarders`), started by
//! each test and recording every message it receives; sandboxed python sends
//! raw DNS datagrams.

use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record};
use interceptor_tests::*;

/// A resolver on 127.0.0.2 that answers every A question with 127.0.0.9, except
/// names under `silent.test`, which it never answers.
struct FakeResolver {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeResolver {
    fn start() -> FakeResolver {
        let socket = UdpSocket::bind("127.0.0.2:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    return;
                };
                log.lock().unwrap().push(buf[..n].to_vec());
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(question) = query.queries().first() else {
                    continue;
                };
                let silent = Name::from_str("silent.test.").unwrap();
                if silent.zone_of(question.name()) {
                    continue;
                }
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_desired(true)
                    .set_recursion_available(true)
                    .add_query(question.clone())
                    .add_answer(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(A::new(127, 0, 0, 9)),
                    ));
                let _ = socket.send_to(&reply.to_vec().unwrap(), from);
            }
        });
        FakeResolver { addr, received }
    }

    /// Every message received so far, as sent.
    fn raw(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }

    /// Every message received so far, decoded.
    fn messages(&self) -> Vec<Message> {
        self.raw()
            .iter()
            .map(|m| Message::from_vec(m).expect("the daemon sends well-formed DNS"))
            .collect()
    }

    /// The question names of every message received so far.
    fn names(&self) -> Vec<String> {
        self.messages()
            .iter()
            .flat_map(|m| m.queries().iter().map(|q| q.name().to_ascii()))
            .collect()
    }
}

const CONFIG: &str = r#"
[tenants.acme]
outbound = "egress"

[tenants.other]
outbound = "egress"

[outbound.egress]
default = "allow"
block = ["blocked.test"]
"#;

fn daemon(resolver: &FakeResolver) -> Daemon {
    Daemon::start_configured(
        &format!("dns_forwarders = [\"{}\"]", resolver.addr),
        CONFIG,
        &[],
    )
}

/// Python that builds DNS messages: `name(n)`, `question(n)`, `header(...)`,
/// `txt(n, data)`, `opt(code, data)`, and `ask(message)` (UDP to 127.0.0.53:53;
/// prints `rcode`, `id`, `answers`, `addr` of the reply, or `no reply`) and
/// `ask_tcp(message)` (the same over TCP).
const PY: &str = r#"
import socket, struct
def name(n): return b''.join(bytes([len(p)])+p.encode() for p in n.split('.'))+b'\x00'
def question(n): return name(n)+struct.pack('>HH',1,1)
def header(id, flags=0x0100, qd=1, an=0, ns=0, ar=0): return struct.pack('>HHHHHH',id,flags,qd,an,ns,ar)
def txt(n, d): return name(n)+struct.pack('>HHIH',16,1,60,len(d)+1)+bytes([len(d)])+d
def opt(code, d): return b'\x00'+struct.pack('>HHIH',41,4096,0,4+len(d))+struct.pack('>HH',code,len(d))+d
def show(tag, r):
    print(tag+'rcode', r[3]&15)
    print(tag+'id', hex(struct.unpack('>H',r[:2])[0]))
    print(tag+'answers', struct.unpack('>H',r[6:8])[0])
    print(tag+'addr', '.'.join(str(b) for b in r[-4:]))
def ask(m, tag='', wait=5):
    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(wait)
    s.sendto(m,('127.0.0.53',53))
    try: show(tag, s.recvfrom(4096)[0])
    except socket.timeout: print(tag+'no reply')
def ask_tcp(m, tag='tcp_'):
    s=socket.create_connection(('127.0.0.53',53),timeout=5)
    s.sendall(struct.pack('>H',len(m))+m)
    n=struct.unpack('>H',s.recv(2))[0]; r=b''
    while len(r)<n: r+=s.recv(n-len(r))
    show(tag, r)
"#;

fn run(d: &Daemon, tenant: &str, script: &str) -> std::collections::BTreeMap<String, String> {
    let out = d.python(tenant, &format!("{PY}\n{script}"));
    assert!(out.status.success(), "{}", text(&out));
    key_values(&stdout(&out).replace(' ', "="))
}

fn get<'a>(kv: &'a std::collections::BTreeMap<String, String>, key: &str) -> &'a str {
    kv.get(key).map_or("(none)", String::as_str)
}

#[test]
fn a_message_with_two_questions_is_refused_and_nothing_reaches_the_resolver() {
    if !privileged("a_message_with_two_questions_is_refused_and_nothing_reaches_the_resolver") {
        return;
    }
    let resolver = FakeResolver::start();
    let d = daemon(&resolver);
    // An allowed first question used to carry a blocked second one to the resolver.
    let kv = run(
        &d,
        "acme",
        "two=header(0x2222,qd=2)+question('fwd.test')+question('blocked.test')\n\
         ask(two)\nask_tcp(two)\nask(header(0x3333,qd=0),'none_')\n\
         ask(header(0x4444)+question('fwd.test'),'control_')\n",
    );
    assert_eq!(get(&kv, "rcode"), "1", "FORMERR: {kv:?}");
    assert_eq!(get(&kv, "id"), "0x2222");
    assert_eq!(get(&kv, "tcp_rcode"), "1", "over TCP too: {kv:?}");
    assert_eq!(get(&kv, "none_rcode"), "1", "no question: {kv:?}");
    // Control: one question is forwarded and answered by the resolver.
    assert_eq!(get(&kv, "control_rcode"), "0", "{kv:?}");
    assert_eq!(get(&kv, "control_id"), "0x4444");
    assert_eq!(get(&kv, "control_addr"), "127.0.0.9");

    assert_eq!(
        resolver.names(),
        ["fwd.test."],
        "only the control reached the resolver"
    );
    let entry = d.wait_for_log("acme", |e| e["rule"] == "dns:questions");
    assert_eq!(entry["decision"], "block");
    assert_eq!(entry["proto"], "dns");
    assert_eq!(entry["host"], "fwd.test");
    assert!(
        entry["error"].as_str().unwrap().contains("blocked.test"),
        "{entry}"
    );
    let control = d.wait_for_log("acme", |e| {
        e["host"] == "fwd.test" && e["decision"] == "allow"
    });
    assert_eq!(control["upstream"], resolver.addr.to_string());
}

#[test]
fn a_query_carrying_extra_records_reaches_the_resolver_rebuilt_without_them() {
    if !privileged("a_query_carrying_extra_records_reaches_the_resolver_rebuilt_without_them") {
        return;
    }
    let resolver = FakeResolver::start();
    let d = daemon(&resolver);
    let kv = run(
        &d,
        "acme",
        "m=header(0x5555,flags=0x0110,an=1,ns=1,ar=2)+question('fwd.test')\
         +txt('a.fwd.test',b'secret-answer')+txt('b.fwd.test',b'secret-authority')\
         +txt('c.fwd.test',b'secret-additional')+opt(65001,b'secret-option')\n\
         ask(m)\nask_tcp(m)\n",
    );
    assert_eq!(get(&kv, "rcode"), "0", "{kv:?}");
    assert_eq!(
        get(&kv, "id"),
        "0x5555",
        "the client's id, whatever was sent upstream"
    );
    assert_eq!(get(&kv, "answers"), "1");
    assert_eq!(get(&kv, "tcp_rcode"), "0", "{kv:?}");
    assert_eq!(get(&kv, "tcp_answers"), "1");

    let raw = resolver.raw();
    assert_eq!(raw.len(), 2, "one query per transport");
    for bytes in &raw {
        assert!(
            !bytes.windows(6).any(|w| w == b"secret"),
            "a record of the sandbox's reached the resolver: {bytes:?}"
        );
        let sent = Message::from_vec(bytes).unwrap();
        assert_eq!(sent.queries().len(), 1);
        assert_eq!(sent.queries()[0].name().to_ascii(), "fwd.test.");
        assert!(sent.answers().is_empty());
        assert!(sent.name_servers().is_empty());
        assert!(sent.additionals().is_empty());
        assert!(sent.recursion_desired());
        // The daemon's own OPT record: no option of the sandbox's.
        let edns = sent.extensions().as_ref().expect("an OPT record");
        assert!(edns.options().as_ref().is_empty());
        assert_eq!(edns.max_payload(), 1232);
    }
    let entry = d.wait_for_log("acme", |e| {
        e["host"] == "fwd.test" && e["decision"] == "allow"
    });
    assert_eq!(entry["upstream"], resolver.addr.to_string());
}

#[test]
fn other_message_shapes_are_refused_and_not_forwarded() {
    if !privileged("other_message_shapes_are_refused_and_not_forwarded") {
        return;
    }
    let resolver = FakeResolver::start();
    let d = daemon(&resolver);
    let kv = run(
        &d,
        "acme",
        // UPDATE (opcode 5) and a response (QR=1) sent as a query.
        "ask(header(0x6666,flags=0x2900,an=1)+question('fwd.test')+txt('fwd.test',b'secret'),'update_')\n\
         ask(header(0x7777,flags=0x8180)+question('fwd.test'),'response_',wait=1)\n\
         ask(b'\\x12\\x34garbage','garbage_',wait=1)\n\
         ask(header(0x8888)+question('fwd.test'),'control_')\n",
    );
    assert_eq!(get(&kv, "update_rcode"), "4", "NOTIMP: {kv:?}");
    assert!(
        kv.contains_key("response_no"),
        "a response gets no reply: {kv:?}"
    );
    assert!(kv.contains_key("garbage_no"), "{kv:?}");
    assert_eq!(get(&kv, "control_rcode"), "0", "{kv:?}");
    assert_eq!(resolver.raw().len(), 1, "only the control was forwarded");
    let entry = d.wait_for_log("acme", |e| e["rule"] == "dns:opcode");
    assert_eq!(entry["decision"], "block");
    d.wait_for_log("acme", |e| {
        e["rule"] == "dns:malformed" && e["host"] == "fwd.test"
    });
    d.wait_for_log("acme", |e| {
        e["rule"] == "dns:malformed" && e["host"].is_null()
    });
}

/// Open descriptors of a process.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn one_tenants_burst_against_a_silent_resolver_is_capped_and_other_tenants_are_still_answered() {
    if !privileged(
        "one_tenants_burst_against_a_silent_resolver_is_capped_and_other_tenants_are_still_answered",
    ) {
        return;
    }
    const BURST: usize = 300;
    const CAP: usize = 64; // the default dns_max_in_flight_per_tenant
    let resolver = FakeResolver::start();
    let d = daemon(&resolver);
    // Warm up: the forwarding sockets exist before the baseline is taken.
    let kv = run(&d, "other", "ask(header(1)+question('warm.test'))\n");
    assert_eq!(get(&kv, "rcode"), "0", "{kv:?}");
    let baseline = descriptors(d.pid());

    let burst = format!(
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,1<<20)\n\
         codes={{}}\n\
         def drain(wait):\n\
         \x20 s.settimeout(wait)\n\
         \x20 try:\n\
         \x20\x20 while sum(codes.values())<{BURST}:\n\
         \x20\x20\x20 r=s.recvfrom(512)[0]; codes[r[3]&15]=codes.get(r[3]&15,0)+1\n\
         \x20 except OSError: pass\n\
         for i in range({BURST}):\n\
         \x20 s.sendto(header(i)+question('q%d.silent.test'%i),('127.0.0.53',53))\n\
         \x20 if i%20==19: drain(0.005)\n\
         drain(8)\n\
         print('refused', codes.pop(5,0))\nprint('servfail', codes.pop(2,0))\nprint('other', sum(codes.values()))\n"
    );
    let child = d
        .exec_command("acme", &[], &["python3", "-c", &format!("{PY}\n{burst}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The cap is reached while the first forwards wait on the silent resolver.
    d.wait_for_log("acme", |e| e["rule"] == "limit:dns");
    let during = descriptors(d.pid());
    let started = Instant::now();
    let kv = run(&d, "other", "ask(header(0x9999)+question('fwd.test'))\n");
    let answered_in = started.elapsed();
    assert_eq!(
        get(&kv, "rcode"),
        "0",
        "another tenant is still answered: {kv:?}"
    );
    assert_eq!(get(&kv, "addr"), "127.0.0.9");
    assert!(answered_in < Duration::from_secs(2), "{answered_in:?}");

    let out = child.wait_with_output().unwrap();
    let kv = key_values(&stdout(&out).replace(' ', "="));
    eprintln!("descriptors: {baseline} before the burst, {during} during it; burst: {kv:?}");
    assert!(
        during <= baseline + 16,
        "descriptors grew from {baseline} to {during} with the burst"
    );
    assert_eq!(get(&kv, "servfail"), CAP.to_string(), "{}", text(&out));
    assert_eq!(
        get(&kv, "refused"),
        (BURST - CAP).to_string(),
        "{}",
        text(&out)
    );
    let silent = resolver
        .names()
        .iter()
        .filter(|n| n.ends_with("silent.test."))
        .count();
    assert_eq!(silent, CAP, "only the capped number was forwarded");
    let entry = d.wait_for_log("acme", |e| e["rule"] == "limit:dns");
    assert_eq!(entry["decision"], "block");

    // The cap is given back as forwards end.
    let kv = run(&d, "acme", "ask(header(0xaaaa)+question('fwd.test'))\n");
    assert_eq!(get(&kv, "rcode"), "0", "{kv:?}");
}
