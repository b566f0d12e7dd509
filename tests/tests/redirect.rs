//! The eBPF enforcement alone, without the daemon: `interceptor::ebpf` loads
//! the real programs, attaches them to a fresh cgroup of this test's own, and
//! real child processes (python3) placed in that cgroup dial loopback
//! addresses. The test plays the relay and the DNS listener on unusual free
//! ports, so it never meets a running daemon.
//!
//! Only loopback addresses are ever dialled (and every dial is redirected to
//! the test's own listeners anyway).

use std::{
    ffi::CString,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use interceptor::ebpf::{
    attached_programs, cgroup2_mount, cgroup_id, DestinationTable, Enforcement, RedirectTargets,
};
use interceptor_common::{AF_INET, AF_INET6};
use interceptor_tests::{free_port, privileged, remove_cgroup_tree};

/// A fresh child cgroup of the cgroup2 mount, removed (with whatever still
/// runs in it) on drop.
/// Programs attached for a subtree: 18 on the subtree, 6 task-keyed ones at
/// the cgroup root, and 9 LSM programs where the kernel takes them (these
/// machines refuse them: see `Enforcement::lsm_state`).
fn program_count(enforcement: &Enforcement) -> usize {
    match enforcement.lsm_state() {
        interceptor::ebpf::LsmState::Active => 33,
        interceptor::ebpf::LsmState::Inactive(_) => 24,
    }
}

struct TestCgroup {
    path: PathBuf,
    id: u64,
}

impl TestCgroup {
    fn new(tag: &str) -> TestCgroup {
        let root = cgroup2_mount().expect("cgroup v2 mount");
        let path = root.join(format!("icpt-test-{tag}-{}", std::process::id()));
        remove_cgroup_tree(&path);
        std::fs::create_dir(&path).expect("create test cgroup");
        let id = cgroup_id(&path).unwrap();
        TestCgroup { path, id }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Starts `python3 -c script` inside `cgroup` (it moves itself there between
/// fork and exec), with stdout piped and line-buffered.
fn sandboxed_python(cgroup: &Path, script: &str) -> (Child, BufReader<ChildStdout>) {
    sandboxed_python_with_fds(cgroup, script, Stdio::null(), Vec::new())
}

/// Like [`sandboxed_python`], with `stdin` as the child's descriptor 0 and
/// `extra` as its descriptors 3, 4, ... (sockets of the test's own, handed in).
fn sandboxed_python_with_fds(
    cgroup: &Path,
    script: &str,
    stdin: Stdio,
    extra: Vec<std::os::fd::OwnedFd>,
) -> (Child, BufReader<ChildStdout>) {
    use std::os::fd::AsRawFd;
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let raw: Vec<i32> = extra.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", script])
        .stdin(stdin)
        .stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            // Each above 10 first, so no dup2 overwrites one still to be placed.
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, 10 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..raw.len() as i32 {
                if libc::dup2(10 + i, 3 + i) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start python3 in the test cgroup");
    drop(extra);
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdout)
}

/// The next `key=value` line the child prints (skipping others), or a panic
/// with what it printed if it ends first.
fn expect_line(stdout: &mut BufReader<ChildStdout>, key: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = stdout.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "child ended before printing {key}=; it printed:\n{seen}"
        );
        seen.push_str(&line);
        if let Some(value) = line.trim_end().strip_prefix(&format!("{key}=")) {
            return value.to_string();
        }
    }
}

/// Accepts one connection within 10 s.
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the relay listener {} accepted nothing",
                    listener.local_addr().unwrap()
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn wait_success(mut child: Child, rest: &mut BufReader<ChildStdout>) -> String {
    let mut tail = String::new();
    let _ = rest.read_to_string(&mut tail);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "child failed ({status}); rest of its output:\n{tail}"
            );
            return tail;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child did not finish; rest of its output:\n{tail}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Python prologue: a hard deadline, and SO_COOKIE.
const PRELUDE: &str = r#"
import errno, signal, socket, sys
signal.alarm(20)
SO_COOKIE = 57
def cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
"#;

/// One redirected TCP connection: the child dials `dial` from a socket of
/// `family`; the relay `listener` must accept it, the hand-off must give back
/// `dial` with the child's pid and the cgroup's id, and the child's
/// getpeername() must show `dial`.
fn check_tcp(
    cgroup: &TestCgroup,
    table: &DestinationTable,
    listener: &TcpListener,
    family: &str,
    dial: (&str, u16),
    expected: SocketAddr,
    expected_family: u16,
) {
    let script = format!(
        "{PRELUDE}
s = socket.socket(socket.{family}, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(({host:?}, {port}))
peer = s.getpeername()
print('peer=%s:%d' % (peer[0], peer[1]))
print('cookie=%d' % cookie(s))
assert s.recv(2) == b'ok'
s.close()
",
        host = dial.0,
        port = dial.1,
    );
    let (child, mut out) = sandboxed_python(&cgroup.path, &script);
    let (mut conn, peer) = accept(listener);

    let dst = table
        .take_for_relay(peer)
        .unwrap_or_else(|| panic!("no hand-off entry for relay peer {peer} (dialled {dial:?})"));
    assert_eq!(
        dst.socket_addr(),
        expected,
        "original destination of {dial:?}"
    );
    assert_eq!(dst.family, expected_family);
    assert_eq!(dst.pid, child.id(), "pid of the dialling process");
    assert_eq!(
        dst.cgroup_id, cgroup.id,
        "cgroup id of the dialling process"
    );
    assert!(
        table.take_for_relay(peer).is_none(),
        "take_for_relay removes the entry"
    );

    let shown = expect_line(&mut out, "peer");
    let expected_text = format!("{}:{}", expected.ip(), expected.port());
    assert_eq!(shown, expected_text, "getpeername() inside the sandbox");
    let cookie: u64 = expect_line(&mut out, "cookie").parse().unwrap();
    let by_cookie = table
        .by_cookie(cookie)
        .expect("by_cookie while the socket lives");
    assert_eq!(by_cookie, dst);

    conn.write_all(b"ok").unwrap();
    wait_success(child, &mut out);
}

#[test]
fn redirects_tcp_udp_and_dns_of_a_cgroup() {
    if !privileged("redirects_tcp_udp_and_dns_of_a_cgroup") {
        return;
    }
    let cgroup = TestCgroup::new("redirect");
    let relay_port = free_port();
    let dns_port = free_port();
    let targets = RedirectTargets::loopback(relay_port, dns_port);
    let mut enforcement =
        Enforcement::load(&targets, &cgroup.path).expect("load the eBPF programs");
    enforcement.attach().expect("attach to the test cgroup");
    let table = enforcement.destinations();

    let relay4 = TcpListener::bind(("127.0.0.1", relay_port)).unwrap();
    let relay6 = TcpListener::bind(("::1", relay_port)).unwrap();

    // IPv4.
    check_tcp(
        &cgroup,
        &table,
        &relay4,
        "AF_INET",
        ("127.0.0.9", 8080),
        "127.0.0.9:8080".parse().unwrap(),
        AF_INET,
    );
    // IPv6.
    let port6 = free_port();
    check_tcp(
        &cgroup,
        &table,
        &relay6,
        "AF_INET6",
        ("::1", port6),
        SocketAddr::new("::1".parse().unwrap(), port6),
        AF_INET6,
    );
    // IPv4-mapped IPv6 from an AF_INET6 socket: to the IPv6 relay.
    check_tcp(
        &cgroup,
        &table,
        &relay6,
        "AF_INET6",
        ("::ffff:127.0.0.9", 8080),
        "[::ffff:127.0.0.9]:8080".parse().unwrap(),
        AF_INET6,
    );

    // DNS: a datagram to any address on port 53 reaches the DNS listener, and
    // the reply seems to come from where it was sent.
    let dns4 = UdpSocket::bind(("127.0.0.1", dns_port)).unwrap();
    let dns6 = UdpSocket::bind(("::1", dns_port)).unwrap();
    for sock in [&dns4, &dns6] {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    let script = format!(
        "{PRELUDE}
for fam, host in ((socket.AF_INET, '127.0.0.9'), (socket.AF_INET6, '::1')):
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.settimeout(10)
    u.sendto(b'query', (host, 53))
    data, src = u.recvfrom(100)
    print('dns=%s:%d:%s' % (src[0], src[1], data.decode()))
"
    );
    let (child, mut out) = sandboxed_python(&cgroup.path, &script);
    for (sock, expect_src) in [(&dns4, "127.0.0.9:53"), (&dns6, "::1:53")] {
        let mut buf = [0u8; 100];
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("DNS listener got the query");
        assert_eq!(&buf[..n], b"query");
        sock.send_to(b"answer", from).unwrap();
        assert_eq!(
            expect_line(&mut out, "dns"),
            format!("{expect_src}:answer"),
            "recvfrom() source inside the sandbox"
        );
    }
    wait_success(child, &mut out);

    // Refused: UDP other than DNS (sendto and connect, IPv4 and IPv6), raw and
    // ICMP sockets.
    let script = format!(
        "{PRELUDE}
def attempt(name, f):
    try:
        f()
        print(name + '=allowed')
    except OSError as e:
        print(name + '=' + errno.errorcode.get(e.errno, str(e.errno)))
u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt('udp4_sendto', lambda: u4.sendto(b'x', ('127.0.0.9', 443)))
attempt('udp6_sendto', lambda: u6.sendto(b'x', ('::1', 443)))
attempt('udp6_mapped_sendto', lambda: u6.sendto(b'x', ('::ffff:127.0.0.9', 443)))
attempt('udp4_connect', lambda: u4.connect(('127.0.0.9', 443)))
attempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt('sctp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132))
attempt('mptcp', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))
attempt('ping', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
attempt('tcp', lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
attempt('unix', lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
print('done=1')
"
    );
    let (child, mut out) = sandboxed_python(&cgroup.path, &script);
    for name in [
        "udp4_sendto",
        "udp6_sendto",
        "udp6_mapped_sendto",
        "udp4_connect",
        "raw",
    ] {
        assert_eq!(
            expect_line(&mut out, name),
            "EPERM",
            "{name} must be refused"
        );
    }
    // Protocols this kernel may not have at all.
    for name in ["sctp", "mptcp"] {
        let got = expect_line(&mut out, name);
        assert!(
            got == "EPERM" || got == "EPROTONOSUPPORT",
            "{name} socket must be refused: {got}"
        );
    }
    // ICMP ping sockets: refused by our sock_create program, or before it by
    // the kernel's own net.ipv4.ping_group_range check (EACCES).
    let ping = expect_line(&mut out, "ping");
    assert!(
        ping == "EPERM" || ping == "EACCES",
        "ping socket must be refused: {ping}"
    );
    assert_eq!(expect_line(&mut out, "tcp"), "allowed");
    assert_eq!(expect_line(&mut out, "unix"), "allowed");
    expect_line(&mut out, "done");
    wait_success(child, &mut out);

    // Outside the cgroup nothing is redirected: this process reaches the relay
    // port directly and leaves no hand-off entry.
    let direct = TcpStream::connect(("127.0.0.1", relay_port)).unwrap();
    let (_conn, peer) = accept(&relay4);
    assert_eq!(peer, direct.local_addr().unwrap());
    assert!(table.take_for_relay(peer).is_none());
}

#[test]
fn restart_replaces_programs_and_exit_fails_closed() {
    if !privileged("restart_replaces_programs_and_exit_fails_closed") {
        return;
    }
    let cgroup = TestCgroup::new("restart");
    let relay_port = free_port();
    let targets = RedirectTargets::loopback(relay_port, free_port());

    let mut first = Enforcement::load(&targets, &cgroup.path).expect("load");
    first.attach().expect("attach");
    let before = attached_programs(&cgroup.path).unwrap();
    assert_eq!(before.len(), program_count(&first), "{before:#?}");
    assert!(before.iter().all(|p| p.name.starts_with("icpt_")));

    // A second instance (a restarted daemon) swaps its programs in place.
    let mut second = Enforcement::load(&targets, &cgroup.path).expect("load again");
    second.attach().expect("attach again");
    let after = attached_programs(&cgroup.path).unwrap();
    assert_eq!(
        after.len(),
        program_count(&second),
        "replaced, not added: {after:#?}"
    );
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.attach_type, new.attach_type);
        assert_eq!(old.name, new.name);
        assert_ne!(old.id, new.id, "{} was not replaced", new.name);
    }
    // Attaching the same instance again changes nothing.
    second.attach().expect("attach twice");
    assert_eq!(attached_programs(&cgroup.path).unwrap(), after);

    // The "daemon" goes away: every fd of ours is closed, the programs stay,
    // and a sandboxed connect fails instead of going out directly.
    let table = second.destinations();
    drop((first, second, table));
    assert_eq!(attached_programs(&cgroup.path).unwrap(), after);
    let script = format!(
        "{PRELUDE}
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(('127.0.0.9', 8080))
    print('connect=connected')
except OSError as e:
    print('connect=' + errno.errorcode.get(e.errno, str(e.errno)))
"
    );
    let (child, mut out) = sandboxed_python(&cgroup.path, &script);
    assert_eq!(expect_line(&mut out, "connect"), "ECONNREFUSED");
    wait_success(child, &mut out);
}

/// What the attempts of the scripts below print: `NAME=ok` or `NAME=ERRNO`.
const ATTEMPT: &str = "
import ctypes, errno, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, f):
    try:
        f()
        print(name + '=ok')
    except OSError as e:
        print(name + '=' + errno.errorcode.get(e.errno, str(e.errno)))
# A type-4 (segment routing) IPv6 routing header with one segment, ::1.
SRH = bytes([17, 2, 4, 0, 0, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, '::1')
# An IPv6 destination-options header holding only padding.
DSTOPTS = bytes([17, 0, 1, 4, 0, 0, 0, 0])
";

/// An unconnected TCP socket of the test's own (outside the cgroup).
fn outside_tcp_socket() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the new descriptor is ours alone.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// What the socket-keyed hooks cannot see is refused all the same: a socket
/// created outside the subtree and handed in (the task-keyed programs at the
/// cgroup root follow who uses it), options that route a packet elsewhere, and
/// binding a TCP socket (a listener's first step). The legitimate uses beside
/// each still work.
#[test]
fn sockets_from_outside_routing_options_and_listeners_are_refused() {
    if !privileged("sockets_from_outside_routing_options_and_listeners_are_refused") {
        return;
    }
    let cgroup = TestCgroup::new("tasks");
    let relay_port = free_port();
    let targets = RedirectTargets::loopback(relay_port, free_port());
    let mut enforcement = Enforcement::load(&targets, &cgroup.path).expect("load");
    enforcement.attach().expect("attach");
    let relay4 = TcpListener::bind(("127.0.0.1", relay_port)).unwrap();
    // Where a socket that escaped the hooks would land: a server outside.
    let outside = interceptor_tests::EchoServer::start("127.0.0.9:0");
    let port = outside.addr.port();

    let script = format!(
        "{ATTEMPT}
attempt('unix', lambda: socket.socket(socket.AF_UNIX).close())
def listen(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(addr)
    s.listen()
attempt('listen4', lambda: listen(socket.AF_INET, ('127.0.0.1', 0)))
attempt('listen6', lambda: listen(socket.AF_INET6, ('::1', 0)))
attempt('listen_unix', lambda: listen(socket.AF_UNIX, '\\0icpt-test-%d' % os.getpid()))
attempt('udp_bind', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(('127.0.0.1', 0)))
attempt('rthdr', lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).setsockopt(socket.IPPROTO_IPV6, 57, SRH))
attempt('ip_options', lambda: socket.socket().setsockopt(socket.IPPROTO_IP, 4, bytes([1, 1, 1, 0])))
attempt('bindtodevice', lambda: socket.socket().setsockopt(socket.SOL_SOCKET, 25, b'lo'))
attempt('tos', lambda: socket.socket().setsockopt(socket.IPPROTO_IP, 1, 16))
passed = socket.socket(fileno=0)
attempt('passed_bind', lambda: passed.bind(('127.0.0.1', 0)))
attempt('passed_connect', lambda: passed.connect(('127.0.0.9', {port})))
udp = socket.socket(fileno=3)
attempt('passed_sendto', lambda: udp.sendto(b'x', ('127.0.0.9', 53)))
own = socket.socket()
own.settimeout(5)
attempt('own_connect', lambda: own.connect(('127.0.0.9', {port})))
print('done=1')
"
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (child, mut out) = sandboxed_python_with_fds(
        &cgroup.path,
        &script,
        Stdio::from(outside_tcp_socket()),
        vec![udp.into()],
    );
    for (name, expected) in [
        ("unix", "ok"),
        ("listen4", "EPERM"),
        ("listen6", "EPERM"),
        ("listen_unix", "ok"),
        ("udp_bind", "ok"),
        ("rthdr", "EPERM"),
        ("ip_options", "EPERM"),
        ("bindtodevice", "EPERM"),
        ("tos", "ok"),
        ("passed_bind", "EPERM"),
        ("passed_connect", "EPERM"),
        ("passed_sendto", "EPERM"),
    ] {
        assert_eq!(expect_line(&mut out, name), expected, "{name}");
    }
    // The sandbox's own socket is redirected to the relay as always.
    let (_conn, _) = accept(&relay4);
    assert_eq!(expect_line(&mut out, "own_connect"), "ok");
    assert_eq!(expect_line(&mut out, "done"), "1");
    wait_success(child, &mut out);
    assert_eq!(outside.connections(), 0, "a passed-in socket got out");
    assert!(enforcement.counters().read().calls_refused >= 6);
}

/// Whatever a packet's header says beyond what the hooks rewrote (here an IPv6
/// extension header given as ancillary data, which no socket hook sees), it
/// leaves a sandbox's socket only for the relay or DNS listener, and a sandbox
/// socket hears only from them. Everything else is dropped and counted.
#[test]
fn the_packet_backstop_drops_what_leaves_for_or_comes_from_anywhere_else() {
    if !privileged("the_packet_backstop_drops_what_leaves_for_or_comes_from_anywhere_else") {
        return;
    }
    let cgroup = TestCgroup::new("backstop");
    let dns_port = free_port();
    let targets = RedirectTargets::loopback(free_port(), dns_port);
    let mut enforcement = Enforcement::load(&targets, &cgroup.path).expect("load");
    enforcement.attach().expect("attach");
    let dns4 = UdpSocket::bind(("127.0.0.1", dns_port)).unwrap();
    let dns6 = UdpSocket::bind(("::1", dns_port)).unwrap();
    dns6.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    dns4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();

    let script = format!(
        "{ATTEMPT}
listener = socket.socket()
listener.listen()
listener.settimeout(2)
print('listening=%d' % listener.getsockname()[1])
attempt('accepted', lambda: print('peer=%s' % (listener.accept()[1],)))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
attempt('routed', lambda: s6.sendmsg([b'routed'], [(socket.IPPROTO_IPV6, 59, DSTOPTS)], 0, ('::1', 53)))
attempt('plain6', lambda: s6.sendto(b'plain6', ('::1', 53)))
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s4.bind(('127.0.0.1', 0))
s4.settimeout(3)
s4.sendto(b'query', ('127.0.0.1', 53))
print('port=%d' % s4.getsockname()[1])
data, _ = s4.recvfrom(100)
print('answer=' + data.decode())
attempt('stranger', lambda: print('heard=' + s4.recvfrom(100)[0].decode()))
"
    );
    let (child, mut out) = sandboxed_python(&cgroup.path, &script);
    let port: u16 = expect_line(&mut out, "listening").parse().unwrap();
    // A listener the kernel bound by itself hears nothing from outside.
    let knock = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    );
    assert!(knock.is_err(), "an outsider reached a sandbox's listener");
    assert_eq!(expect_line(&mut out, "accepted"), "None");
    assert_eq!(expect_line(&mut out, "routed"), "EPERM");
    assert_eq!(expect_line(&mut out, "plain6"), "ok");
    let mut buf = [0u8; 64];
    let (n, _) = dns6.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"plain6", "only the plain datagram arrives");

    let port: u16 = expect_line(&mut out, "port").parse().unwrap();
    let (n, from) = dns4.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"query");
    // Someone else writes to the sandbox's socket first; then the DNS listener answers.
    stranger.send_to(b"stranger", ("127.0.0.1", port)).unwrap();
    thread::sleep(Duration::from_millis(100));
    dns4.send_to(b"answer", from).unwrap();
    assert_eq!(expect_line(&mut out, "answer"), "answer");
    // A timeout: the stranger's datagram never reached the socket.
    assert_eq!(expect_line(&mut out, "stranger"), "None");
    wait_success(child, &mut out);
    let counts = enforcement.counters().read();
    assert!(counts.egress_dropped >= 1, "{counts:?}");
    assert!(counts.ingress_dropped >= 1, "{counts:?}");
}
