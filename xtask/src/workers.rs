//! Builds the example User Workers (`examples/workers/`, their own cargo
//! workspace) for `wasm32-wasip2` and copies each to `target/workers/NAME.wasm`,
//! where the worker runtime's tests and the demo configuration find them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const TARGET: &str = "wasm32-wasip2";

/// Builds every crate of `examples/workers/` (release, `--locked`) and copies
/// the components to `<root>/target/workers/NAME.wasm`. Installs the
/// `wasm32-wasip2` target with rustup first when it is missing.
pub fn build_workers(root: &Path) -> Result<()> {
    let workspace = root.join("examples").join("workers");
    let names = worker_names(&workspace)?;
    ensure_target()?;

    // One target dir under the main one, so nothing is left in examples/.
    let build_dir = root.join("target").join("workers-build");
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&workspace)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&build_dir)
        // Settings meant for the host build of the main workspace must not
        // leak into the wasm one.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let status = cmd
        .status()
        .context("cannot run cargo to build the example Workers")?;
    if !status.success() {
        bail!(
            "building the example Workers in {} failed ({status})",
            workspace.display()
        );
    }

    let out_dir = root.join("target").join("workers");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    for name in &names {
        let built = build_dir
            .join(TARGET)
            .join("release")
            .join(format!("{name}.wasm"));
        let dest = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&built, &dest)
            .with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
    }
    eprintln!(
        "xtask: built the example Workers {} into {}",
        names.join(", "),
        out_dir.display()
    );
    Ok(())
}

/// The crates of the Workers' workspace: every directory with a Cargo.toml.
fn worker_names(workspace: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(workspace)
        .with_context(|| format!("cannot read {}", workspace.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                // Cargo names the artifact after the crate, `-` becoming `_`.
                names.push(name.replace('-', "_"));
            }
        }
    }
    if names.is_empty() {
        bail!("no Worker crates in {}", workspace.display());
    }
    names.sort();
    Ok(names)
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| "cargo".into())
}

/// `rustup target add wasm32-wasip2`, only when the toolchain lacks it.
fn ensure_target() -> Result<()> {
    if target_installed() {
        return Ok(());
    }
    eprintln!("xtask: installing the {TARGET} target (for the example Workers)");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .context("cannot run rustup: the example Workers need the wasm32-wasip2 target")?;
    if !status.success() {
        bail!("rustup target add {TARGET} failed ({status})");
    }
    Ok(())
}

/// Whether the current toolchain's sysroot has the target's standard library.
fn target_installed() -> bool {
    let Ok(out) = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", TARGET])
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::read_dir(&libdir)
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("libstd-"))
            })
        })
        .unwrap_or(false)
}
