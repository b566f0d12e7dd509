//! User Worker files and their compiled form: a cheap identity of the file
//! checked on every request, and precompiled components cached in memory by the
//! SHA-256 of the `.wasm`, each held in a sealed memfd that Worker processes get
//! a read-only descriptor of. Below the memory cache is the on-disk one
//! ([`crate::wasm::cache`]): a component compiled by an earlier daemon is
//! loaded from there instead of compiled again ([`load_or_compile`]).

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::wasm::cache::CompileCache;

/// Compiled components kept while no Worker uses them (a file switched back and
/// forth is not compiled again).
const KEEP_UNUSED: usize = 32;

/// What identifies a version of a Worker file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// SHA-256 of a `.wasm` file's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(Sha256::digest(bytes).into())
    }

    /// The first 12 hex digits, for logs and status.
    pub fn short(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Reads a Worker file; the stamp is that of the file actually read.
pub fn read_worker_file(path: &Path) -> io::Result<(FileStamp, Vec<u8>)> {
    let mut file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)?;
    Ok((FileStamp::of(&meta), bytes))
}

/// Where a component's compiled form came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Loaded from the on-disk compile cache.
    DiskCache,
    /// Compiled now (and stored in the on-disk cache, if there is one).
    Compiled,
}

/// The sealed, precompiled form of `wasm` (whose hash is `hash`): from the
/// on-disk cache if it has a sound entry, else compiled and stored there. A
/// cache that cannot store is logged; the component still runs.
pub fn load_or_compile(
    engine: &wasmtime::Engine,
    disk: Option<&CompileCache>,
    hash: ContentHash,
    wasm: &[u8],
) -> Result<(Artifact, Origin), String> {
    let seal = |compiled: &[u8]| {
        Artifact::seal(hash, compiled).map_err(|e| format!("cannot store the compiled Worker: {e}"))
    };
    if let Some(compiled) = disk.and_then(|d| d.load(&hash.0)) {
        return Ok((seal(&compiled)?, Origin::DiskCache));
    }
    let compiled = crate::worker::precompile(engine, wasm)
        .map_err(|e| format!("Worker compile error: {e}"))?;
    if let Some(disk) = disk {
        if let Err(e) = disk.store(&hash.0, &compiled) {
            tracing::warn!("{e}; the component is compiled again after a restart");
        }
    }
    Ok((seal(&compiled)?, Origin::Compiled))
}

/// A precompiled component in a sealed memfd.
pub struct Artifact {
    pub hash: ContentHash,
    memfd: OwnedFd,
    pub size: usize,
}

impl Artifact {
    /// Puts `compiled` in a memfd sealed against any change.
    pub fn seal(hash: ContentHash, compiled: &[u8]) -> io::Result<Artifact> {
        let name: &CStr = c"interceptor-worker-component";
        // SAFETY: plain system call with a valid C string.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = File::from(memfd);
        file.write_all(compiled)?;
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Artifact {
            hash,
            memfd: file.into(),
            size: compiled.len(),
        })
    }

    /// A new read-only descriptor (close-on-exec) of the sealed memfd.
    pub fn open_read_only(&self) -> io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.memfd.as_raw_fd());
        Ok(File::open(path)?.into())
    }
}

/// Compiled components by content hash.
#[derive(Default)]
pub struct ArtifactCache {
    entries: Mutex<HashMap<ContentHash, Arc<Artifact>>>,
}

impl ArtifactCache {
    pub fn get(&self, hash: &ContentHash) -> Option<Arc<Artifact>> {
        self.lock().get(hash).cloned()
    }

    /// Adds an artifact (or returns the one another task added first) and drops
    /// unused ones beyond [`KEEP_UNUSED`].
    pub fn insert(&self, artifact: Artifact) -> Arc<Artifact> {
        let mut entries = self.lock();
        let found = entries
            .entry(artifact.hash)
            .or_insert_with(|| Arc::new(artifact))
            .clone();
        let unused: Vec<ContentHash> = entries
            .iter()
            .filter(|(h, a)| Arc::strong_count(a) == 1 && **h != found.hash)
            .map(|(h, _)| *h)
            .collect();
        if unused.len() > KEEP_UNUSED {
            for h in &unused[..unused.len() - KEEP_UNUSED] {
                entries.remove(h);
            }
        }
        found
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentHash, Arc<Artifact>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artifact_is_sealed_and_read_only() {
        let hash = ContentHash::of(b"abc");
        let artifact = Artifact::seal(hash, b"compiled bytes").unwrap();
        let ro = artifact.open_read_only().unwrap();
        let mut file = File::from(ro);
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, "compiled bytes");
        assert!(file.write_all(b"x").is_err(), "read-only descriptor wrote");
        // Even a writable descriptor cannot change sealed content.
        let rw = File::options()
            .write(true)
            .open(format!("/proc/self/fd/{}", artifact.memfd.as_raw_fd()));
        if let Ok(mut rw) = rw {
            assert!(rw.write_all(b"x").is_err(), "sealed memfd was written");
        }
        assert_eq!(
            format!("{hash:?}"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash.short(), "ba7816bf8f01");
    }

    #[test]
    fn the_cache_keeps_one_artifact_per_hash() {
        let cache = ArtifactCache::default();
        let h = ContentHash::of(b"one");
        let a = cache.insert(Artifact::seal(h, b"1").unwrap());
        let b = cache.insert(Artifact::seal(h, b"2").unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&h).is_some());
    }
}
