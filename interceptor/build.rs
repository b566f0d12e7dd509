//! Builds the eBPF object (`interceptor-ebpf`, its own workspace) with nightly
//! for `bpfel-unknown-none` and puts it at `$OUT_DIR/interceptor.bpf.o`, where
//! `src/ebpf` embeds it.
//!
//! The nested build uses `-Z build-std=core` (needs nightly's rust-src) and
//! links with `interceptor-ebpf/bpf-link` (needs nightly's llvm-tools);
//! `cargo xtask build` installs both.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const TARGET: &str = "bpfel-unknown-none";
const HINT: &str = "run `cargo xtask build`, which installs what the eBPF build needs";

fn main() {
    if let Err(message) = build() {
        // One line, shown by cargo as `error: ...`.
        println!("cargo::error={message}");
    }
}

fn build() -> Result<(), String> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let root = manifest_dir
        .parent()
        .ok_or("interceptor/ has no parent directory")?
        .to_path_buf();
    let ebpf_dir = root.join("interceptor-ebpf");
    let common_dir = root.join("interceptor-common");
    let linker = ebpf_dir.join("bpf-link");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);

    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        linker.clone(),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=BPF_LLVM_BIN");

    check_toolchain()?;

    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--manifest-path"])
        .arg(ebpf_dir.join("Cargo.toml"))
        .args(["-Z", "build-std=core", "--target", TARGET, "--release"])
        .arg("--target-dir")
        .arg(&target_dir);
    scrub_env(&mut cmd);
    cmd.env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker);
    // The nested cargo's output goes to this build script's stderr (never its
    // stdout, which cargo parses), shown when the build fails.
    let status = cmd
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| {
            format!("cannot run `rustup run nightly cargo` for the eBPF build ({e}); {HINT}")
        })?;
    if !status.success() {
        return Err(format!(
            "building the eBPF programs (interceptor-ebpf) failed ({status}); see the output above, \
             or {HINT} if the nightly toolchain is incomplete"
        ));
    }

    let built = target_dir.join(TARGET).join("release").join("interceptor");
    let dest = out_dir.join("interceptor.bpf.o");
    fs::copy(&built, &dest)
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), dest.display()))?;
    Ok(())
}

/// nightly with rust-src (for build-std) and llvm-tools (for bpf-link).
fn check_toolchain() -> Result<(), String> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "rustc", "--print", "sysroot"]);
    scrub_env(&mut cmd);
    let output = cmd.output().map_err(|e| {
        format!(
            "cannot run rustup ({e}): the eBPF build needs rustup with a nightly toolchain; {HINT}"
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "the nightly toolchain is not installed (needed for the eBPF build); {HINT}"
        ));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let rust_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !rust_src.is_dir() {
        return Err(format!(
            "nightly's rust-src component is missing (needed for the eBPF build); {HINT}"
        ));
    }
    if !has_llvm_tools(&sysroot.join("lib/rustlib")) {
        return Err(format!(
            "nightly's llvm-tools component is missing (needed for the eBPF build); {HINT}"
        ));
    }
    Ok(())
}

fn has_llvm_tools(rustlib: &Path) -> bool {
    let Ok(entries) = fs::read_dir(rustlib) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let bin = entry.path().join("bin");
        ["llvm-link", "opt", "llc"]
            .iter()
            .all(|tool| bin.join(tool).is_file())
    })
}

/// Removes what the outer cargo (or clippy, or a wrapper) set for this build
/// and that would leak into the nested nightly build of another workspace.
fn scrub_env(cmd: &mut Command) {
    const EXACT: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "MAKEFLAGS",
        "MFLAGS",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
    ];
    // CARGO_* that configure the user's cargo itself (home, network, registries,
    // terminal) are kept; everything else cargo set for this build script goes.
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    for (key, _) in env::vars_os() {
        let name = key.to_string_lossy();
        let drop = EXACT.contains(&name.as_ref())
            || name.starts_with("__CARGO")
            || (name.starts_with("CARGO_") && !KEEP_PREFIXES.iter().any(|p| name.starts_with(p)));
        if drop {
            cmd.env_remove::<OsString>(key);
        }
    }
}
