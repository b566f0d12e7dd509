//! Watches a namespace's workers folder with inotify, so that a Worker file
//! written or renamed into place is compiled at once, off the request path:
//! the first request after a deploy then finds the component compiled. The
//! request path checks the file itself anyway; this only makes it faster.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::io::unix::AsyncFd;

/// What happened to a file of the folder.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Written and closed, or renamed into place.
    Written(String),
    /// Deleted or renamed away.
    Removed(String),
    /// The folder itself went away (or events were lost): watch it again and rescan.
    Lost,
}

const FILE_EVENTS: u32 =
    libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_DELETE | libc::IN_MOVED_FROM;
const SELF_EVENTS: u32 = libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;

pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    wd: Option<i32>,
}

impl DirWatch {
    pub fn new() -> io::Result<DirWatch> {
        // SAFETY: plain system call.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DirWatch {
            // SAFETY: the OwnedFd is valid and is neither replaced nor closed
            // while the AsyncFd holds it.
            fd: unsafe { AsyncFd::register(fd)? },
            wd: None,
        })
    }

    pub fn is_watching(&self) -> bool {
        self.wd.is_some()
    }

    /// Watches `dir` (replacing any earlier watch).
    pub fn watch(&mut self, dir: &Path) -> io::Result<()> {
        self.unwatch();
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: valid descriptor and C string.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.get_ref().as_raw_fd(),
                path.as_ptr(),
                FILE_EVENTS | SELF_EVENTS | libc::IN_ONLYDIR,
            )
        };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.wd = Some(wd);
        Ok(())
    }

    fn unwatch(&mut self) {
        if let Some(wd) = self.wd.take() {
            // SAFETY: valid descriptor; a stale wd only gives EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), wd) };
        }
    }

    /// Waits for the next batch of events.
    pub async fn next(&mut self) -> io::Result<Vec<Event>> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                // SAFETY: reading into a buffer we own, of its length.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            let n = match read {
                Ok(result) => result?,
                Err(_would_block) => continue,
            };
            let events = parse(&buf[..n]);
            if events.contains(&Event::Lost) {
                self.unwatch();
            }
            return Ok(events);
        }
    }
}

/// Decodes `struct inotify_event`s.
fn parse(mut buf: &[u8]) -> Vec<Event> {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut events = Vec::new();
    while buf.len() >= HEADER {
        // SAFETY: the kernel wrote a whole header here; read unaligned.
        let header: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let len = header.len as usize;
        let Some(name) = buf.get(HEADER..HEADER + len) else {
            break;
        };
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        let mask = header.mask;
        if mask & (libc::IN_Q_OVERFLOW | libc::IN_IGNORED | SELF_EVENTS) != 0 {
            events.push(Event::Lost);
        } else if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 {
            events.push(Event::Written(name));
        } else if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
            events.push(Event::Removed(name));
        }
        buf = &buf[HEADER + len..];
    }
    events
}

/// The Worker a file of the folder is, if it is one: `NAME.wasm` with a valid,
/// lower-case name (hosts are matched in lower case).
pub fn worker_of(file: &str) -> Option<&str> {
    let name = file.strip_suffix(".wasm")?;
    (crate::config::is_valid_name(name) && !name.bytes().any(|b| b.is_ascii_uppercase()))
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_worker_files_count() {
        assert_eq!(worker_of("hello.wasm"), Some("hello"));
        assert_eq!(worker_of("a_b-1.wasm"), Some("a_b-1"));
        assert_eq!(worker_of(".hello.wasm.tmp"), None);
        assert_eq!(worker_of("Hello.wasm"), None);
        assert_eq!(worker_of("hello.wat"), None);
        assert_eq!(worker_of(".wasm"), None);
    }

    #[tokio::test]
    async fn writes_renames_and_removals_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = DirWatch::new().unwrap();
        watch.watch(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.wasm"), b"x").unwrap();
        std::fs::write(dir.path().join(".b.tmp"), b"y").unwrap();
        std::fs::rename(dir.path().join(".b.tmp"), dir.path().join("b.wasm")).unwrap();
        std::fs::remove_file(dir.path().join("a.wasm")).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 5 {
            seen.extend(watch.next().await.unwrap());
        }
        assert_eq!(
            seen,
            vec![
                Event::Written("a.wasm".into()),
                Event::Written(".b.tmp".into()),
                Event::Removed(".b.tmp".into()),
                Event::Written("b.wasm".into()),
                Event::Removed("a.wasm".into()),
            ]
        );
        drop(dir);
        let mut lost = false;
        for _ in 0..10 {
            if watch.next().await.unwrap().contains(&Event::Lost) {
                lost = true;
                break;
            }
        }
        assert!(lost);
        assert!(!watch.is_watching());
    }
}
