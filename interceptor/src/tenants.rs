//! Who is behind a redirected connection: the cgroup id the eBPF hooks recorded
//! names a sandbox, and the sandbox names its tenant, its outbound policy and the
//! outbound parameters its requests carry.
//!
//! Layout under the interceptor's cgroup subtree:
//! `<cgroup>/<tenant>` for each tenant, `<cgroup>/<tenant>/exec-*` for each
//! `interceptor exec`, whose `--param`s override the tenant's own.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

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
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
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
    by_cgroup: RwLock<HashMap<u64, Arc<Sandbox>>>,
    next_exec: AtomicU64,
}

impl SandboxRegistry {
    /// Creates `root` and one cgroup per tenant under it.
    pub fn create(root: PathBuf, tenants: Vec<Tenant>) -> Result<Self, TenantError> {
        fs::create_dir_all(&root).map_err(cgroup_err(&root))?;
        let registry = SandboxRegistry {
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
            walk(&self.root.join(name), 0, &mut |dir, id| {
                found.push((id, tenant.clone(), dir.to_path_buf()));
            });
        }
        let mut map = self.write();
        for (id, tenant, dir) in found {
            map.entry(id).or_insert_with(|| {
                Arc::new(Sandbox {
                    params: tenant.params.clone(),
                    tenant,
                    worker: None,
                    cgroup: dir,
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
