//! Reading logs back: `interceptor logs`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

use super::table::{table_header, table_row};
use super::writer::{current_path, validate_tenant};
use super::{LogEntry, LogError, Verdict};

/// How often `--follow` looks for new lines.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Lines longer than this are not log entries; they are skipped without being buffered.
const MAX_LINE: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

/// What `interceptor logs` was asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogQuery {
    /// One tenant, or all tenants merged by `ts`.
    pub tenant: Option<String>,
    /// Only entries with `ts >= now - since`.
    pub since: Option<Duration>,
    /// Only entries with this decision.
    pub decision: Option<Verdict>,
    /// Keep printing new entries until interrupted.
    pub follow: bool,
    /// Print the stored JSON lines instead of a table.
    pub json: bool,
    /// Tenants that exist whether or not they have logged anything yet (from the
    /// config): asking for one of them prints an empty log (and `follow` waits for its
    /// first line) where an unknown name is an error.
    pub known_tenants: Vec<String>,
}

/// Parses a `--since` duration: `30s`, `5m`, `1h30m`, `2d`, `1h 30m` (humantime syntax).
pub fn parse_since(s: &str) -> Result<Duration, LogError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(LogError::BadSince {
            input: s.to_owned(),
            reason: "empty".to_owned(),
        });
    }
    humantime::parse_duration(t).map_err(|e| LogError::BadSince {
        input: s.to_owned(),
        reason: e.to_string(),
    })
}

/// Prints the logs `query` asks for from `dir` to `out`: the stored JSON lines with
/// `json`, else a table. One tenant's entries come in file order (rotated files oldest
/// first); all tenants' are merged by `ts`.
///
/// With `query.follow` this then keeps printing new entries (flushing `out` after each)
/// and only returns on an error; use [`follow_logs`] for a follow that can be stopped.
/// A closed output (`| head`) ends it quietly with `Ok`. Corrupt lines are skipped with a
/// warning on stderr.
pub fn print_logs(dir: &Path, query: &LogQuery, out: &mut dyn Write) -> Result<(), LogError> {
    let never = AtomicBool::new(false);
    run(dir, query, out, query.follow.then_some(&never))
}

/// Like [`print_logs`] with `follow` (whatever `query.follow` says), until `stop` is set
/// (checked every poll, ~200 ms).
pub fn follow_logs(
    dir: &Path,
    query: &LogQuery,
    out: &mut dyn Write,
    stop: &AtomicBool,
) -> Result<(), LogError> {
    run(dir, query, out, Some(stop))
}

fn run(
    dir: &Path,
    query: &LogQuery,
    out: &mut dyn Write,
    follow: Option<&AtomicBool>,
) -> Result<(), LogError> {
    match run_inner(dir, query, out, follow) {
        Err(LogError::Io { err, .. }) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

fn run_inner(
    dir: &Path,
    query: &LogQuery,
    out: &mut dyn Write,
    follow: Option<&AtomicBool>,
) -> Result<(), LogError> {
    let filter = Filter::new(query);
    let following = follow.is_some();
    let mut printer = Printer {
        out,
        json: query.json,
    };

    if let Some(t) = &query.tenant {
        validate_tenant(t)?;
    }
    let known = |t: &str| query.known_tenants.iter().any(|k| k == t);
    let dir_exists = dir.is_dir();
    // A missing log folder is only an error when nothing says which tenants exist:
    // the daemon creates it at its start, so with a config it just means "no logs yet".
    if !dir_exists && query.known_tenants.is_empty() {
        return Err(LogError::NoLogDir(dir.to_owned()));
    }
    let tenants: Vec<String> = match &query.tenant {
        Some(t) => vec![t.clone()],
        None if dir_exists => list_tenants(dir)
            .map_err(|e| LogError::io(format!("cannot list {}", dir.display()), e))?
            .into_iter()
            .collect(),
        None => Vec::new(),
    };

    let mut streams = Vec::with_capacity(tenants.len());
    // Known tenants without a log file yet: followed from their first line.
    let mut not_yet = Vec::new();
    for t in &tenants {
        let stream = if dir_exists {
            TenantStream::open(dir, t, following).map_err(|e| {
                LogError::io(
                    format!("cannot read logs of tenant `{t}` in {}", dir.display()),
                    e,
                )
            })?
        } else {
            None
        };
        match stream {
            Some(s) => streams.push(s),
            None if known(t) => not_yet.push(t.clone()),
            None if query.tenant.is_some() => return Err(LogError::UnknownTenant(t.clone())),
            None => {}
        }
    }

    printer.header()?;
    if streams.len() == 1 {
        while let Some(rec) = streams[0].next(&filter).map_err(read_err)? {
            printer.record(&rec)?;
        }
    } else {
        // k-way merge by ts; ties go to the tenant that sorts first.
        let mut heads: Vec<Option<Record>> = Vec::with_capacity(streams.len());
        let mut heap = BinaryHeap::new();
        for (i, s) in streams.iter_mut().enumerate() {
            let head = s.next(&filter).map_err(read_err)?;
            if let Some(r) = &head {
                heap.push(Reverse((r.entry.ts, i)));
            }
            heads.push(head);
        }
        while let Some(Reverse((_, i))) = heap.pop() {
            if let Some(rec) = heads[i].take() {
                printer.record(&rec)?;
            }
            heads[i] = streams[i].next(&filter).map_err(read_err)?;
            if let Some(r) = &heads[i] {
                heap.push(Reverse((r.entry.ts, i)));
            }
        }
    }
    printer.flush()?;

    let Some(stop) = follow else {
        return Ok(());
    };
    let mut tails: BTreeMap<String, Tail> = streams
        .into_iter()
        .map(|s| (s.tenant.clone(), s.into_tail()))
        .collect();
    for t in not_yet {
        let tail = Tail::new(dir, &t);
        tails.insert(t, tail);
    }
    let mut batch = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if query.tenant.is_none() {
            // Tenants whose first entry came after we started.
            if let Ok(now) = list_tenants(dir) {
                for t in now {
                    let tail = Tail::new(dir, &t);
                    tails.entry(t).or_insert(tail);
                }
            }
        }
        for tail in tails.values_mut() {
            // A file that is briefly unreadable (being rotated) is retried next poll.
            if let Err(e) = tail.poll(&filter, &mut batch) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(read_err(e));
                }
            }
        }
        batch.sort_by_key(|r: &Record| r.entry.ts);
        for rec in batch.drain(..) {
            printer.record(&rec)?;
            printer.flush()?;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

fn read_err(e: io::Error) -> LogError {
    LogError::io("cannot read log file", e)
}

/// Tenants with a current or rotated log file in `dir`, sorted.
fn list_tenants(dir: &Path) -> io::Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let tenant = if let Some(t) = name.strip_suffix(".jsonl") {
            t
        } else if let Some((base, n)) = name.rsplit_once('.') {
            match base.strip_suffix(".jsonl") {
                Some(t) if is_rotation_suffix(n) => t,
                _ => continue,
            }
        } else {
            continue;
        };
        if validate_tenant(tenant).is_ok() {
            out.insert(tenant.to_owned());
        }
    }
    Ok(out)
}

fn is_rotation_suffix(n: &str) -> bool {
    !n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit())
}

/// Rotated files of `tenant` (`<tenant>.jsonl.N`), oldest (highest N) first.
fn rotated_files(dir: &Path, tenant: &str) -> io::Result<Vec<PathBuf>> {
    let prefix = format!("{tenant}.jsonl.");
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name.strip_prefix(&prefix) {
            if is_rotation_suffix(n) {
                if let Ok(n) = n.parse::<u32>() {
                    found.push((n, ent.path()));
                }
            }
        }
    }
    found.sort_by_key(|(n, _)| Reverse(*n));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

struct Filter {
    cutoff: Option<OffsetDateTime>,
    decision: Option<Verdict>,
}

impl Filter {
    fn new(q: &LogQuery) -> Self {
        let cutoff = q.since.and_then(|d| {
            let d = time::Duration::try_from(d).ok()?;
            OffsetDateTime::now_utc().checked_sub(d)
        });
        Filter {
            cutoff,
            decision: q.decision,
        }
    }

    fn matches(&self, e: &LogEntry) -> bool {
        self.cutoff.is_none_or(|c| e.ts >= c) && self.decision.is_none_or(|d| e.decision == d)
    }
}

struct Record {
    entry: LogEntry,
    raw: String,
}

/// Parses one stored line; warns on stderr and returns `None` for a corrupt one.
fn parse_line(path: &Path, lineno: u64, bytes: Vec<u8>, filter: &Filter) -> Option<Record> {
    let raw = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => {
            warn(path, lineno, "not UTF-8");
            return None;
        }
    };
    let raw = raw.trim_end_matches('\r');
    if raw.trim().is_empty() {
        return None;
    }
    match LogEntry::from_json_line(raw) {
        Ok(entry) => filter.matches(&entry).then(|| Record {
            entry,
            raw: raw.to_owned(),
        }),
        Err(e) => {
            warn(path, lineno, &e.to_string());
            None
        }
    }
}

fn warn(path: &Path, lineno: u64, what: &str) {
    eprintln!(
        "warning: {}:{lineno}: skipping corrupt log line: {what}",
        path.display()
    );
}

/// Reads complete lines from a file that may still be growing; remembers a trailing
/// partial line until its newline arrives.
struct LineReader {
    file: File,
    path: PathBuf,
    /// (dev, ino) of `file`.
    id: (u64, u64),
    buf: Vec<u8>,
    start: usize,
    /// Bytes read from `file` so far.
    pos: u64,
    /// Number of the last line returned (1-based).
    lineno: u64,
    /// Discarding an overlong line up to its newline.
    skipping: bool,
}

impl LineReader {
    /// `None` if the file does not exist.
    fn open(path: &Path) -> io::Result<Option<Self>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let m = file.metadata()?;
        Ok(Some(LineReader {
            file,
            path: path.to_owned(),
            id: (m.dev(), m.ino()),
            buf: Vec::new(),
            start: 0,
            pos: 0,
            lineno: 0,
            skipping: false,
        }))
    }

    /// The next complete line (without its newline), or `None` at the current end of file.
    fn next_line(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        loop {
            if let Some(i) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                let line = self.buf[self.start..self.start + i].to_vec();
                self.start += i + 1;
                self.lineno += 1;
                if self.skipping {
                    self.skipping = false;
                    warn(&self.path, self.lineno, "line too long");
                    continue;
                }
                return Ok(Some((self.lineno, line)));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.buf.len() > MAX_LINE {
                self.skipping = true;
                self.buf.clear();
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK, 0);
            let n = loop {
                match self.file.read(&mut self.buf[old..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e);
                }
            };
            self.buf.truncate(old + n);
            self.pos += n as u64;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// The unterminated last line, if any (call at end of file when no more will come).
    fn take_partial(&mut self) -> Option<(u64, Vec<u8>)> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        if rest.is_empty() || std::mem::take(&mut self.skipping) {
            return None;
        }
        self.lineno += 1;
        Some((self.lineno, rest))
    }

    /// Starts over at the beginning of the file (it was truncated).
    fn rewind(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.buf.clear();
        self.start = 0;
        self.pos = 0;
        self.lineno = 0;
        self.skipping = false;
        Ok(())
    }

    /// Every remaining line, the partial last one included, into `batch`.
    fn drain_all(&mut self, filter: &Filter, batch: &mut Vec<Record>) -> io::Result<()> {
        self.drain_complete(filter, batch)?;
        if let Some((n, l)) = self.take_partial() {
            batch.extend(parse_line(&self.path, n, l, filter));
        }
        Ok(())
    }

    fn drain_complete(&mut self, filter: &Filter, batch: &mut Vec<Record>) -> io::Result<()> {
        while let Some((n, l)) = self.next_line()? {
            batch.extend(parse_line(&self.path, n, l, filter));
        }
        Ok(())
    }
}

/// A tenant's files, opened together: rotated ones (oldest first) and the current one.
///
/// The current file is opened first: if a rotation happens meanwhile, its inode shows up
/// again among the rotated files and is skipped there, so nothing is missed (the reverse
/// order could miss the file that was current). Files are then read through their
/// descriptors, so later renames do not matter.
fn open_files(dir: &Path, tenant: &str) -> io::Result<(Vec<LineReader>, Option<LineReader>)> {
    let current = LineReader::open(&current_path(dir, tenant))?;
    let mut seen: HashSet<(u64, u64)> = current.iter().map(|r| r.id).collect();
    let mut rotated = Vec::new();
    for p in rotated_files(dir, tenant)? {
        if let Some(r) = LineReader::open(&p)? {
            if seen.insert(r.id) {
                rotated.push(r);
            }
        }
    }
    Ok((rotated, current))
}

/// One tenant's history: its rotated files, oldest first, then its current file.
struct TenantStream {
    tenant: String,
    dir: PathBuf,
    files: VecDeque<LineReader>,
    /// The last of `files` is the current file (kept open for `--follow`).
    has_current: bool,
    following: bool,
    /// The last rotated file read to its end.
    last_done: Option<(u64, u64)>,
}

impl TenantStream {
    /// `None` when the tenant has no log file at all.
    fn open(dir: &Path, tenant: &str, following: bool) -> io::Result<Option<Self>> {
        let (rotated, current) = open_files(dir, tenant)?;
        let has_current = current.is_some();
        let files: VecDeque<LineReader> = rotated.into_iter().chain(current).collect();
        if files.is_empty() {
            return Ok(None);
        }
        Ok(Some(TenantStream {
            tenant: tenant.to_owned(),
            dir: dir.to_owned(),
            files,
            has_current,
            following,
            last_done: None,
        }))
    }

    /// The next matching entry, or `None` at the end of the history.
    fn next(&mut self, filter: &Filter) -> io::Result<Option<Record>> {
        loop {
            let is_current = self.files.len() == 1 && self.has_current;
            let Some(r) = self.files.front_mut() else {
                return Ok(None);
            };
            if let Some((n, l)) = r.next_line()? {
                if let Some(rec) = parse_line(&r.path, n, l, filter) {
                    return Ok(Some(rec));
                }
                continue;
            }
            // End of this file.
            if is_current {
                if self.following {
                    // The writer may still complete a partial line: keep it for the tail.
                    return Ok(None);
                }
                return Ok(r
                    .take_partial()
                    .and_then(|(n, l)| parse_line(&r.path, n, l, filter)));
            }
            let rec = r
                .take_partial()
                .and_then(|(n, l)| parse_line(&r.path, n, l, filter));
            self.last_done = Some(r.id);
            self.files.pop_front();
            if rec.is_some() {
                return Ok(rec);
            }
        }
    }

    fn into_tail(mut self) -> Tail {
        let reader = if self.has_current {
            self.files.pop_back()
        } else {
            None
        };
        Tail {
            dir: self.dir,
            tenant: self.tenant,
            reader,
            last_done: self.last_done,
        }
    }
}

/// Follows one tenant's current file across rotations.
struct Tail {
    dir: PathBuf,
    tenant: String,
    /// The current file as we know it.
    reader: Option<LineReader>,
    /// When `reader` is `None`: the last file read to its end, if any.
    last_done: Option<(u64, u64)>,
}

impl Tail {
    fn new(dir: &Path, tenant: &str) -> Self {
        Tail {
            dir: dir.to_owned(),
            tenant: tenant.to_owned(),
            reader: None,
            last_done: None,
        }
    }

    fn poll(&mut self, filter: &Filter, batch: &mut Vec<Record>) -> io::Result<()> {
        if let Some(r) = &mut self.reader {
            r.drain_complete(filter, batch)?;
        }
        let meta = match fs::metadata(current_path(&self.dir, &self.tenant)) {
            Ok(m) => m,
            // Rotated away and not yet recreated: wait for the new file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some(r) = &mut self.reader {
            if r.id == (meta.dev(), meta.ino()) {
                if meta.len() < r.pos {
                    // Truncated in place: start over.
                    r.rewind()?;
                    r.drain_complete(filter, batch)?;
                }
                return Ok(());
            }
            // Replaced (rotated): finish the old file.
            r.drain_all(filter, batch)?;
            self.last_done = Some(r.id);
            self.reader = None;
        }
        // Several rotations may have happened since the last poll: read every rotated
        // file newer than the last one we finished, then the new current file.
        let (rotated, current) = open_files(&self.dir, &self.tenant)?;
        let skip = self
            .last_done
            .and_then(|id| rotated.iter().position(|r| r.id == id))
            .map_or(0, |i| i + 1);
        for mut r in rotated.into_iter().skip(skip) {
            r.drain_all(filter, batch)?;
            self.last_done = Some(r.id);
        }
        self.reader = current;
        if let Some(r) = &mut self.reader {
            r.drain_complete(filter, batch)?;
        }
        Ok(())
    }
}

struct Printer<'a> {
    out: &'a mut dyn Write,
    json: bool,
}

impl Printer<'_> {
    fn header(&mut self) -> Result<(), LogError> {
        if !self.json {
            let h = table_header();
            writeln!(self.out, "{h}").map_err(out_err)?;
        }
        Ok(())
    }

    fn record(&mut self, rec: &Record) -> Result<(), LogError> {
        let r = if self.json {
            writeln!(self.out, "{}", rec.raw)
        } else {
            writeln!(self.out, "{}", table_row(&rec.entry))
        };
        r.map_err(out_err)
    }

    fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush().map_err(out_err)
    }
}

fn out_err(e: io::Error) -> LogError {
    LogError::io("cannot write output", e)
}
