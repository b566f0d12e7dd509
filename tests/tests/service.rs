//! Running under systemd: `Type=notify` readiness, and `SIGHUP` (the unit's
//! `ExecReload`) never ending the daemon. One test in this binary: it sets
//! `NOTIFY_SOCKET` for the daemons it starts.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use interceptor_tests::*;

fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification within 30 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// READY=1 comes once the relay accepts; a SIGHUP leaves the daemon serving;
/// a stop says STOPPING=1.
#[test]
fn the_service_manager_hears_ready_only_once_the_relay_serves() {
    if !privileged("the_service_manager_hears_ready_only_once_the_relay_serves") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // SAFETY (edition 2021: a plain call): this binary's only test sets it.
    std::env::set_var("NOTIFY_SOCKET", &path);
    let mut d = Daemon::start("[tenants.acme]\n");

    let ready = next_message(&manager);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    std::net::TcpStream::connect(("127.0.0.1", d.relay_port))
        .expect("the relay accepts once ready");

    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    let status = d.status();
    assert_eq!(
        status["pid"].as_u64(),
        Some(u64::from(d.pid())),
        "{status:#}"
    );
    assert!(
        d.daemon_stderr().contains("SIGHUP"),
        "{}",
        d.daemon_stderr()
    );

    let exit = d.stop_with(libc::SIGTERM);
    assert!(exit.success(), "{exit}");
    let stopping = next_message(&manager);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
}
