//! Finding the cgroup v2 hierarchy and cgroup ids.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::EbpfError;

const MOUNTS: &str = "/proc/self/mounts";

/// The mount point of the cgroup v2 (`cgroup2`) filesystem, from
/// `/proc/self/mounts`: `/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified`
/// on hybrid layouts.
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    parse_cgroup2_mount(&read_mounts()?).ok_or(EbpfError::NoCgroup2)
}

/// Whether a filesystem of type `fstype` is mounted at `path`.
pub(crate) fn is_mounted(path: &Path, fstype: &str) -> Result<bool, EbpfError> {
    Ok(mount_points(&read_mounts()?, fstype).any(|target| target == path))
}

fn read_mounts() -> Result<String, EbpfError> {
    fs::read_to_string(MOUNTS).map_err(|source| EbpfError::Mounts {
        path: PathBuf::from(MOUNTS),
        source,
    })
}

/// The mount points of type `fstype` in a `/proc/self/mounts` text, in order.
fn mount_points<'a>(mounts: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    mounts.lines().filter_map(move |line| {
        let mut fields = line.split_ascii_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// The first `cgroup2` mount point in a `/proc/self/mounts` text.
pub(crate) fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mount_points(mounts, "cgroup2").next()
}

/// `/proc/self/mounts` writes space, tab, newline and backslash in paths as
/// three-digit octal escapes (`\040`).
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for processes in it.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn finds_mount_points_by_type() {
        let mounts = "bpf /sys/fs/bpf bpf rw 0 0\n\
                      securityfs /sys/kernel/security securityfs rw 0 0\n\
                      bpf /mnt/my\\040bpf bpf rw 0 0\n";
        let bpf: Vec<PathBuf> = mount_points(mounts, "bpf").collect();
        assert_eq!(
            bpf,
            [PathBuf::from("/sys/fs/bpf"), PathBuf::from("/mnt/my bpf")]
        );
        assert_eq!(mount_points(mounts, "cgroup2").count(), 0);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount_path(r"/mnt/my\040cg"), "/mnt/my cg");
        assert_eq!(unescape_mount_path(r"/a\\b"), r"/a\\b");
        assert_eq!(unescape_mount_path(r"/tail\04"), r"/tail\04");
    }
}
