//! The command line's bad-input behaviour: one line naming the cause, exit 2 for
//! usage and configuration errors, 1 for the rest.

use std::process::Command;

use interceptor_tests::*;

fn interceptor(args: &[&str]) -> std::process::Output {
    Command::new(interceptor_bin())
        .args(args)
        .env_remove("INTERCEPTOR_CONFIG")
        .output()
        .unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_points_at_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[interceptor]\nrelay = \"127.0.0.1:15001\"\n\n[outbound.egress]\ndefault = \"allow\"\nallow_cidrs = [\"10.0.0.0/33\"]\n",
    )
    .unwrap();
    let out = interceptor(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let first = stderr(&out).lines().next().unwrap_or("").to_string();
    assert!(
        first.starts_with(&format!("{}:6:", bad.display())),
        "{first}"
    );

    std::fs::write(&bad, "[interceptor]\nrelay = \n").unwrap();
    let out = interceptor(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(&format!("{}:2:", bad.display())),
        "{}",
        stderr(&out)
    );

    std::fs::write(&bad, "[interceptor]\nrelya = \"127.0.0.1:1\"\n").unwrap();
    let out = interceptor(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(&format!("{}:2:1:", bad.display())),
        "{}",
        stderr(&out)
    );

    let out = interceptor(&["check", "--config", "/nonexistent/interceptor.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/interceptor.toml"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));

    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/interceptor.toml");
    let out = interceptor(&["check", "--config", example.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn exec_without_a_daemon_or_with_an_unknown_tenant_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[interceptor]\nadmin_socket = \"{0}/admin.sock\"\nlog_dir = \"{0}/logs\"\n[tenants.acme]\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = interceptor(&[
        "exec",
        "--config",
        config.to_str().unwrap(),
        "--tenant",
        "acme",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1);

    let out = interceptor(&[
        "logs",
        "--tenant",
        "nobody-here",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown tenant"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    // A configured tenant has an empty log before its first request, even before
    // the daemon first made the log folder.
    let out = interceptor(&[
        "logs",
        "--tenant",
        "acme",
        "--json",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");

    if !privileged("exec_with_an_unknown_tenant") {
        return;
    }
    let d = Daemon::start("[tenants.acme]\n");
    let out = interceptor(&[
        "exec",
        "--config",
        d.config.to_str().unwrap(),
        "--tenant",
        "ghost",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("ghost"), "{}", stderr(&out));
    let out = interceptor(&[
        "exec",
        "--config",
        d.config.to_str().unwrap(),
        "--tenant",
        "acme",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));

    // A user other than root reaches no running daemon, and is told why (not
    // that the daemon is not running).
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(interceptor_bin())
            .args(["status", "--config"])
            .arg(&d.config)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("root-only"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));

    // A second daemon on the same ports fails with one line naming the cause.
    let out = interceptor(&["run", "--config", d.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
}
