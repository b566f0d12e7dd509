//! Who is behind a redirected connection: the cgroup id the eBPF hooks recorded
//! names a sandbox, and the sandbox names its tenant, its outbound policy and the
//! outbound parameters its requests carry.
//!
//! Layout under the interceptor's cgroup subtree:
//! `<cgroup>/<tenant>` for each tenant, `<cgroup>/<tenant>/exec-*` for each
//! `interceptor exec`, whose `--param`s override the tenant's own.
//!
//! Each sandbox also has the uid its processes run as ([`SandboxUids`]): the
//! sandbox user's, or one of `sandbox_uids` for each tenant and User Worker,
//! the same on every run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::UidRange;
use crate::ebpf::cgroup_id;
use crate::policy::{OutboundPolicy, Params};

/// A tenant's name, as used for its cgroup and its log file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub String);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A User Worker: its dispatch namespace and its name (also its tenant name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerId {
    pub namespace: String,
    pub name: String,
}

/// What the daemon knows about a tenant from its configuration.
pub struct Tenant {
    pub id: TenantId,
    pub params: Params,
    /// The tenant's outbound Worker (an allow-all one when it names none).
    pub policy: Arc<OutboundPolicy>,
    open_connections: AtomicUsize,
}

impl Tenant {
    pub fn new(id: TenantId, params: Params, policy: Arc<OutboundPolicy>) -> Self {
        Tenant {
            id,
            params,
            policy,
            open_connections: AtomicUsize::new(0),
        }
    }

    /// Counts one more open relay connection, unless the tenant already holds
    /// `limit`: one tenant must not take every descriptor the relay has.
    pub fn open_connection(self: &Arc<Self>, limit: Option<usize>) -> Option<OpenConnection> {
        let before = self.open_connections.fetch_add(1, Ordering::Relaxed);
        if limit.is_some_and(|limit| before >= limit) {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(OpenConnection(self.clone()))
    }

    /// Relay connections its sandboxes hold open now.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }
}

/// One of a tenant's open relay connections; no longer counted once dropped.
pub struct OpenConnection(Arc<Tenant>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One sandbox: a cgroup whose processes share a tenant and a set of parameters.
pub struct Sandbox {
    pub tenant: Arc<Tenant>,
    /// `(namespace, Worker name)` for a User Worker's sandbox.
    pub worker: Option<WorkerId>,
    pub params: Params,
    pub cgroup: PathBuf,
    /// The uid (and gid) its processes run as.
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("sandbox uids ({path}): {source}")]
    UidFile { path: PathBuf, source: io::Error },
    #[error("no uid left in sandbox_uids {range} for {who} ({assigned} assigned, recorded in {path}; widen the range, or remove entries of tenants and Workers that are gone while the daemon is stopped)")]
    UidsExhausted {
        range: UidRange,
        who: String,
        assigned: usize,
        path: PathBuf,
    },
}

/// Which uid each sandbox runs as. Without `sandbox_uids`, the sandbox user's
/// for all. With it, each tenant (`tenant:NAME`) and each User Worker
/// (`worker:NAMESPACE/NAME`) gets the lowest uid of the range not yet handed
/// out and unknown to the host's user and group databases; gid the same
/// number. Assignments are kept in a root-only JSON file, read at start and
/// written before a new uid is first used, so a tenant or Worker has the same
/// uid on every run (its files stay its own), and a uid is never handed to
/// another one, even after its owner is gone from the config.
pub struct SandboxUids {
    shared: (u32, u32),
    assigned: Option<Assigned>,
}

struct Assigned {
    range: UidRange,
    path: PathBuf,
    uids: Mutex<BTreeMap<String, u32>>,
}

/// The file's contents.
#[derive(serde::Serialize, serde::Deserialize)]
struct UidFile {
    range: String,
    uids: BTreeMap<String, u32>,
}

/// The name of the file under `log_dir`.
pub const UID_FILE: &str = "sandbox-uids.json";

impl SandboxUids {
    /// Every sandbox runs as `uid`/`gid` (the sandbox user).
    pub fn shared(uid: u32, gid: u32) -> Self {
        SandboxUids {
            shared: (uid, gid),
            assigned: None,
        }
    }

    /// One uid of `range` per tenant and Worker, recorded in `path`; every
    /// tenant of `tenants` gets one now. Entries outside the range (it was
    /// changed) or holding a uid twice are dropped, with a warning.
    pub fn assigned<'a>(
        range: UidRange,
        path: PathBuf,
        shared: (u32, u32),
        tenants: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, TenantError> {
        let file_err = |source| TenantError::UidFile {
            path: path.clone(),
            source,
        };
        let mut uids = BTreeMap::new();
        match fs::read(&path) {
            Ok(bytes) => {
                let file: UidFile = serde_json::from_slice(&bytes)
                    .map_err(|e| file_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                let mut seen = BTreeSet::new();
                for (who, uid) in file.uids {
                    if range.contains(uid) && seen.insert(uid) {
                        uids.insert(who, uid);
                    } else {
                        tracing::warn!(
                            "{}: {who}'s uid {uid} is outside sandbox_uids {range} or taken twice; it gets a new one",
                            path.display()
                        );
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(e)),
        }
        let me = SandboxUids {
            shared,
            assigned: Some(Assigned {
                range,
                path: path.clone(),
                uids: Mutex::new(uids),
            }),
        };
        for tenant in tenants {
            me.tenant(tenant)?;
        }
        if let Some(assigned) = &me.assigned {
            assigned.save(&assigned.lock())?;
        }
        Ok(me)
    }

    /// The uid and gid of a configured tenant's sandboxes.
    pub fn tenant(&self, name: &str) -> Result<(u32, u32), TenantError> {
        self.get(format!("tenant:{name}"))
    }

    /// The uid and gid of a User Worker's process.
    pub fn worker(&self, worker: &WorkerId) -> Result<(u32, u32), TenantError> {
        self.get(format!("worker:{}/{}", worker.namespace, worker.name))
    }

    /// What `status` shows: `tenant:NAME` / `worker:NAMESPACE/NAME` → uid.
    /// Empty without `sandbox_uids`.
    pub fn all(&self) -> BTreeMap<String, u32> {
        self.assigned
            .as_ref()
            .map(|a| a.lock().clone())
            .unwrap_or_default()
    }

    fn get(&self, who: String) -> Result<(u32, u32), TenantError> {
        let Some(assigned) = &self.assigned else {
            return Ok(self.shared);
        };
        let mut uids = assigned.lock();
        if let Some(&uid) = uids.get(&who) {
            return Ok((uid, uid));
        }
        let taken: BTreeSet<u32> = uids.values().copied().collect();
        let free = (assigned.range.first..=assigned.range.last)
            .filter(|uid| !taken.contains(uid))
            .find(|&uid| !id_known_to_host(uid))
            .ok_or_else(|| TenantError::UidsExhausted {
                range: assigned.range,
                who: who.clone(),
                assigned: uids.len(),
                path: assigned.path.clone(),
            })?;
        let mut next = uids.clone();
        next.insert(who, free);
        // Recorded before it is used: a uid that owns files is never handed out again.
        assigned.save(&next)?;
        *uids = next;
        Ok((free, free))
    }
}

/// Whether the host's user or group databases (network ones included) know
/// the id: config validation read only the local files.
fn id_known_to_host(id: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    !matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
        || !matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
}

impl Assigned {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        self.uids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the file whole (root-only, replaced by rename, synced): a crash
    /// leaves the old assignments or the new ones, never half of them.
    fn save(&self, uids: &BTreeMap<String, u32>) -> Result<(), TenantError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| TenantError::UidFile {
            path: self.path.clone(),
            source,
        };
        let file = UidFile {
            range: self.range.to_string(),
            uids: uids.clone(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| err(io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        let _ = fs::remove_file(&tmp);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        out.write_all(&text)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.sync_all())
            .map_err(err)?;
        fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

fn cgroup_err(path: &Path) -> impl FnOnce(io::Error) -> TenantError + '_ {
    move |source| TenantError::Cgroup {
        path: path.to_path_buf(),
        source,
    }
}

/// Maps cgroup ids to sandboxes. Tenant cgroups are known from the start; exec
/// sandboxes are registered by the admin socket; anything else found under a
/// tenant's cgroup (made by an operator) is learned by rescanning on a miss.
pub struct SandboxRegistry {
    root: PathBuf,
    tenants: HashMap<String, Arc<Tenant>>,
    uids: SandboxUids,
    by_cgroup: RwLock<HashMap<u64, Arc<Sandbox>>>,
    next_exec: AtomicU64,
}

impl SandboxRegistry {
    /// Creates `root` and one cgroup per tenant under it; `uids` says which
    /// uid each sandbox runs as.
    pub fn create(
        root: PathBuf,
        tenants: Vec<Tenant>,
        uids: SandboxUids,
    ) -> Result<Self, TenantError> {
        fs::create_dir_all(&root).map_err(cgroup_err(&root))?;
        let registry = SandboxRegistry {
            uids,
            tenants: tenants
                .into_iter()
                .map(|t| (t.id.0.clone(), Arc::new(t)))
                .collect(),
            root,
            by_cgroup: RwLock::new(HashMap::new()),
            next_exec: AtomicU64::new(0),
        };
        for name in registry.tenants.keys() {
            let dir = registry.root.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(cgroup_err(&dir)(e)),
            }
        }
        registry.rescan();
        Ok(registry)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.values()
    }

    /// Which uid each sandbox runs as.
    pub fn uids(&self) -> &SandboxUids {
        &self.uids
    }

    /// The tenants of the User Workers that have run.
    pub fn worker_tenants(&self) -> Vec<Arc<Tenant>> {
        self.read()
            .values()
            .filter(|s| s.worker.is_some())
            .map(|s| s.tenant.clone())
            .collect()
    }

    /// The sandbox a cgroup id belongs to, or `None` for a cgroup outside every tenant.
    pub fn lookup(&self, cgroup_id: u64) -> Option<Arc<Sandbox>> {
        if let Some(found) = self.read().get(&cgroup_id) {
            return Some(found.clone());
        }
        self.rescan();
        self.read().get(&cgroup_id).cloned()
    }

    /// Creates a fresh cgroup for one `interceptor exec`, with `params` over the tenant's.
    pub fn open_exec(&self, tenant: &str, params: Params) -> Result<Arc<Sandbox>, TenantError> {
        let tenant = self
            .tenants
            .get(tenant)
            .ok_or_else(|| TenantError::UnknownTenant(tenant.to_string()))?;
        let (uid, gid) = self.uids.tenant(&tenant.id.0)?;
        let n = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join(&tenant.id.0)
            .join(format!("exec-{}-{n}", std::process::id()));
        fs::create_dir(&dir).map_err(cgroup_err(&dir))?;
        let id = cgroup_id(&dir).map_err(cgroup_err(&dir))?;
        let mut merged = tenant.params.clone();
        merged.extend(params);
        let sandbox = Arc::new(Sandbox {
            tenant: tenant.clone(),
            worker: None,
            params: merged,
            cgroup: dir,
            uid,
            gid,
        });
        self.write().insert(id, sandbox.clone());
        Ok(sandbox)
    }

    /// The sandbox of a User Worker: cgroup `<root>/<namespace>/<name>` (created
    /// if missing), tenant `name`, judged by the namespace's outbound `policy`.
    /// Its parameters come per request, from the signed request context.
    pub fn open_worker(
        &self,
        worker: &WorkerId,
        policy: Arc<OutboundPolicy>,
    ) -> Result<Arc<Sandbox>, TenantError> {
        let (uid, gid) = self.uids.worker(worker)?;
        let dir = self.root.join(&worker.namespace).join(&worker.name);
        fs::create_dir_all(&dir).map_err(cgroup_err(&dir))?;
        let id = cgroup_id(&dir).map_err(cgroup_err(&dir))?;
        // A restarted Worker keeps its sandbox: the connections its previous
        // process left open still count against it.
        if let Some(known) = self.read().get(&id) {
            if known.worker.as_ref() == Some(worker) {
                return Ok(known.clone());
            }
        }
        let sandbox = Arc::new(Sandbox {
            tenant: Arc::new(Tenant::new(
                TenantId(worker.name.clone()),
                Params::new(),
                policy,
            )),
            worker: Some(worker.clone()),
            params: Params::new(),
            cgroup: dir,
            uid,
            gid,
        });
        self.write().insert(id, sandbox.clone());
        Ok(sandbox)
    }

    /// Forgets an exec sandbox and removes its cgroup. A cgroup that still has
    /// processes (daemonised children) stays registered and is kept.
    pub fn close_exec(&self, cgroup: &Path) -> Result<(), TenantError> {
        if !cgroup.starts_with(&self.root) || cgroup.parent() == Some(&self.root) {
            return Err(cgroup_err(cgroup)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an exec sandbox",
            )));
        }
        let id = cgroup_id(cgroup).map_err(cgroup_err(cgroup))?;
        match fs::remove_dir(cgroup) {
            Ok(()) => {
                self.write().remove(&id);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(cgroup_err(cgroup)(e)),
        }
    }

    /// Learns every cgroup under a tenant's directory that is not yet known.
    fn rescan(&self) {
        let mut found = Vec::new();
        for (name, tenant) in &self.tenants {
            // Assigned at start: a lookup of a configured tenant does not fail.
            let Ok((uid, gid)) = self.uids.tenant(name) else {
                continue;
            };
            walk(&self.root.join(name), 0, &mut |dir, id| {
                found.push((id, tenant.clone(), dir.to_path_buf(), uid, gid));
            });
        }
        let mut map = self.write();
        for (id, tenant, dir, uid, gid) in found {
            map.entry(id).or_insert_with(|| {
                Arc::new(Sandbox {
                    params: tenant.params.clone(),
                    tenant,
                    worker: None,
                    cgroup: dir,
                    uid,
                    gid,
                })
            });
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<Sandbox>>> {
        self.by_cgroup.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<Sandbox>>> {
        self.by_cgroup.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn walk(dir: &Path, depth: usize, visit: &mut dyn FnMut(&Path, u64)) {
    const MAX_DEPTH: usize = 4;
    let Ok(id) = cgroup_id(dir) else { return };
    visit(dir, id);
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&entry.path(), depth + 1, visit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: u32 = 3_000_000_000;

    fn range(size: u32) -> UidRange {
        UidRange {
            first: FIRST,
            last: FIRST + size - 1,
        }
    }

    fn worker(name: &str) -> WorkerId {
        WorkerId {
            namespace: "customers".into(),
            name: name.into(),
        }
    }

    #[test]
    fn without_a_range_every_sandbox_is_the_sandbox_user() {
        let uids = SandboxUids::shared(65534, 65533);
        assert_eq!(uids.tenant("a").unwrap(), (65534, 65533));
        assert_eq!(uids.worker(&worker("w")).unwrap(), (65534, 65533));
        assert!(uids.all().is_empty());
    }

    #[test]
    fn each_tenant_and_worker_keeps_its_own_uid_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(UID_FILE);
        let uids = SandboxUids::assigned(range(10), path.clone(), (1, 1), ["b", "a"]).unwrap();
        let (a, b) = (uids.tenant("a").unwrap(), uids.tenant("b").unwrap());
        assert_ne!(a.0, b.0);
        assert_eq!(a.0, a.1, "gid is the same number");
        assert!([a.0, b.0].iter().all(|&u| range(10).contains(u)));
        let w = uids.worker(&worker("w")).unwrap();
        assert!(w.0 != a.0 && w.0 != b.0);
        // The same name in another namespace is another Worker.
        let other = uids
            .worker(&WorkerId {
                namespace: "others".into(),
                name: "w".into(),
            })
            .unwrap();
        assert_ne!(other.0, w.0);
        assert_eq!(uids.all().len(), 4);
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        }
        drop(uids);

        // A restart, with a tenant added and `a` gone from the config: the
        // others keep theirs, and `a`'s uid is not handed out again.
        let again = SandboxUids::assigned(range(10), path.clone(), (1, 1), ["b", "c"]).unwrap();
        assert_eq!(again.tenant("b").unwrap(), b);
        assert_eq!(again.worker(&worker("w")).unwrap(), w);
        let c = again.tenant("c").unwrap();
        assert!(![a.0, b.0, w.0, other.0].contains(&c.0));
        assert_eq!(again.all()["tenant:a"], a.0);
    }

    #[test]
    fn a_full_range_refuses_the_next_worker_and_hands_out_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(UID_FILE);
        let uids = SandboxUids::assigned(range(2), path.clone(), (1, 1), ["a"]).unwrap();
        uids.worker(&worker("w1")).unwrap();
        let err = uids.worker(&worker("w2")).unwrap_err();
        assert!(
            matches!(err, TenantError::UidsExhausted { assigned: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("worker:customers/w2"), "{err}");
        let held: BTreeSet<u32> = uids.all().values().copied().collect();
        assert_eq!(held.len(), 2);
        // Too many tenants for the range at start: an error, not a shared uid.
        assert!(matches!(
            SandboxUids::assigned(range(2), path, (1, 1), ["a", "b"]),
            Err(TenantError::UidsExhausted { .. })
        ));
    }

    #[test]
    fn entries_outside_a_changed_range_get_new_uids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(UID_FILE);
        let before = SandboxUids::assigned(range(10), path.clone(), (1, 1), ["a"]).unwrap();
        assert_eq!(before.tenant("a").unwrap().0, FIRST);
        drop(before);
        let moved = UidRange {
            first: FIRST + 100,
            last: FIRST + 109,
        };
        let after = SandboxUids::assigned(moved, path.clone(), (1, 1), ["a"]).unwrap();
        assert_eq!(after.tenant("a").unwrap().0, FIRST + 100);

        fs::write(&path, "not json").unwrap();
        assert!(matches!(
            SandboxUids::assigned(moved, path, (1, 1), ["a"]),
            Err(TenantError::UidFile { .. })
        ));
    }
}
