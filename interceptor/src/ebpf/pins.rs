//! What must outlive the daemon lives on a bpffs, one directory per subtree:
//! the links of the task-keyed programs at the cgroup root and of the LSM
//! programs (a link is detached when its last reference goes, and the daemon's
//! descriptors go when it dies: the pin is that last reference), the map of
//! the sockets created in the subtree (a restarted daemon must still know
//! them, or they would look passed in) and the per-tenant socket counts.
//!
//! `/sys/fs/bpf/interceptor/<subtree>/`, where `<subtree>` is the cgroup's path
//! below the cgroup v2 mount with `%` and `/` percent-encoded.

use std::{
    fs, io,
    os::{fd::AsFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
};

use super::{cgroup::is_mounted, sys, EbpfError};

const BPFFS: &str = "/sys/fs/bpf";
const ROOT: &str = "interceptor";
const SECURITYFS: &str = "/sys/kernel/security";

/// The subtree's pin directory, created (root only) if missing, on a bpffs
/// mounted at `/sys/fs/bpf` if nothing is mounted there yet.
pub(crate) fn subtree_dir(cgroup_mount: &Path, subtree: &Path) -> Result<PathBuf, EbpfError> {
    let bpffs = Path::new(BPFFS);
    if !is_mounted(bpffs, "bpf")? {
        fs::create_dir_all(bpffs).map_err(|source| pin_error(bpffs, source))?;
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|errno| pin_error(bpffs, errno.into()))?;
    }
    let root = bpffs.join(ROOT);
    let dir = existing_subtree_dir(cgroup_mount, subtree);
    fs::create_dir_all(&dir).map_err(|source| pin_error(&dir, source))?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
        .map_err(|source| pin_error(&root, source))?;
    Ok(dir)
}

/// Removes the pins of subtrees whose cgroup is gone (their programs could
/// never match a task again), detaching what only the pins held.
pub(crate) fn remove_stale(cgroup_mount: &Path) {
    let Ok(entries) = fs::read_dir(Path::new(BPFFS).join(ROOT)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(subtree) = name.to_str().map(decode) else {
            continue;
        };
        if !cgroup_mount.join(subtree).is_dir() {
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), "cannot remove stale eBPF pins: {e}");
            }
        }
    }
}

/// Where the subtree's pins are, if it has any (nothing is created).
pub(crate) fn existing_subtree_dir(cgroup_mount: &Path, subtree: &Path) -> PathBuf {
    Path::new(BPFFS)
        .join(ROOT)
        .join(encode(&relative(cgroup_mount, subtree)))
}

/// Removes a subtree's pins (a deliberate uninstall, or a test's cleanup).
pub(crate) fn remove_subtree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Attaches program `our_id` through a link pinned at `dir/name`, in place of
/// what was pinned there; nothing when it is pinned there already. `attach`
/// makes the link and pins it at the path it is given; the new pin then takes
/// the old one's name in one rename, so the hook is never without a link.
pub(crate) fn attach_pinned(
    dir: &Path,
    name: &str,
    our_id: u32,
    attach: impl FnOnce(&Path) -> Result<(), EbpfError>,
) -> Result<(), EbpfError> {
    if pinned_program(dir, name) == Some(our_id) {
        return Ok(());
    }
    let path = dir.join(name);
    // bpffs takes no '.' in a name.
    let staged = dir.join(format!("{name}_new"));
    let _ = fs::remove_file(&staged);
    attach(&staged)?;
    fs::rename(&staged, &path).map_err(|e| pin_error(&path, e))
}

/// The id of the program behind the link pinned at `dir/name`, if any.
pub(crate) fn pinned_program(dir: &Path, name: &str) -> Option<u32> {
    let link = sys::obj_get(&dir.join(name)).ok()?;
    sys::link_prog_id(link.as_fd()).ok()
}

/// Whether the BPF LSM is among the kernel's active LSMs (`lsm=` at boot),
/// reading `/sys/kernel/security/lsm` (mounting securityfs if needed). Its
/// programs load anywhere, but run only where it is active.
pub(crate) fn bpf_lsm_active() -> io::Result<bool> {
    let securityfs = Path::new(SECURITYFS);
    if !is_mounted(securityfs, "securityfs").map_err(io::Error::other)? {
        nix::mount::mount(
            Some("securityfs"),
            securityfs,
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
    }
    let list = fs::read_to_string(securityfs.join("lsm"))?;
    Ok(list.trim().split(',').any(|lsm| lsm == "bpf"))
}

fn relative(cgroup_mount: &Path, subtree: &Path) -> PathBuf {
    subtree
        .strip_prefix(cgroup_mount)
        .unwrap_or(subtree)
        .to_path_buf()
}

fn encode(subtree: &Path) -> String {
    subtree
        .to_string_lossy()
        .trim_matches('/')
        .replace('%', "%25")
        .replace('/', "%2F")
}

fn decode(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

fn pin_error(path: &Path, source: io::Error) -> EbpfError {
    EbpfError::Pin {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_names_round_trip() {
        for subtree in ["interceptor", "a/b", "100%/x"] {
            let name = encode(Path::new(subtree));
            assert!(!name.contains('/'));
            assert_eq!(decode(&name), subtree);
        }
        assert_eq!(
            relative(
                Path::new("/sys/fs/cgroup/unified"),
                Path::new("/sys/fs/cgroup/unified/a/b")
            ),
            PathBuf::from("a/b")
        );
    }
}
