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

/// The watch descriptor in play. Events carry the descriptor of the watch
/// they come from, and only the followed watch's count: removing a watch
/// (ours, or the kernel's when the folder is deleted) queues `IN_IGNORED` for
/// it, and were that taken for the new watch's loss, re-watching would remove
/// the new watch, which queues another, and so on forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wd {
    None,
    /// Watching the folder's path with this watch; its events are reported.
    Following(i32),
    /// This watch may still be registered but is no longer followed: the
    /// folder moved away, or events overflowed. When the path is watched again
    /// it is removed, unless the kernel gives the same watch back (the same
    /// folder is still there).
    Retired(i32),
}

pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    wd: Wd,
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
            wd: Wd::None,
        })
    }

    pub fn is_watching(&self) -> bool {
        matches!(self.wd, Wd::Following(_))
    }

    /// Watches `dir` (replacing any earlier watch).
    pub fn watch(&mut self, dir: &Path) -> io::Result<()> {
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
            let e = io::Error::last_os_error();
            if let Wd::Following(old) = self.wd {
                self.wd = Wd::Retired(old);
            }
            return Err(e);
        }
        // Adding a watch on an inode already watched gives its watch back.
        if let Wd::Following(old) | Wd::Retired(old) = self.wd {
            if old != wd {
                // SAFETY: valid descriptor; a watch the kernel already dropped
                // only gives EINVAL. The `IN_IGNORED` this queues is not for
                // the new watch, so it is skipped.
                unsafe { libc::inotify_rm_watch(self.fd.get_ref().as_raw_fd(), old) };
            }
        }
        self.wd = Wd::Following(wd);
        Ok(())
    }

    /// Waits until there is something to report: events of the followed
    /// watch, or its loss.
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
            let events = parse(&buf[..n], &mut self.wd);
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

/// Decodes `struct inotify_event`s, keeping those of the followed watch and
/// following the watch's fate in `wd`. Removes no watch: after `IN_IGNORED`
/// or `IN_DELETE_SELF` the kernel drops the watch itself, and after a move or
/// an overflow `DirWatch::watch` removes it if need be.
fn parse(mut buf: &[u8], wd: &mut Wd) -> Vec<Event> {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut events = Vec::new();
    while buf.len() >= HEADER {
        // SAFETY: the kernel wrote a whole header here; read unaligned.
        let header: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        let len = header.len as usize;
        let Some(name) = buf.get(HEADER..HEADER + len) else {
            break;
        };
        buf = &buf[HEADER + len..];
        let mask = header.mask;
        if mask & libc::IN_Q_OVERFLOW != 0 {
            // Of no watch (wd -1): events were dropped, the watch is still there.
            if let Wd::Following(current) = *wd {
                *wd = Wd::Retired(current);
                events.push(Event::Lost);
            }
            continue;
        }
        if *wd != Wd::Following(header.wd) {
            // An earlier watch's: stale.
            if mask & libc::IN_IGNORED != 0 && *wd == Wd::Retired(header.wd) {
                *wd = Wd::None;
            }
            continue;
        }
        if mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF) != 0 {
            // Dropped by the kernel (on `IN_DELETE_SELF`, once the folder's
            // last user lets go); its `IN_IGNORED` then is stale.
            *wd = Wd::None;
            events.push(Event::Lost);
            continue;
        }
        if mask & libc::IN_MOVE_SELF != 0 {
            *wd = Wd::Retired(header.wd);
            events.push(Event::Lost);
            continue;
        }
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 {
            events.push(Event::Written(name));
        } else if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
            events.push(Event::Removed(name));
        }
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
    use std::time::Duration;

    #[test]
    fn only_worker_files_count() {
        assert_eq!(worker_of("hello.wasm"), Some("hello"));
        assert_eq!(worker_of("a_b-1.wasm"), Some("a_b-1"));
        assert_eq!(worker_of(".hello.wasm.tmp"), None);
        assert_eq!(worker_of("Hello.wasm"), None);
        assert_eq!(worker_of("hello.wat"), None);
        assert_eq!(worker_of(".wasm"), None);
    }

    /// One `struct inotify_event` as the kernel writes it (name NUL-padded).
    fn event(wd: i32, mask: u32, name: &str) -> Vec<u8> {
        let mut name = name.as_bytes().to_vec();
        if !name.is_empty() {
            name.resize((name.len() + 1).next_multiple_of(16), 0);
        }
        let mut bytes = Vec::new();
        for field in [wd as u32, mask, 0, name.len() as u32] {
            bytes.extend(field.to_ne_bytes());
        }
        assert_eq!(bytes.len(), std::mem::size_of::<libc::inotify_event>());
        bytes.extend(name);
        bytes
    }

    #[test]
    fn events_of_an_earlier_watch_are_skipped() {
        let buf = [
            event(1, libc::IN_MOVE_SELF, ""),
            event(1, libc::IN_CLOSE_WRITE, "old.wasm"),
            event(1, libc::IN_IGNORED, ""),
            event(2, libc::IN_CLOSE_WRITE, "new.wasm"),
        ]
        .concat();
        let mut wd = Wd::Following(2);
        assert_eq!(
            parse(&buf, &mut wd),
            vec![Event::Written("new.wasm".into())]
        );
        assert_eq!(wd, Wd::Following(2));
    }

    #[test]
    fn the_followed_watch_is_lost_once() {
        // Deleted: the kernel drops the watch.
        let buf = [
            event(2, libc::IN_DELETE_SELF, ""),
            event(2, libc::IN_IGNORED, ""),
        ]
        .concat();
        let mut wd = Wd::Following(2);
        assert_eq!(parse(&buf, &mut wd), vec![Event::Lost]);
        assert_eq!(wd, Wd::None);
        // Moved away: the watch stays until the path is watched again.
        let mut wd = Wd::Following(2);
        assert_eq!(
            parse(&event(2, libc::IN_MOVE_SELF, ""), &mut wd),
            vec![Event::Lost]
        );
        assert_eq!(wd, Wd::Retired(2));
        assert_eq!(parse(&event(2, libc::IN_IGNORED, ""), &mut wd), vec![]);
        assert_eq!(wd, Wd::None);
        // Overflowed.
        let buf = [
            event(-1, libc::IN_Q_OVERFLOW, ""),
            event(2, libc::IN_CLOSE_WRITE, "a.wasm"),
        ]
        .concat();
        let mut wd = Wd::Following(2);
        assert_eq!(parse(&buf, &mut wd), vec![Event::Lost]);
        assert_eq!(wd, Wd::Retired(2));
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

    #[tokio::test]
    async fn a_folder_swapped_in_is_watched_once() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("workers");
        let old = parent.path().join("old");
        let new = parent.path().join("new");
        std::fs::create_dir(&dir).unwrap();
        let mut watch = DirWatch::new().unwrap();
        watch.watch(&dir).unwrap();
        // An atomic-swap deploy.
        std::fs::rename(&dir, &old).unwrap();
        std::fs::create_dir(&new).unwrap();
        std::fs::rename(&new, &dir).unwrap();
        // Watch again whenever the watch is lost, as the dispatcher does,
        // until the watcher falls quiet.
        let (mut batches, mut lost) = (0, 0);
        loop {
            if !watch.is_watching() {
                watch.watch(&dir).unwrap();
            }
            let Ok(events) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await
            else {
                break;
            };
            batches += 1;
            lost += events
                .unwrap()
                .iter()
                .filter(|e| **e == Event::Lost)
                .count();
            assert!(batches < 10, "the watcher does not fall quiet");
        }
        assert_eq!(lost, 1);
        assert!(watch.is_watching());
        // The new folder is followed, the old one no longer.
        std::fs::write(old.join("old.wasm"), b"x").unwrap();
        std::fs::write(dir.join("new.wasm"), b"x").unwrap();
        let events = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the new folder is watched")
            .unwrap();
        assert_eq!(events, vec![Event::Written("new.wasm".into())]);
    }
}
