use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn full_entry() -> LogEntry {
    let mut params = BTreeMap::new();
    params.insert("customer_name".to_owned(), "acme".to_owned());
    params.insert("url".to_owned(), "https://acme.example/x?y=1".to_owned());
    LogEntry {
        ts: time::macros::datetime!(2024-05-01 12:34:56.789 UTC),
        tenant: "acme".to_owned(),
        worker: Some("acme".to_owned()),
        pid: Some(4242),
        proto: Proto::Http,
        method: Some("POST".to_owned()),
        url: Some("http://api.example.com/v1/items?q=1".to_owned()),
        host: Some("api.example.com".to_owned()),
        dst: "[2001:db8::1]:80".to_owned(),
        upstream: Some("127.0.0.2:80".to_owned()),
        decision: Verdict::Allow,
        rule: "allow:api.example.com".to_owned(),
        status: Some(201),
        bytes_sent: 123,
        bytes_received: 4567,
        duration_ms: 89,
        params,
        error: None,
    }
}

/// An entry of `tenant` at `secs_ago` seconds before now, numbered `n` (in `rule`).
fn entry_at(tenant: &str, secs_ago: i64, n: usize, decision: Verdict) -> LogEntry {
    let mut e = LogEntry::new(tenant, Proto::Tcp, addr("10.0.0.1:443"))
        .with_decision(decision, format!("n{n}"));
    e.ts = super::entry::now_ms() - time::Duration::seconds(secs_ago);
    e
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn query(tenant: Option<&str>) -> LogQuery {
    LogQuery {
        tenant: tenant.map(str::to_owned),
        json: true,
        ..LogQuery::default()
    }
}

fn run_query(dir: &Path, q: &LogQuery) -> Result<String, LogError> {
    let mut out = Vec::new();
    print_logs(dir, q, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

fn rules(json_out: &str) -> Vec<String> {
    json_out
        .lines()
        .map(|l| LogEntry::from_json_line(l).unwrap().rule)
        .collect()
}

#[test]
fn round_trip_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    let w = LogWriter::open(&dir, 1 << 20, 3).unwrap();
    let e = full_entry();
    w.write(&e).unwrap();
    w.flush().unwrap();

    let lines = read_lines(&dir.join("acme.jsonl"));
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "ts",
        "tenant",
        "worker",
        "pid",
        "proto",
        "method",
        "url",
        "host",
        "dst",
        "upstream",
        "decision",
        "rule",
        "status",
        "bytes_sent",
        "bytes_received",
        "duration_ms",
        "params",
        "error",
    ];
    expected.sort();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort();
    assert_eq!(keys_sorted, expected);
    assert_eq!(v["ts"], "2024-05-01T12:34:56.789Z");
    assert_eq!(v["proto"], "http");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["dst"], "[2001:db8::1]:80");
    assert_eq!(v["params"]["customer_name"], "acme");
    assert_eq!(LogEntry::from_json_line(&lines[0]).unwrap(), e);

    // --json prints the stored line exactly.
    let out = run_query(&dir, &query(Some("acme"))).unwrap();
    assert_eq!(out, format!("{}\n", lines[0]));
}

#[test]
fn absent_fields_are_null_and_keys_stable() {
    let e = LogEntry::new("t", Proto::Dns, addr("[::1]:53"));
    let line = e.to_json_line().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 18);
    for k in [
        "worker", "pid", "method", "url", "host", "upstream", "status", "error",
    ] {
        assert!(obj[k].is_null(), "{k} should be null in {line}");
    }
    assert_eq!(v["dst"], "[::1]:53");
    assert_eq!(v["proto"], "dns");
    assert_eq!(v["params"], serde_json::json!({}));
    // ts: RFC 3339, UTC, milliseconds.
    let ts = v["ts"].as_str().unwrap();
    assert_eq!(ts.len(), 24, "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    assert_eq!(LogEntry::from_json_line(&line).unwrap(), e);
}

#[test]
fn lenient_parsing_of_older_or_foreign_lines() {
    let e = LogEntry::from_json_line(
        r#"{"ts":"2024-05-01T14:00:00.5+02:00","tenant":"a","proto":"tls","dst":"1.2.3.4:443","decision":"block","extra":1}"#,
    )
    .unwrap();
    assert_eq!(e.ts, time::macros::datetime!(2024-05-01 12:00:00.5 UTC));
    assert_eq!(e.decision, Verdict::Block);
    assert!(e.params.is_empty() && e.status.is_none());
    assert!(LogEntry::from_json_line(r#"{"tenant":"a"}"#).is_err());
    assert!(LogEntry::from_json_line(
        r#"{"ts":"2024-05-01T12:00:00Z","tenant":"a","proto":"quic","dst":"x","decision":"allow"}"#
    )
    .is_err());
}

#[test]
fn url_credentials_are_never_written() {
    assert_eq!(
        redact_url("https://u:secret@h.example/p?q#f"),
        "https://h.example/p?q#f"
    );
    assert_eq!(redact_url("http://h.example/a@b"), "http://h.example/a@b");
    assert_eq!(redact_url("/relative@x"), "/relative@x");
    let mut e = LogEntry::new("t", Proto::Http, addr("1.2.3.4:80"));
    e.url = Some("http://user:hunter2@h.example/".to_owned());
    let line = e.to_json_line().unwrap();
    assert!(!line.contains("hunter2"), "{line}");
    assert!(line.contains(r#""url":"http://h.example/""#), "{line}");
}

#[test]
fn enums_parse_and_display() {
    assert_eq!("block".parse::<Verdict>().unwrap(), Verdict::Block);
    assert_eq!("ALLOW".parse::<Verdict>().unwrap(), Verdict::Allow);
    let err = "deny".parse::<Verdict>().unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("allow, block or error"));
    assert_eq!("tls".parse::<Proto>().unwrap(), Proto::Tls);
    assert_eq!(Proto::Dns.to_string(), "dns");
    assert_eq!(Verdict::Error.to_string(), "error");
}

#[test]
fn writer_creates_dir_and_files_with_restricted_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b");
    let w = LogWriter::open(&dir, 0, 0).unwrap();
    w.write(&entry_at("t1", 0, 0, Verdict::Allow)).unwrap();
    let dmode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    let fmode = fs::metadata(dir.join("t1.jsonl"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode & !0o750, 0, "dir mode {dmode:o}");
    assert_eq!(fmode & !0o640, 0, "file mode {fmode:o}");
}

#[test]
fn writer_refuses_bad_tenant_names() {
    let tmp = tempfile::tempdir().unwrap();
    let w = LogWriter::open(tmp.path(), 0, 0).unwrap();
    for bad in ["", "../x", "a/b", ".hidden", "..", "a\0b", &"x".repeat(201)] {
        let e = entry_at(bad, 0, 0, Verdict::Allow);
        assert!(
            matches!(w.write(&e), Err(LogError::InvalidTenant(_))),
            "{bad:?} accepted"
        );
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn writer_open_fails_cleanly_on_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("file");
    fs::write(&f, "x").unwrap();
    let err = LogWriter::open(&f, 0, 0).unwrap_err();
    assert!(err.to_string().contains("file"), "{err}");
    assert_eq!(err.exit_code(), 1);
}

#[test]
fn rotation_keeps_the_newest_files_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let line_len = entry_at("r", 0, 10, Verdict::Allow)
        .to_json_line()
        .unwrap()
        .len()
        + 1;
    // Three lines per file.
    let w = LogWriter::open(dir, 3 * line_len as u64 + 2, 2).unwrap();
    for n in 10..30 {
        w.write(&entry_at("r", 0, n, Verdict::Allow)).unwrap();
    }
    let cur = read_lines(&dir.join("r.jsonl"));
    let one = read_lines(&dir.join("r.jsonl.1"));
    let two = read_lines(&dir.join("r.jsonl.2"));
    assert!(!dir.join("r.jsonl.3").exists());
    assert_eq!(one.len(), 3);
    assert_eq!(two.len(), 3);
    // 20 entries, 3 per file: n10..n27 in six full files, n28, n29 in the current one.
    assert_eq!(cur.len(), 2);
    for f in [&cur, &one, &two] {
        for l in f.iter() {
            LogEntry::from_json_line(l).unwrap();
        }
    }
    for size in [
        fs::metadata(dir.join("r.jsonl")).unwrap().len(),
        fs::metadata(dir.join("r.jsonl.1")).unwrap().len(),
    ] {
        assert!(size <= 3 * line_len as u64 + 2);
    }
    let out = run_query(dir, &query(Some("r"))).unwrap();
    let expected: Vec<String> = (22..30).map(|n| format!("n{n}")).collect();
    assert_eq!(rules(&out), expected);
}

#[test]
fn rotation_with_keep_zero_drops_old_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = LogWriter::open(dir, 10, 0).unwrap();
    for n in 0..3 {
        w.write(&entry_at("z", 0, n, Verdict::Allow)).unwrap();
    }
    // Each line is larger than max_bytes: it is written anyway, alone.
    assert_eq!(read_lines(&dir.join("z.jsonl")).len(), 1);
    assert!(!dir.join("z.jsonl.1").exists());
    assert_eq!(rules(&run_query(dir, &query(Some("z"))).unwrap()), ["n2"]);
}

#[test]
fn writer_reopens_a_file_removed_behind_its_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = LogWriter::open(dir, 0, 0).unwrap();
    w.write(&entry_at("x", 0, 1, Verdict::Allow)).unwrap();
    fs::rename(dir.join("x.jsonl"), dir.join("x.old")).unwrap();
    // The path is checked against the open file every RECHECK_EVERY, not per line.
    std::thread::sleep(super::writer::RECHECK_EVERY + std::time::Duration::from_millis(50));
    w.write(&entry_at("x", 0, 2, Verdict::Allow)).unwrap();
    assert_eq!(read_lines(&dir.join("x.jsonl")).len(), 1);
    assert_eq!(read_lines(&dir.join("x.old")).len(), 1);
}

#[test]
fn many_tenants_do_not_exhaust_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = LogWriter::open(dir, 0, 0).unwrap();
    for round in 0..2 {
        for t in 0..300 {
            w.write(&entry_at(&format!("t{t}"), 0, round, Verdict::Allow))
                .unwrap();
        }
    }
    assert!(w.cached_files() <= 128);
    for t in [0, 150, 299] {
        assert_eq!(read_lines(&dir.join(format!("t{t}.jsonl"))).len(), 2);
    }
}

#[test]
fn concurrent_writers_produce_whole_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    // Rotation on, with enough files kept that nothing is dropped.
    let w = Arc::new(LogWriter::open(&dir, 16 * 1024, 1000).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                for n in 0..250 {
                    let mut e = entry_at("shared", 0, t * 1000 + n, Verdict::Allow);
                    e.url = Some(format!("http://h/{}", "x".repeat(n % 97)));
                    w.write(&e).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    w.flush().unwrap();
    let mut total = 0;
    for ent in fs::read_dir(&dir).unwrap() {
        let p = ent.unwrap().path();
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.ends_with('\n'));
        for l in text.lines() {
            LogEntry::from_json_line(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display()));
            total += 1;
        }
    }
    assert_eq!(total, 2000);
    let out = run_query(&dir, &query(Some("shared"))).unwrap();
    assert_eq!(out.lines().count(), 2000);
    // Per thread, entries keep their order.
    let mut last = [None::<usize>; 8];
    for r in rules(&out) {
        let n: usize = r[1..].parse().unwrap();
        let (t, i) = (n / 1000, n % 1000);
        assert!(last[t].is_none_or(|p| p < i), "thread {t} out of order");
        last[t] = Some(i);
    }
}

#[test]
fn filters_since_decision_and_tenant() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = LogWriter::open(dir, 0, 0).unwrap();
    w.write(&entry_at("a", 7200, 1, Verdict::Allow)).unwrap();
    w.write(&entry_at("b", 3000, 2, Verdict::Block)).unwrap();
    w.write(&entry_at("a", 600, 3, Verdict::Block)).unwrap();
    w.write(&entry_at("b", 60, 4, Verdict::Allow)).unwrap();
    w.write(&entry_at("a", 10, 5, Verdict::Error)).unwrap();

    // All tenants, merged by ts.
    let all = run_query(dir, &query(None)).unwrap();
    assert_eq!(rules(&all), ["n1", "n2", "n3", "n4", "n5"]);

    let mut q = query(Some("a"));
    assert_eq!(rules(&run_query(dir, &q).unwrap()), ["n1", "n3", "n5"]);
    q.since = Some(parse_since("1h").unwrap());
    assert_eq!(rules(&run_query(dir, &q).unwrap()), ["n3", "n5"]);
    q.decision = Some(Verdict::Error);
    assert_eq!(rules(&run_query(dir, &q).unwrap()), ["n5"]);

    let mut q = query(None);
    q.decision = Some(Verdict::Block);
    assert_eq!(rules(&run_query(dir, &q).unwrap()), ["n2", "n3"]);
    q.since = Some(parse_since("5m").unwrap());
    assert_eq!(run_query(dir, &q).unwrap(), "");
    q.since = Some(Duration::MAX);
    assert_eq!(rules(&run_query(dir, &q).unwrap()), ["n2", "n3"]);
}

#[test]
fn unknown_and_invalid_tenants_and_missing_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    LogWriter::open(dir, 0, 0)
        .unwrap()
        .write(&entry_at("a", 0, 0, Verdict::Allow))
        .unwrap();
    let err = run_query(dir, &query(Some("nobody"))).unwrap_err();
    assert!(matches!(&err, LogError::UnknownTenant(t) if t == "nobody"));
    assert!(err.to_string().contains("unknown tenant `nobody`"), "{err}");
    assert_eq!(err.exit_code(), 2);

    let err = run_query(dir, &query(Some("../etc/passwd"))).unwrap_err();
    assert!(matches!(err, LogError::InvalidTenant(_)));
    assert_eq!(err.exit_code(), 2);

    let missing = dir.join("nope");
    let err = run_query(&missing, &query(None)).unwrap_err();
    assert!(matches!(err, LogError::NoLogDir(_)));
    assert!(err.to_string().contains("nope"));
    assert!(matches!(
        run_query(&missing, &query(Some("a"))).unwrap_err(),
        LogError::NoLogDir(_)
    ));

    // An empty directory is not an error: there is just nothing to show.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(run_query(empty.path(), &query(None)).unwrap(), "");
}

#[test]
fn tenant_with_only_rotated_files_is_known() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let line = entry_at("old", 5, 7, Verdict::Allow)
        .to_json_line()
        .unwrap();
    fs::write(dir.join("old.jsonl.1"), format!("{line}\n")).unwrap();
    fs::write(dir.join("unrelated.txt"), "x").unwrap();
    fs::write(dir.join("old.jsonl.bak"), "x").unwrap();
    assert_eq!(rules(&run_query(dir, &query(Some("old"))).unwrap()), ["n7"]);
    assert_eq!(rules(&run_query(dir, &query(None)).unwrap()), ["n7"]);
}

#[test]
fn corrupt_lines_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good1 = entry_at("c", 20, 1, Verdict::Allow).to_json_line().unwrap();
    let good2 = entry_at("c", 10, 2, Verdict::Allow).to_json_line().unwrap();
    let mut text = Vec::new();
    writeln!(text, "{good1}").unwrap();
    writeln!(text, "{{not json").unwrap();
    text.extend_from_slice(b"\xff\xfe\n\n");
    writeln!(text, r#"{{"ts":"yesterday","tenant":"c"}}"#).unwrap();
    text.extend_from_slice(&vec![b'x'; 3 << 20]);
    text.push(b'\n');
    writeln!(text, "{good2}").unwrap();
    text.extend_from_slice(b"{\"ts\":\"2024"); // torn last line
    fs::write(dir.join("c.jsonl"), text).unwrap();
    assert_eq!(
        rules(&run_query(dir, &query(Some("c"))).unwrap()),
        ["n1", "n2"]
    );
}

#[test]
fn unterminated_valid_last_line_is_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let l = entry_at("u", 1, 1, Verdict::Allow).to_json_line().unwrap();
    fs::write(dir.join("u.jsonl"), &l).unwrap();
    assert_eq!(run_query(dir, &query(Some("u"))).unwrap(), format!("{l}\n"));
}

#[test]
fn table_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = LogWriter::open(dir, 0, 0).unwrap();
    let mut e = full_entry();
    e.host = Some(format!("evil\x1b[31m.{}.example", "a".repeat(60)));
    w.write(&e).unwrap();
    let mut dns = LogEntry::new("acme", Proto::Dns, addr("10.0.0.53:53"))
        .with_host("x.example")
        .with_decision(Verdict::Block, "block:x.example");
    dns.error = Some("no reply from 2 resolver(s)".to_owned());
    w.write(&dns).unwrap();

    let mut q = query(Some("acme"));
    q.json = false;
    let out = run_query(dir, &q).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for col in [
        "TIME", "TENANT", "PROTO", "DECISION", "STATUS", "METHOD", "HOST", "URL/DST", "RULE",
        "DURATION", "ERROR",
    ] {
        assert!(lines[0].contains(col), "missing {col}: {}", lines[0]);
    }
    let row = lines[1];
    for want in [
        "2024-05-01T12:34:56.789Z",
        "acme",
        "http",
        "allow",
        "201",
        "POST",
        "http://api.example.com/v1/items?q=1",
        "allow:api.example.com",
        "89ms",
    ] {
        assert!(row.contains(want), "missing {want}: {row}");
    }
    assert!(
        !row.contains('\x1b'),
        "control chars must not reach the terminal"
    );
    assert!(row.contains('…'), "long host is truncated: {row}");
    // Columns line up: each column starts at the same character offset.
    let start = |l: &str, col: usize| {
        let hdr_off = lines[0].find(["RULE", "DECISION"][col]).unwrap();
        l.chars().take(hdr_off).count()
    };
    assert_eq!(start(lines[1], 0), start(lines[2], 0));
    let rule_col = lines[0].find("RULE").unwrap();
    let dns_row: String = lines[2].chars().skip(rule_col).collect();
    assert!(dns_row.starts_with("block:x.example"), "{}", lines[2]);
    assert!(lines[2].contains("10.0.0.53:53") && lines[2].contains("dns"));
    assert!(
        lines[2].ends_with("no reply from 2 resolver(s)"),
        "{}",
        lines[2]
    );
    assert!(lines[1].ends_with(" -"), "{}", lines[1]);
    let http_row: String = lines[1].chars().skip(rule_col).collect();
    assert!(
        http_row.starts_with("allow:api.example.com"),
        "{}",
        lines[1]
    );
}

#[test]
fn parse_since_accepts_humantime() {
    assert_eq!(parse_since("5m").unwrap(), Duration::from_secs(300));
    assert_eq!(parse_since("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_since("1h 30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_since("2d").unwrap(), Duration::from_secs(2 * 86400));
    assert_eq!(parse_since(" 30s ").unwrap(), Duration::from_secs(30));
    for bad in ["", "5", "abc", "-5m", "5 parsecs"] {
        let err = parse_since(bad).unwrap_err();
        assert!(matches!(err, LogError::BadSince { .. }), "{bad:?}");
        assert_eq!(err.exit_code(), 2);
        assert!(!err.to_string().contains('\n'));
    }
}

#[test]
fn closed_output_ends_quietly() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    LogWriter::open(tmp.path(), 0, 0)
        .unwrap()
        .write(&entry_at("a", 0, 0, Verdict::Allow))
        .unwrap();
    print_logs(tmp.path(), &query(None), &mut Closed).unwrap();
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    fn wait_for(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = self.text();
            if pred(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "timed out; output so far:\n{t}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn_follow(
    dir: &Path,
    q: LogQuery,
) -> (
    SharedBuf,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<(), LogError>>,
) {
    let buf = SharedBuf::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (b, s, d) = (buf.clone(), stop.clone(), dir.to_owned());
    let h = std::thread::spawn(move || {
        let mut out = b;
        follow_logs(&d, &q, &mut out, &s)
    });
    (buf, stop, h)
}

#[test]
fn follow_picks_up_appended_lines_and_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let line_len = entry_at("f", 0, 10, Verdict::Allow)
        .to_json_line()
        .unwrap()
        .len()
        + 1;
    let w = LogWriter::open(dir, 2 * line_len as u64, 3).unwrap();
    w.write(&entry_at("f", 0, 10, Verdict::Allow)).unwrap();

    let mut q = query(Some("f"));
    q.follow = true;
    q.decision = Some(Verdict::Allow);
    let (buf, stop, h) = spawn_follow(dir, q);
    buf.wait_for(|t| t.lines().count() == 1);

    w.write(&entry_at("f", 0, 11, Verdict::Allow)).unwrap();
    w.write(&entry_at("f", 0, 12, Verdict::Block)).unwrap(); // filtered out
    buf.wait_for(|t| t.lines().count() == 2);
    // These rotate the file (two lines per file) while we follow.
    for n in 13..18 {
        w.write(&entry_at("f", 0, n, Verdict::Allow)).unwrap();
    }
    let out = buf.wait_for(|t| t.lines().count() == 7);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap().unwrap();
    assert_eq!(
        rules(&out),
        ["n10", "n11", "n13", "n14", "n15", "n16", "n17"]
    );
}

#[test]
fn follow_all_tenants_sees_new_tenants_and_partial_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let w = LogWriter::open(dir, 0, 0).unwrap();
    w.write(&entry_at("a", 0, 1, Verdict::Allow)).unwrap();

    let mut q = query(None);
    q.follow = true;
    q.json = false;
    let (buf, stop, h) = spawn_follow(dir, q);
    buf.wait_for(|t| t.lines().count() == 2); // header + n1

    w.write(&entry_at("newcomer", 0, 2, Verdict::Block))
        .unwrap();
    buf.wait_for(|t| t.contains("newcomer") && t.contains("n2"));

    // A line written in two pieces is printed once, whole.
    let l = entry_at("a", 0, 3, Verdict::Allow).to_json_line().unwrap();
    let (p1, p2) = l.split_at(l.len() / 2);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(dir.join("a.jsonl"))
        .unwrap();
    f.write_all(p1.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(450));
    f.write_all(format!("{p2}\n").as_bytes()).unwrap();
    let out = buf.wait_for(|t| t.contains("n3"));
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap().unwrap();
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.lines().next().unwrap().starts_with("TIME"));
}

#[test]
fn follow_unknown_tenant_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut q = query(Some("ghost"));
    q.follow = true;
    let stop = AtomicBool::new(false);
    let err = follow_logs(tmp.path(), &q, &mut Vec::new(), &stop).unwrap_err();
    assert!(matches!(err, LogError::UnknownTenant(_)));
}

#[test]
fn entry_at_has_millisecond_ts() {
    let e = entry_at("x", 0, 0, Verdict::Allow);
    assert_eq!(e.ts.nanosecond() % 1_000_000, 0);
    assert!(e.ts <= OffsetDateTime::now_utc());
}

#[test]
fn a_configured_tenant_without_logs_has_an_empty_log_and_can_be_followed() {
    let tmp = tempfile::tempdir().unwrap();
    // Not even the folder yet: the daemon has not run with this config.
    let dir = tmp.path().join("logs");
    let known = |tenant: Option<&str>| LogQuery {
        known_tenants: vec!["quiet".to_string()],
        ..query(tenant)
    };
    assert_eq!(run_query(&dir, &known(Some("quiet"))).unwrap(), "");
    assert_eq!(run_query(&dir, &known(None)).unwrap(), "");
    let mut table = known(None);
    table.json = false;
    assert_eq!(
        run_query(&dir, &table).unwrap().lines().count(),
        1,
        "header only"
    );
    // An unknown name is still an error, and without a config a missing folder too.
    let err = run_query(&dir, &known(Some("ghost"))).unwrap_err();
    assert!(matches!(err, LogError::UnknownTenant(_)), "{err}");
    assert!(matches!(
        run_query(&dir, &query(None)).unwrap_err(),
        LogError::NoLogDir(_)
    ));

    let mut q = known(Some("quiet"));
    q.follow = true;
    let (buf, stop, h) = spawn_follow(&dir, q);
    std::thread::sleep(Duration::from_millis(300));
    let w = LogWriter::open(&dir, 0, 0).unwrap();
    w.write(&entry_at("quiet", 0, 1, Verdict::Allow)).unwrap();
    w.write(&entry_at("other", 0, 2, Verdict::Allow)).unwrap();
    let out = buf.wait_for(|t| t.lines().count() == 1);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap().unwrap();
    assert_eq!(rules(&out), ["n1"]);
    let err = run_query(&dir, &known(Some("ghost"))).unwrap_err();
    assert!(matches!(err, LogError::UnknownTenant(_)), "{err}");
}
