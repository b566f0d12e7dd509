//! Tenants apart, end to end: with `sandbox_uids`, each tenant and each User
//! Worker runs as a uid of its own (the same after a restart), so files and
//! Unix sockets of one are closed to the others; every sandbox has its own IPC
//! namespace, its rlimits, and a syscall filter that refuses new namespaces,
//! io_uring and socket families other than Unix, IPv4, IPv6 and
//! netlink-route. Real daemon, real `exec` sandboxes, a real Worker process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use interceptor_tests::*;

const TENANTS: &str = "
[tenants.alpha]
[tenants.beta]
";

/// A uid range of the test's own (`n` picks it), far from any account.
fn uids(n: u32) -> (u32, u32) {
    let first = 3_000_100_000 + n * 1000;
    (first, first + 99)
}

fn start(n: u32, extra: &str, rest: &str) -> Daemon {
    let (first, last) = uids(n);
    let d = Daemon::start_configured(
        &format!("sandbox_uids = \"{first}-{last}\"\n{extra}"),
        rest,
        &[],
    );
    // A directory every tenant may write to, like /tmp.
    let shared = d.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(
        &shared,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    d
}

fn shared(d: &Daemon) -> PathBuf {
    d.dir.path().join("shared")
}

/// `sh -c SCRIPT` in the tenant's sandbox; (exit code, stdout, stderr).
fn sh(d: &Daemon, tenant: &str, script: &str) -> (i32, String, String) {
    let out = d.exec(tenant, &[], &["sh", "-c", script]);
    (
        out.status.code().unwrap_or(-1),
        stdout(&out).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn id_of(d: &Daemon, tenant: &str) -> (u32, u32) {
    let (code, out, err) = sh(d, tenant, "id -u; id -g; id -G");
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[1], lines[2], "no supplementary groups: {out}");
    (lines[0].parse().unwrap(), lines[1].parse().unwrap())
}

/// A sandboxed Python script started in the background; its stdout is read
/// line by line.
struct Background {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Background {
    fn start(d: &Daemon, tenant: &str, script: &str) -> Background {
        let mut child = d
            .exec_command(tenant, &[], &["python3", "-u", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Background { child, lines }
    }

    fn line(&mut self) -> String {
        self.lines
            .next()
            .expect("the background script printed a line")
            .unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn each_tenant_runs_as_a_uid_of_its_own_kept_across_a_restart() {
    if !privileged("each_tenant_runs_as_a_uid_of_its_own_kept_across_a_restart") {
        return;
    }
    let (first, last) = uids(0);
    let mut d = start(0, "", TENANTS);
    let alpha = id_of(&d, "alpha");
    let beta = id_of(&d, "beta");
    assert_ne!(alpha.0, beta.0);
    for (uid, gid) in [alpha, beta] {
        assert!((first..=last).contains(&uid), "{uid}");
        assert_eq!(uid, gid, "gid is the same number");
    }
    assert_eq!(id_of(&d, "alpha"), alpha, "every exec of a tenant");

    // status says which.
    let status = d.status();
    assert_eq!(status["sandbox_uids"], format!("{first}-{last}"));
    assert_eq!(status["uids"]["tenant:alpha"], alpha.0, "{status:#}");
    assert_eq!(status["uids"]["tenant:beta"], beta.0, "{status:#}");
    let table = stdout(
        &std::process::Command::new(interceptor_bin())
            .args(["status", "--config"])
            .arg(&d.config)
            .output()
            .unwrap(),
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("alpha "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.ends_with(&format!(" {}", alpha.0)), "{table}");
    assert!(table.contains(" UID"), "{table}");

    // Recorded root-only, and the same after a restart.
    let file = d.log_dir.join("sandbox-uids.json");
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    }
    d.stop_with(libc::SIGTERM);
    d.spawn();
    assert_eq!(id_of(&d, "alpha"), alpha);
    assert_eq!(id_of(&d, "beta"), beta);
}

#[test]
fn a_tenants_private_file_is_closed_to_another_tenant() {
    if !privileged("a_tenants_private_file_is_closed_to_another_tenant") {
        return;
    }
    let d = start(1, "", TENANTS);
    let file = shared(&d).join("alpha-secret");
    let f = file.display();
    let (code, out, err) = sh(
        &d,
        "alpha",
        &format!("umask 077; echo alpha-only > {f} && cat {f}"),
    );
    assert_eq!((code, out.as_str()), (0, "alpha-only"), "{err}");
    let (code, out, err) = sh(&d, "beta", &format!("cat {f}"));
    assert_ne!(code, 0, "beta read alpha's file: {out}");
    assert!(err.contains("Permission denied"), "{err}");
    // Nor can beta remove it from the shared (sticky) directory.
    let (code, _, err) = sh(&d, "beta", &format!("rm -f {f}"));
    assert_ne!(code, 0, "{err}");
    assert!(file.exists());
    // alpha, in a later sandbox, still can: the uid is the tenant's.
    let (code, out, _) = sh(&d, "alpha", &format!("cat {f}"));
    assert_eq!((code, out.as_str()), (0, "alpha-only"));
}

#[test]
fn a_unix_socket_server_serves_its_own_tenant_and_refuses_another() {
    if !privileged("a_unix_socket_server_serves_its_own_tenant_and_refuses_another") {
        return;
    }
    let d = start(2, "", TENANTS);
    let path = shared(&d).join("alpha.sock");
    let client = format!(
        "import socket,errno\n\
         s=socket.socket(socket.AF_UNIX)\n\
         try:\n  s.connect({path:?}); print(s.recv(100).decode())\n\
         except OSError as e: print(errno.errorcode[e.errno])\n",
        path = path.display().to_string()
    );
    let mut server = Background::start(
        &d,
        "alpha",
        &format!(
            "import socket,threading,time\n\
             s=socket.socket(socket.AF_UNIX); s.bind({path:?}); s.listen(8)\n\
             def serve():\n\
             \x20 while True:\n\
             \x20\x20 c,_=s.accept(); c.sendall(b'hello from alpha'); c.close()\n\
             threading.Thread(target=serve,daemon=True).start()\n\
             print('ready')\n\
             time.sleep(30)\n",
            path = path.display().to_string()
        ),
    );
    assert_eq!(server.line(), "ready");
    // Control: another sandbox of alpha's connects.
    let own = d.python("alpha", &client);
    assert_eq!(stdout(&own).trim(), "hello from alpha", "{}", text(&own));
    // beta may not write to alpha's socket file.
    let other = d.python("beta", &client);
    assert_eq!(stdout(&other).trim(), "EACCES", "{}", text(&other));
    // Nor signal alpha's server.
    let python = descendants(server.child.id())
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("python"))
        })
        .expect("the sandboxed server");
    let (code, _, err) = sh(&d, "beta", &format!("kill -TERM {python}"));
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(Path::new(&format!("/proc/{python}")).exists());
}

#[test]
fn a_sysv_message_queue_of_one_sandbox_is_invisible_to_another() {
    if !privileged("a_sysv_message_queue_of_one_sandbox_is_invisible_to_another") {
        return;
    }
    let d = start(3, "", TENANTS);
    // The key and a mode open to all: only the namespace keeps beta out.
    let key = 0x1c7e_5eed;
    let mut owner = Background::start(
        &d,
        "alpha",
        &format!(
            "import ctypes,time,errno\n\
             libc=ctypes.CDLL(None,use_errno=True)\n\
             q=libc.msgget({key},0o1666)\n\
             class M(ctypes.Structure): _fields_=[('t',ctypes.c_long),('x',ctypes.c_char*16)]\n\
             m=M(1,b'alpha-data')\n\
             r=libc.msgsnd(q,ctypes.byref(m),16,0)\n\
             print('sent' if q>=0 and r==0 else 'error '+errno.errorcode[ctypes.get_errno()])\n\
             time.sleep(30)\n"
        ),
    );
    assert_eq!(owner.line(), "sent");
    let probe = format!(
        "import ctypes,errno\n\
         libc=ctypes.CDLL(None,use_errno=True)\n\
         q=libc.msgget({key},0)\n\
         print('found' if q>=0 else errno.errorcode[ctypes.get_errno()])\n\
         print(len(open('/proc/sysvipc/msg').read().splitlines())-1)\n"
    );
    for tenant in ["beta", "alpha"] {
        // alpha's next sandbox too: every sandbox has its own namespace.
        let out = d.python(tenant, &probe);
        assert_eq!(stdout(&out), "ENOENT\n0\n", "{tenant}: {}", text(&out));
    }
    // Control: the queue is there, in its own sandbox (its namespace).
    let pid = owner.child.id();
    let sandboxed: Vec<u32> = descendants(pid);
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/ipc")).unwrap();
    let inner = sandboxed
        .iter()
        .copied()
        .find(|p| ns(*p) != ns(pid))
        .expect("the sandboxed python");
    let listed = std::process::Command::new("nsenter")
        .args(["-t", &inner.to_string(), "-i", "ipcs", "-q"])
        .output()
        .unwrap();
    assert!(
        stdout(&listed).contains(&format!("{key:#010x}")),
        "{}",
        text(&listed)
    );
}

/// Pids of every process below `pid` (children, grandchildren...).
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

#[test]
fn no_new_namespaces_io_uring_or_other_socket_families_inside_a_sandbox() {
    if !privileged("no_new_namespaces_io_uring_or_other_socket_families_inside_a_sandbox") {
        return;
    }
    let d = start(4, "", TENANTS);
    let (code, out, err) = sh(&d, "alpha", "unshare -Ur id -u");
    assert_ne!(code, 0, "unshare -Ur worked: {out}");
    assert!(err.contains("Operation not permitted"), "{err}");
    let script = format!(
        "import ctypes,socket,errno\n\
         libc=ctypes.CDLL(None,use_errno=True)\n\
         def call(name,*args):\n\
         \x20 r=libc.syscall(*args)\n\
         \x20 print(name, 'ok' if r>=0 else errno.errorcode[ctypes.get_errno()])\n\
         call('unshare-net',{unshare},0x40000000)\n\
         call('unshare-mount',{unshare},0x20000)\n\
         p=(ctypes.c_ubyte*120)()\n\
         call('io_uring_setup',{io_uring_setup},8,p)\n\
         def sock(name,*args):\n\
         \x20 try:\n\
         \x20\x20 socket.socket(*args).close(); print(name,'ok')\n\
         \x20 except OSError as e: print(name, errno.errorcode[e.errno])\n\
         sock('vsock',40,1,0)\n\
         sock('netlink-audit',16,3,9)\n\
         sock('netlink-route',16,3,0)\n\
         sock('unix',1,1,0)\n\
         sock('inet6',10,1,0)\n\
         print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n",
        unshare = libc::SYS_unshare,
        io_uring_setup = libc::SYS_io_uring_setup,
    );
    let out = d.python("alpha", &script);
    assert_eq!(
        stdout(&out),
        "unshare-net EPERM\nunshare-mount EPERM\nio_uring_setup ENOSYS\n\
         vsock EPERM\nnetlink-audit EPERM\nnetlink-route ok\nunix ok\ninet6 ok\n2\n",
        "{}",
        text(&out)
    );
    // Control: getaddrinfo (netlink-route, then a DNS query the daemon answers).
    let out = d.python(
        "alpha",
        "import socket\nprint(socket.getaddrinfo('localhost',80)[0][4][0])\n",
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn sandbox_limits_are_the_rlimits_inside() {
    if !privileged("sandbox_limits_are_the_rlimits_inside") {
        return;
    }
    // bash: dash's ulimit has no -u.
    let script = "exec bash -c 'ulimit -Sn; ulimit -Hn; ulimit -Su; ulimit -Hu'";
    let d = start(5, "", TENANTS);
    let (code, out, err) = sh(&d, "alpha", script);
    assert_eq!((code, out.as_str()), (0, "4096\n4096\n512\n512"), "{err}");
    drop(d);
    let d = start(
        6,
        "sandbox_limits = { nofile = 1000, nproc = 300 }",
        TENANTS,
    );
    let (code, out, err) = sh(&d, "alpha", script);
    assert_eq!((code, out.as_str()), (0, "1000\n1000\n300\n300"), "{err}");
    // Not raised again from inside.
    let (code, _, err) = sh(&d, "alpha", "ulimit -n 2000");
    assert_ne!(code, 0, "{err}");
}

fn get(port: u16, host: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

fn proc_field(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
fn a_worker_process_runs_as_a_uid_of_its_own_in_its_own_ipc_namespace() {
    if !privileged("a_worker_process_runs_as_a_uid_of_its_own_in_its_own_ipc_namespace") {
        return;
    }
    if !example_worker("hello").exists() {
        let message = "the example Worker hello is not built (`cargo xtask test` builds it)";
        if std::env::var("INTERCEPTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("{message}");
        }
        eprintln!("skipping: {message}");
        return;
    }
    let port = free_port();
    let (first, last) = uids(7);
    let mut d = start(
        7,
        "",
        &format!(
            "{TENANTS}\n[[dispatch_namespaces]]\nnamespace = \"customers\"\n\
             listen = \"127.0.0.1:{port}\"\nworkers = \"{{dir}}/workers\"\n"
        ),
    );
    let workers = d.dir.path().join("workers");
    std::fs::create_dir_all(&workers).unwrap();
    std::fs::copy(example_worker("hello"), workers.join("hello.wasm")).unwrap();

    let worker_pid = |d: &Daemon| -> u32 {
        let reply = get(port, "hello.example.com");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        let procs = d.cgroup.join("customers/hello/cgroup.procs");
        let pids: Vec<u32> = std::fs::read_to_string(procs)
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        assert_eq!(pids.len(), 1, "{pids:?}");
        pids[0]
    };
    let pid = worker_pid(&d);
    let uid: u32 = proc_field(pid, "Uid:")[0].parse().unwrap();
    assert_eq!(proc_field(pid, "Uid:"), vec![uid.to_string(); 4]);
    assert_eq!(proc_field(pid, "Gid:"), vec![uid.to_string(); 4]);
    assert!((first..=last).contains(&uid), "{uid}");
    assert_ne!(uid, id_of(&d, "alpha").0);
    assert_ne!(uid, id_of(&d, "beta").0);
    assert_eq!(proc_field(pid, "Seccomp:"), vec!["2"]);
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/ipc")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("4096")),
        "{limits}"
    );

    let status = d.status();
    assert_eq!(status["uids"]["worker:customers/hello"], uid, "{status:#}");
    assert_eq!(
        status["dispatch"][0]["workers"][0]["uid"], uid,
        "{status:#}"
    );

    // The same uid for the Worker's process after a restart.
    d.stop_with(libc::SIGTERM);
    d.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let reply = get(port, "hello.example.com");
        if reply.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break worker_pid(&d);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(proc_field(pid, "Uid:")[0], uid.to_string());
}
