//! [`LogWriter`]: synchronous, rotating, per-tenant JSON-lines writer.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use super::{LogEntry, LogError};

/// At most this many tenant files are kept open; beyond it, idle ones are closed
/// (and reopened on their next entry).
const MAX_OPEN_FILES: usize = 128;
/// How often the file behind a tenant's path is checked: a stat per line would
/// cost as much as the write itself on the relay's hot path.
pub(super) const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// Longest tenant name accepted (leaves room for `.jsonl.NNNN` in a 255-byte file name).
const MAX_TENANT_LEN: usize = 200;

/// Refuses tenant names that cannot safely be a file name in the log directory:
/// empty, containing `/` or NUL, starting with `.`, or longer than 200 bytes.
pub fn validate_tenant(tenant: &str) -> Result<(), LogError> {
    if tenant.is_empty()
        || tenant.len() > MAX_TENANT_LEN
        || tenant.starts_with('.')
        || tenant.contains(['/', '\0'])
    {
        return Err(LogError::InvalidTenant(tenant.to_owned()));
    }
    Ok(())
}

/// `<dir>/<tenant>.jsonl`
pub(crate) fn current_path(dir: &Path, tenant: &str) -> PathBuf {
    dir.join(format!("{tenant}.jsonl"))
}

/// `<path>.<n>`
pub(crate) fn rotated_path(current: &Path, n: u32) -> PathBuf {
    let mut s = current.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

struct TenantFile {
    path: PathBuf,
    /// Shared so the write itself happens outside the lock.
    file: Option<Arc<File>>,
    /// (dev, ino) of `file`.
    id: (u64, u64),
    /// Size of the file as of our last write (other writers append too, rarely).
    size: u64,
    /// When the path was last checked against `file` (moved or deleted by logrotate?).
    checked: Option<Instant>,
}

/// Appends [`LogEntry`]s to `<dir>/<tenant>.jsonl`, one JSON line per entry.
///
/// Share it as `Arc<LogWriter>`. Each [`write`](Self::write) is one `write(2)` of a whole
/// line on an `O_APPEND` file, done before it returns: no user-space buffer, so nothing
/// is lost when the process exits. Tenants have their own lock, so they never wait for
/// each other. [`flush`](Self::flush) fsyncs (call it periodically and at shutdown; it
/// also runs on drop).
///
/// Rotation: when appending a line would make `<tenant>.jsonl` larger than `max_bytes`,
/// the file becomes `<tenant>.jsonl.1` (`.1` becomes `.2`, …, up to `.<keep>`; the oldest
/// is dropped) and a new file is started. `max_bytes = 0` disables rotation; `keep = 0`
/// keeps no old file. A single line longer than `max_bytes` still gets written, alone in
/// its file. The file's size is taken from the file system before each write, and a
/// file that was moved or deleted behind the writer's back is reopened, so external
/// rotation (logrotate without copytruncate) works too.
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    keep: u32,
    files: RwLock<HashMap<String, Arc<Mutex<TenantFile>>>>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl LogWriter {
    /// Opens (creating it with mode 0750 if missing) the log directory `dir`.
    pub fn open(dir: &Path, max_bytes: u64, keep: u32) -> Result<Self, LogError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| {
                LogError::io(format!("cannot create log directory {}", dir.display()), e)
            })?;
        let meta = fs::metadata(dir)
            .map_err(|e| LogError::io(format!("cannot open log directory {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(LogError::io(
                format!("log directory {}", dir.display()),
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        Ok(LogWriter {
            dir: dir.to_owned(),
            max_bytes,
            keep,
            files: RwLock::new(HashMap::new()),
        })
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[cfg(test)]
    pub(super) fn cached_files(&self) -> usize {
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Appends `entry` as one line to its tenant's file; the line is in the file when this
    /// returns.
    pub fn write(&self, entry: &LogEntry) -> Result<(), LogError> {
        let mut line = entry.to_json_line()?;
        line.push('\n');
        self.append_lines(&entry.tenant, line.as_bytes())
    }

    /// Appends whole lines (each ending in `\n`) to `tenant`'s file with one
    /// `write(2)`; they are in the file when this returns.
    pub fn append_lines(&self, tenant: &str, lines: &[u8]) -> Result<(), LogError> {
        validate_tenant(tenant)?;
        let slot = self.slot(tenant);
        let mut tf = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let file = self
            .reserve(&mut tf, lines.len() as u64)
            .map_err(|e| LogError::io(format!("cannot write log file {}", tf.path.display()), e))?;
        let path = tf.path.clone();
        drop(tf);
        // O_APPEND makes each write(2) land whole at the end, even with other relay
        // threads writing the same file; the lock is not held during the syscall.
        // For a regular file one write(2) takes the whole buffer; write_all only
        // loops on a short write (e.g. a full disk), which it then reports.
        (&*file)
            .write_all(lines)
            .map_err(|e| LogError::io(format!("cannot write log file {}", path.display()), e))
    }

    /// fsyncs every open log file and the directory.
    pub fn flush(&self) -> Result<(), LogError> {
        let slots: Vec<_> = self
            .files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut first_err = None;
        for slot in slots {
            let tf = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(f) = &tf.file {
                if let Err(e) = f.sync_all() {
                    first_err.get_or_insert_with(|| {
                        LogError::io(format!("cannot fsync {}", tf.path.display()), e)
                    });
                }
            }
        }
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            first_err.get_or_insert_with(|| {
                LogError::io(format!("cannot fsync {}", self.dir.display()), e)
            });
        }
        first_err.map_or(Ok(()), Err)
    }

    fn slot(&self, tenant: &str) -> Arc<Mutex<TenantFile>> {
        if let Some(slot) = self
            .files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
        {
            return slot.clone();
        }
        let mut map = self.files.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_OPEN_FILES && !map.contains_key(tenant) {
            // Close idle files: an entry only the map references is not in use, and
            // nobody can take a new reference while we hold the write lock.
            let idle: Vec<String> = map
                .iter()
                .filter(|(_, v)| Arc::strong_count(v) == 1)
                .map(|(k, _)| k.clone())
                .take(MAX_OPEN_FILES / 2)
                .collect();
            for k in idle {
                map.remove(&k);
            }
        }
        map.entry(tenant.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(TenantFile {
                    path: current_path(&self.dir, tenant),
                    file: None,
                    id: (0, 0),
                    size: 0,
                    checked: None,
                }))
            })
            .clone()
    }

    /// Counts `len` more bytes into the tenant's file, rotating it first if they
    /// would not fit, and gives the file to write them to.
    fn reserve(&self, tf: &mut TenantFile, len: u64) -> io::Result<Arc<File>> {
        let due = tf.file.is_none() || tf.checked.is_none_or(|at| at.elapsed() >= RECHECK_EVERY);
        let mut size = if due {
            tf.checked = Some(Instant::now());
            match fs::metadata(&tf.path) {
                Ok(m) => {
                    if (m.dev(), m.ino()) != tf.id {
                        tf.file = None;
                    }
                    m.len()
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tf.file = None;
                    0
                }
                Err(e) => return Err(e),
            }
        } else {
            tf.size
        };
        if self.max_bytes > 0 && size > 0 && size.saturating_add(len) > self.max_bytes {
            tf.file = None;
            self.rotate(&tf.path)?;
            size = 0;
        }
        let file = match &mut tf.file {
            Some(f) => f,
            slot @ None => {
                let f = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o640)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&tf.path)?;
                let m = f.metadata()?;
                tf.id = (m.dev(), m.ino());
                slot.insert(Arc::new(f))
            }
        }
        .clone();
        tf.size = size + len;
        Ok(file)
    }

    /// `.keep-1` → `.keep`, …, `.1` → `.2`, current → `.1` (or removes current when
    /// `keep == 0`).
    fn rotate(&self, current: &Path) -> io::Result<()> {
        if self.keep == 0 {
            return ignore_not_found(fs::remove_file(current));
        }
        for n in (1..self.keep).rev() {
            ignore_not_found(fs::rename(
                rotated_path(current, n),
                rotated_path(current, n + 1),
            ))?;
        }
        ignore_not_found(fs::rename(current, rotated_path(current, 1)))
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

fn ignore_not_found(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
