//! End to end, the kernel's second line: what a sandboxed process (`exec`)
//! cannot do beside the redirect, whatever the daemon is doing. A real daemon,
//! real sandboxes, real servers on loopback addresses.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use interceptor_tests::*;

const KEY: &str = "test-secret-for-hs256";

/// A tenant whose outbound Worker injects a credential for `svc.test`, a name
/// that resolves to a loopback address where a sandbox might try to listen.
fn config(dispatch_port: u16) -> String {
    format!(
        r#"
[resolve]
"svc.test" = ["127.0.0.3"]

[tenants.acme]
outbound = "egress"
params = {{ customer_name = "acme" }}

[outbound.egress]
default = "allow"
allow_cidrs = ["127.0.0.3/32", "127.0.0.9/32"]

[[outbound.egress.inject]]
host = "svc.test"
header = "Authorization"
jwt = {{ algorithm = "HS256", key_file = "{{dir}}/jwt.key", ttl_seconds = 300, claims = {{ sub = "{{customer_name}}" }} }}

[[dispatch_namespaces]]
binding = "dispatcher"
namespace = "customers"
listen = "127.0.0.1:{dispatch_port}"
workers = "{{dir}}/workers"
outbound = {{ service = "egress", parameters = ["customer_name", "url"] }}
"#
    )
}

/// Python printing `NAME=ok` or `NAME=ERRNO` for each attempt.
const ATTEMPT: &str = "
import errno, os, socket, sys, time
def attempt(name, f):
    try:
        f()
        print(name + '=ok', flush=True)
    except OSError as e:
        print(name + '=' + str(errno.errorcode.get(e.errno, e.errno)), flush=True)
def listen(family, addr, kind=socket.SOCK_STREAM):
    s = socket.socket(family, kind)
    s.bind(addr)
    if kind == socket.SOCK_STREAM:
        s.listen()
";

fn expect(out: &str, name: &str, value: &str) {
    let values = key_values(out);
    assert_eq!(
        values.get(name).map(String::as_str),
        Some(value),
        "{name}: {out}"
    );
}

/// Posing as an upstream (listening where an injected host resolves, to
/// collect the credential), taking a daemon's port (while it runs or not), or
/// hearing from outside: none of it works from a sandbox. A Unix-socket server
/// inside the sandbox and name resolution through the daemon still do.
#[test]
fn a_sandbox_cannot_pose_as_an_upstream_take_a_daemon_port_or_hear_from_outside() {
    if !privileged("a_sandbox_cannot_pose_as_an_upstream_take_a_daemon_port_or_hear_from_outside") {
        return;
    }
    let dispatch_port = free_port();
    let mut d = Daemon::start_with(&config(dispatch_port), &[("jwt.key", KEY)]);
    let upstream_port = free_port();

    let script = format!(
        "{ATTEMPT}
attempt('upstream', lambda: listen(socket.AF_INET, ('127.0.0.3', {upstream_port})))
attempt('upstream_any', lambda: listen(socket.AF_INET6, ('::', {upstream_port})))
attempt('dispatch', lambda: listen(socket.AF_INET, ('127.0.0.1', {dispatch_port})))
attempt('dispatch_udp', lambda: listen(socket.AF_INET, ('0.0.0.0', {dispatch_port}), socket.SOCK_DGRAM))
def unix_server():
    path = '/tmp/icpt-test-%d.sock' % os.getpid()
    listen(socket.AF_UNIX, path)
    os.unlink(path)
attempt('unix_server', unix_server)
attempt('resolve', lambda: socket.getaddrinfo('svc.test', 80, socket.AF_INET))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(('127.0.0.1', 0))
u.settimeout(2)
print('udp_port=%d' % u.getsockname()[1], flush=True)
attempt('heard', lambda: print('datagram=' + u.recvfrom(100)[0].decode(), flush=True))
"
    );
    let mut sandbox = d
        .exec_command("acme", &[], &["python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(sandbox.stdout.take().unwrap());
    let mut seen = String::new();
    let udp_port: u16 = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut lines, &mut line).unwrap() > 0,
            "{seen}"
        );
        seen.push_str(&line);
        if let Some(port) = line.trim().strip_prefix("udp_port=") {
            break port.parse().unwrap();
        }
    };
    let outsider = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..3 {
        outsider
            .send_to(b"from outside", ("127.0.0.1", udp_port))
            .unwrap();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut lines, &mut rest).unwrap();
    sandbox.wait().unwrap();
    let out = seen + &rest;
    expect(&out, "upstream", "EPERM");
    expect(&out, "upstream_any", "EPERM");
    expect(&out, "dispatch", "EPERM");
    expect(&out, "dispatch_udp", "EPERM");
    expect(&out, "unix_server", "ok");
    expect(&out, "resolve", "ok");
    // A timeout: nothing from outside reached the sandbox's socket.
    expect(&out, "heard", "None");
    assert!(!out.contains("datagram="), "{out}");

    // While the daemon is dead its ports stay refused too (a sandbox holding
    // one would keep it from coming back, and collect what is meant for it).
    let go = d.dir.path().join("go");
    let script = format!(
        "{ATTEMPT}
while not os.path.exists('{go}'): time.sleep(0.02)
attempt('dispatch_down', lambda: listen(socket.AF_INET, ('127.0.0.1', {dispatch_port}), socket.SOCK_DGRAM))
attempt('other_udp', lambda: listen(socket.AF_INET, ('127.0.0.1', 0), socket.SOCK_DGRAM))
",
        go = go.display()
    );
    let waiting = d
        .exec_command("acme", &[], &["python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.stop_with(libc::SIGKILL);
    // Every program stays: the task-keyed ones at the root and the backstop too.
    let attached = interceptor::ebpf::attached_programs(&d.cgroup).unwrap();
    for kind in [
        "egress",
        "ingress",
        "setsockopt",
        "root/connect4",
        "root/sendmsg6",
    ] {
        assert!(
            attached.iter().any(|p| p.attach_type == kind),
            "{kind} detached when the daemon died: {attached:#?}"
        );
    }
    std::fs::write(&go, "").unwrap();
    let out = stdout(&waiting.wait_with_output().unwrap());
    expect(&out, "dispatch_down", "EPERM");
    expect(&out, "other_udp", "ok");

    // A restart replaces every program in place.
    d.spawn();
    let after = interceptor::ebpf::attached_programs(&d.cgroup).unwrap();
    assert_eq!(after.len(), attached.len(), "{after:#?}");
    for (old, new) in attached.iter().zip(&after) {
        assert_eq!((old.attach_type, &old.name), (new.attach_type, &new.name));
        assert_ne!(old.id, new.id, "{} was not replaced", new.name);
    }
}

/// A socket made outside the sandbox and handed in cannot be used past the
/// relay: one passed over a Unix socket (`SCM_RIGHTS`) is refused when the
/// sandbox connects it, and `exec` runs nothing with a network socket for its
/// standard input. No socket option sends a packet around the rewrite; `status`
/// counts what was refused. The sandbox's own connections still go through.
#[test]
fn sockets_handed_in_and_routing_options_never_get_past_the_relay() {
    if !privileged("sockets_handed_in_and_routing_options_never_get_past_the_relay") {
        return;
    }
    let d = Daemon::start_with(&config(free_port()), &[("jwt.key", KEY)]);
    let outside = EchoServer::start("127.0.0.9:0");
    let port = outside.addr.port();
    let api = Upstream::start("127.0.0.3:0");

    // exec refuses a network socket on its standard input, and runs nothing.
    let refused = d
        .exec_command("acme", &[], &["sh", "-c", "echo ran"])
        .stdin(Stdio::from(outside_tcp_socket()))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("standard input is a socket"),
        "{}",
        text(&refused)
    );
    assert!(!stdout(&refused).contains("ran"));

    // A Unix socket (allowed) over which the test hands in a TCP socket of its own.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let script = format!(
        "{ATTEMPT}
channel = socket.socket(fileno=0)
_, fds, _, _ = socket.recv_fds(channel, 16, 1)
passed = socket.socket(fileno=fds[0])
attempt('passed_connect', lambda: passed.connect(('127.0.0.9', {port})))
attempt('passed_sendto', lambda: passed.sendto(b'x', ('127.0.0.9', {port})))
srh = bytes([17, 2, 4, 0, 0, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, '::1')
attempt('rthdr', lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).setsockopt(socket.IPPROTO_IPV6, 57, srh))
attempt('ip_options', lambda: socket.socket().setsockopt(socket.IPPROTO_IP, 4, bytes([1, 1, 1, 0])))
attempt('vsock', lambda: socket.socket(40, socket.SOCK_STREAM))
import urllib.request
print('own=' + urllib.request.urlopen('http://svc.test:{api}/own', timeout=10).read().decode(), flush=True)
",
        api = api.port()
    );
    let sandbox = d
        .exec_command("acme", &[], &["python3", "-c", &script])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let handed_in = outside_tcp_socket();
    let fds = [handed_in.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(
        ours.as_raw_fd(),
        &[std::io::IoSlice::new(b"fd")],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    let out = sandbox.wait_with_output().unwrap();
    let text = text(&out);
    expect(&text, "passed_connect", "EPERM");
    assert_ne!(
        key_values(&text).get("passed_sendto").map(String::as_str),
        Some("ok"),
        "{text}"
    );
    expect(&text, "rthdr", "EPERM");
    expect(&text, "ip_options", "EPERM");
    assert_ne!(
        key_values(&text).get("vsock").map(String::as_str),
        Some("ok"),
        "{text}"
    );
    assert_eq!(outside.connections(), 0, "a handed-in socket got out");
    // The sandbox's own request went through the relay, credential added.
    let seen = api.requests();
    assert_eq!(seen.len(), 1, "{text}");
    assert!(seen[0].header("authorization").is_some());
    let status = d.status();
    assert!(
        status["enforcement"]["calls_refused"].as_u64().unwrap() >= 3,
        "{status:#}"
    );
}

/// An unconnected TCP socket of the test's own (outside every sandbox).
fn outside_tcp_socket() -> OwnedFd {
    // SAFETY: plain socket(2); the descriptor is owned here alone.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One tenant's sandboxes together hold no more inet sockets than
/// `sandbox_limits.nofile` (so one tenant cannot take every ephemeral port
/// from the others), and what they give back counts again.
#[test]
fn a_tenant_holds_no_more_sockets_than_its_limit() {
    if !privileged("a_tenant_holds_no_more_sockets_than_its_limit") {
        return;
    }
    let d = Daemon::start_configured(
        "sandbox_limits = { nofile = 64, nproc = 512 }",
        "[tenants.acme]\n[tenants.other]\n",
        &[],
    );
    let script = "import errno, socket, sys, time
held, err = [], 'none'
for _ in range(50):
    try:
        held.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
print('held=%d' % len(held), flush=True)
print('err=' + err, flush=True)
time.sleep(float(sys.argv[1]))
";
    let mut first = d
        .exec_command("acme", &[], &["python3", "-c", script, "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut lines, &mut line).unwrap();
    assert_eq!(line.trim(), "held=50");

    // The same tenant's second sandbox gets what is left of 64.
    let second = stdout(&d.exec("acme", &[], &["python3", "-c", script, "0"]));
    let second = key_values(&second);
    assert_eq!(second["held"], "14", "{second:?}");
    assert_eq!(second["err"], "EPERM", "{second:?}");
    // Another tenant is not affected.
    let other = key_values(&stdout(&d.exec(
        "other",
        &[],
        &["python3", "-c", script, "0"],
    )));
    assert_eq!(other["held"], "50", "{other:?}");

    first.wait().unwrap();
    let again = key_values(&stdout(&d.exec(
        "acme",
        &[],
        &["python3", "-c", script, "0"],
    )));
    assert_eq!(
        again["held"], "50",
        "sockets given back count again: {again:?}"
    );
}
