//! The on-disk compile cache: precompiled components kept in
//! `<state_dir>/compiled/` so a restarted daemon loads them instead of running
//! Cranelift again (seconds for a large component).
//!
//! - **Key**: the SHA-256 of the `.wasm` and an [`EngineId`], the SHA-256 of
//!   wasmtime's `Engine::precompile_compatibility_hash()` (wasmtime's version,
//!   the target and its CPU features, the compiler's flags, the tunables and
//!   the wasm features). An upgrade or a configuration change gives new keys,
//!   so an artifact is never loaded by an engine that did not make it.
//! - **Trust**: precompiled code is loaded with wasmtime's `unsafe`
//!   `Component::deserialize` (in the Worker process), which runs whatever
//!   machine code the bytes hold. So the directory is created `0700` and must
//!   be owned by the daemon's user and writable by nobody else, each file
//!   `0600`, written by this daemon only (to a temporary name, then renamed),
//!   and each carries its length and a CRC-32 of its content, checked at every
//!   load (against corruption and truncation; tampering is what the
//!   permissions are for, so a cryptographic hash would only add time: 54 ms
//!   for a 40 MiB artifact against CRC-32's 8). A file that fails any check is
//!   logged, removed and compiled again: never used.
//! - **Size**: at most [`MAX_BYTES`] in all. After each write the entries used
//!   least recently (a load refreshes a file's mtime) are removed until the
//!   cache fits; entries of an older engine age out the same way.
//! - Files are not fsynced: one torn by a crash fails its checksum and is
//!   compiled again.

use std::fs::{self, DirBuilder, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Precompiled};

/// The cache's directory below `state_dir`.
pub const SUBDIR: &str = "compiled";
/// What the cache holds at most, in bytes (a large JavaScript component
/// compiles to some 40 MiB; a Rust one to well under 1 MiB).
pub const MAX_BYTES: u64 = 1 << 30;
/// Names the file format; a new format changes it (old files then fail to load
/// and are replaced).
const MAGIC: &[u8; 16] = b"interceptor-cw2\n";
/// MAGIC, component hash, engine id, content CRC-32, content length.
const HEADER_LEN: usize = 16 + 32 + 32 + 4 + 8;
const EXTENSION: &str = "cwasm";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("compile cache {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("compile cache {}: not used: {why}", path.display())]
    Untrusted { path: PathBuf, why: String },
}

/// What identifies an engine's compiled code: engines with the same id load
/// each other's artifacts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EngineId(pub [u8; 32]);

impl EngineId {
    pub fn of(engine: &Engine) -> EngineId {
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        EngineId(hasher.0.finalize().into())
    }
}

/// Feeds a `Hash` into SHA-256: stable across runs and Rust releases, unlike
/// `DefaultHasher`, so a key computed by the next daemon matches.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    }
}

/// A cache entry's key: the component's SHA-256 and the engine's id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey {
    pub component: [u8; 32],
    pub engine: EngineId,
}

impl CacheKey {
    /// `<component sha256>-<first 16 hex digits of the engine id>.cwasm`; the
    /// whole engine id is in the file's header and checked too.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}.{EXTENSION}",
            hex(&self.component),
            hex(&self.engine.0[..8])
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The compile cache of one engine.
pub struct CompileCache {
    dir: PathBuf,
    engine: EngineId,
    max_bytes: u64,
}

impl CompileCache {
    /// Opens (creating it `0700` if needed) `<state_dir>/compiled/` for
    /// `engine`'s artifacts. Refuses a directory another user owns or could
    /// write to: its files could not be trusted.
    pub fn open(state_dir: &Path, engine: &Engine) -> Result<CompileCache, CacheError> {
        Self::open_for(state_dir, EngineId::of(engine), MAX_BYTES)
    }

    pub fn open_for(
        state_dir: &Path,
        engine: EngineId,
        max_bytes: u64,
    ) -> Result<CompileCache, CacheError> {
        let dir = state_dir.join(SUBDIR);
        let io_err = |source| CacheError::Io {
            path: dir.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err)?;
        let meta = fs::symlink_metadata(&dir).map_err(io_err)?;
        let untrusted = |why: String| CacheError::Untrusted {
            path: dir.clone(),
            why,
        };
        if !meta.is_dir() {
            return Err(untrusted("not a directory".into()));
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(untrusted(format!("owned by uid {}, not {me}", meta.uid())));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(untrusted(format!(
                "mode {mode:04o}: others may have written its files"
            )));
        }
        if mode & 0o077 != 0 {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        }
        let cache = CompileCache {
            dir,
            engine,
            max_bytes,
        };
        cache.remove_leftovers();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key(&self, component: &[u8; 32]) -> CacheKey {
        CacheKey {
            component: *component,
            engine: self.engine,
        }
    }

    pub fn path(&self, component: &[u8; 32]) -> PathBuf {
        self.dir.join(self.key(component).file_name())
    }

    /// The precompiled bytes of `component` for this engine, if the cache has
    /// a sound entry. An entry that fails a check is logged and removed.
    pub fn load(&self, component: &[u8; 32]) -> Option<Vec<u8>> {
        let path = self.path(component);
        match self.read_checked(&path, component) {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(
                    "compile cache entry {} not used ({why}); compiling again",
                    path.display()
                );
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Ok(None): no entry; Err: an entry that must not be used.
    fn read_checked(&self, path: &Path, component: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(format!(
                "not a regular file of uid {me} writable only by it (uid {}, mode {:04o})",
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header)
            .map_err(|_| "shorter than its header".to_string())?;
        let mut content = Vec::with_capacity((meta.len() as usize).saturating_sub(HEADER_LEN));
        file.read_to_end(&mut content).map_err(|e| e.to_string())?;
        self.verify(&header, &content, component)?;
        // The mtime is the entry's last use, for pruning.
        let _ = file.set_modified(SystemTime::now());
        Ok(Some(content))
    }

    /// Whether a cache file's header matches this key and its content.
    fn verify(
        &self,
        header: &[u8; HEADER_LEN],
        content: &[u8],
        component: &[u8; 32],
    ) -> Result<(), String> {
        if &header[..16] != MAGIC {
            return Err("not a compile cache file of this format".into());
        }
        if header[16..48] != component[..] || header[48..80] != self.engine.0[..] {
            return Err("made for another component or engine".into());
        }
        let crc = u32::from_le_bytes(header[80..84].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(header[84..92].try_into().expect("8 bytes"));
        if len != content.len() as u64 {
            return Err(format!(
                "truncated or extended: {} bytes of content, {len} expected",
                content.len()
            ));
        }
        if crc32fast::hash(content) != crc {
            return Err("checksum mismatch".into());
        }
        // SAFETY (of what the Worker process does with these bytes): they go to
        // wasmtime's unsafe `Component::deserialize`, sound only for what
        // wasmtime itself serialized for a compatible engine. They are: this
        // file is in a directory only this daemon's user can write, is written
        // only by `store` (the output of `Engine::precompile_component`), and
        // its key, length and checksum just matched; wasmtime checks its own
        // header (version, target, configuration) again when it loads them.
        if Engine::detect_precompiled(content) != Some(Precompiled::Component) {
            return Err("not a precompiled component".into());
        }
        Ok(())
    }

    /// Stores the precompiled bytes of `component` (to a temporary file, then
    /// renamed into place), then prunes the cache to its size.
    pub fn store(&self, component: &[u8; 32], compiled: &[u8]) -> Result<(), CacheError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self.path(component);
        if (compiled.len() + HEADER_LEN) as u64 > self.max_bytes {
            return Ok(());
        }
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            self.key(component).file_name(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let io_err = |source| CacheError::Io {
            path: tmp.clone(),
            source,
        };
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            let mut header = Vec::with_capacity(HEADER_LEN);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(component);
            header.extend_from_slice(&self.engine.0);
            header.extend_from_slice(&crc32fast::hash(compiled).to_le_bytes());
            header.extend_from_slice(&(compiled.len() as u64).to_le_bytes());
            file.write_all(&header)?;
            file.write_all(compiled)?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        self.prune(&path);
        Ok(())
    }

    /// Removes the entries used least recently until the cache fits in its
    /// size; never `keep` (the entry just written).
    fn prune(&self, keep: &Path) {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        if total <= self.max_bytes {
            return;
        }
        entries.sort_by_key(|e| e.0);
        for (_, size, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(
                        "compile cache: removed {} (least recently used)",
                        path.display()
                    );
                    total = total.saturating_sub(size);
                }
                Err(e) => tracing::warn!("compile cache: cannot remove {}: {e}", path.display()),
            }
        }
    }

    /// (mtime, size, path) of every entry.
    fn entries(&self) -> Vec<(SystemTime, u64, PathBuf)> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == EXTENSION))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect()
    }

    /// Temporary files a daemon that died while writing left behind.
    fn remove_leftovers(&self) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in dir.filter_map(Result::ok) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use wasmtime::{Config, OptLevel};

    fn read(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap()
    }

    /// The smallest component: no imports, no exports.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    fn engine(opt: OptLevel) -> Engine {
        let mut config = Config::new();
        config.wasm_component_model(true).cranelift_opt_level(opt);
        Engine::new(&config).unwrap()
    }

    fn compiled(engine: &Engine) -> Vec<u8> {
        engine.precompile_component(EMPTY_COMPONENT).unwrap()
    }

    #[test]
    fn the_engine_id_is_the_same_for_the_same_configuration_and_differs_for_another() {
        let a = EngineId::of(&engine(OptLevel::Speed));
        let b = EngineId::of(&engine(OptLevel::Speed));
        let c = EngineId::of(&engine(OptLevel::None));
        assert_eq!(a, b);
        assert_ne!(a, c, "another optimisation level must not share artifacts");
        // The daemon's own engine, pooling or not, has one id (artifacts do not
        // depend on the allocator) and it differs from a plain one.
        let worker = EngineId::of(&crate::worker::engine().unwrap());
        assert_ne!(worker, c);
    }

    #[test]
    fn the_key_names_the_component_and_the_engine() {
        let engine = EngineId([0xab; 32]);
        let key = CacheKey {
            component: [0x01; 32],
            engine,
        };
        assert_eq!(
            key.file_name(),
            format!("{}-abababababababab.cwasm", "01".repeat(32))
        );
        let other_component = CacheKey {
            component: [0x02; 32],
            engine,
        };
        let other_engine = CacheKey {
            component: [0x01; 32],
            engine: EngineId([0xac; 32]),
        };
        assert_ne!(key.file_name(), other_component.file_name());
        assert_ne!(key.file_name(), other_engine.file_name());
    }

    #[test]
    fn a_stored_entry_loads_back_and_another_engine_does_not_see_it() {
        let state = tempfile::tempdir().unwrap();
        let engine = engine(OptLevel::Speed);
        let cache = CompileCache::open(state.path(), &engine).unwrap();
        let meta = fs::metadata(cache.dir()).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        let bytes = compiled(&engine);
        let hash = [7; 32];
        assert_eq!(cache.load(&hash), None);
        cache.store(&hash, &bytes).unwrap();
        let file = fs::metadata(cache.path(&hash)).unwrap();
        assert_eq!(file.mode() & 0o7777, 0o600);
        assert_eq!(cache.load(&hash).as_deref(), Some(&bytes[..]));
        assert_eq!(cache.load(&[8; 32]), None, "another component");
        let other = CompileCache::open_for(state.path(), EngineId([1; 32]), MAX_BYTES).unwrap();
        assert_eq!(other.load(&hash), None, "another engine");
        assert!(
            cache.path(&hash).exists(),
            "another engine's miss removed nothing"
        );
    }

    #[test]
    fn a_corrupt_or_truncated_entry_is_removed_not_used() {
        let state = tempfile::tempdir().unwrap();
        let engine = engine(OptLevel::Speed);
        let cache = CompileCache::open(state.path(), &engine).unwrap();
        let bytes = compiled(&engine);
        let hash = [7; 32];
        let path = cache.path(&hash);

        cache.store(&hash, &bytes).unwrap();
        let mut flipped = read(&path);
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert_eq!(cache.load(&hash), None, "one flipped bit");
        assert!(!path.exists(), "the corrupt entry was removed");

        cache.store(&hash, &bytes).unwrap();
        let whole = read(&path);
        fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        assert_eq!(cache.load(&hash), None, "truncated");
        assert!(!path.exists());

        cache.store(&hash, &bytes).unwrap();
        fs::write(&path, b"").unwrap();
        assert_eq!(cache.load(&hash), None, "empty");

        // Control: written again, it loads.
        cache.store(&hash, &bytes).unwrap();
        assert_eq!(cache.load(&hash).as_deref(), Some(&bytes[..]));
    }

    #[test]
    fn an_entry_others_could_write_is_not_used() {
        let state = tempfile::tempdir().unwrap();
        let engine = engine(OptLevel::Speed);
        let cache = CompileCache::open(state.path(), &engine).unwrap();
        let hash = [7; 32];
        cache.store(&hash, &compiled(&engine)).unwrap();
        fs::set_permissions(cache.path(&hash), fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(cache.load(&hash), None);
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_a_readable_one_is_tightened() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join(SUBDIR);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let id = EngineId([1; 32]);
        assert!(matches!(
            CompileCache::open_for(state.path(), id, MAX_BYTES),
            Err(CacheError::Untrusted { .. })
        ));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        CompileCache::open_for(state.path(), id, MAX_BYTES).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn the_cache_keeps_to_its_size_dropping_the_least_recently_used() {
        let state = tempfile::tempdir().unwrap();
        let engine = engine(OptLevel::Speed);
        let bytes = compiled(&engine);
        let entry = (bytes.len() + HEADER_LEN) as u64;
        let cache = CompileCache::open_for(state.path(), EngineId::of(&engine), entry * 2).unwrap();
        cache.store(&[1; 32], &bytes).unwrap();
        cache.store(&[2; 32], &bytes).unwrap();
        // 1 is used again after 2 was written: 2 is the least recently used.
        let past = SystemTime::now() - std::time::Duration::from_secs(60);
        File::open(cache.path(&[2; 32]))
            .unwrap()
            .set_modified(past)
            .unwrap();
        File::open(cache.path(&[1; 32]))
            .unwrap()
            .set_modified(past - std::time::Duration::from_secs(60))
            .unwrap();
        assert!(cache.load(&[1; 32]).is_some());
        cache.store(&[3; 32], &bytes).unwrap();
        assert!(cache.path(&[1; 32]).exists());
        assert!(!cache.path(&[2; 32]).exists(), "least recently used stays");
        assert!(cache.path(&[3; 32]).exists());
    }

    #[test]
    fn leftover_temporary_files_are_removed_at_open() {
        let state = tempfile::tempdir().unwrap();
        let id = EngineId([1; 32]);
        let cache = CompileCache::open_for(state.path(), id, MAX_BYTES).unwrap();
        let tmp = cache.dir().join(".x.cwasm.1.0.tmp");
        fs::write(&tmp, b"half").unwrap();
        CompileCache::open_for(state.path(), id, MAX_BYTES).unwrap();
        assert!(!tmp.exists());
    }
}
