//! `cargo xtask`: build, run and test interceptor.
//!
//! - `cargo xtask build [--release]`: installs the nightly components the eBPF
//!   build needs (when missing), then builds `target/{debug,release}/interceptor`
//!   (whose build script builds and embeds the eBPF object).
//! - `cargo xtask run [--release] [--config FILE] [-- ARGS...]`: builds, then
//!   becomes `interceptor run --config examples/interceptor.toml`.
//! - `cargo xtask test [-- CARGO TEST ARGS...]`: builds, then `cargo test --workspace`.
//! - `cargo xtask bench [--seconds N] [--connections N]`: wrk against direct
//!   connections, ratios and RSS; writes `target/bench/report.json`.

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::OnceLock,
};

mod bench;
mod workers;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Nightly components the eBPF build needs: `rust-src` for `-Z build-std=core`,
/// `llvm-tools` for `interceptor-ebpf/bpf-link` (llvm-link, opt, llc).
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "llvm-tools"];

/// Debian packages the benchmark runs: the load generator and the upstream.
const BENCH_PACKAGES: &[&str] = &["wrk", "nginx-light", "python3"];

/// Debian packages the tests run (as sandboxed programs).
const TEST_PACKAGES: &[&str] = &["curl", "python3"];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test interceptor")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object and the interceptor binary that embeds it.
    Build {
        /// Build target/release/interceptor instead of target/debug/interceptor.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the daemon with examples/interceptor.toml.
    Run {
        #[arg(long)]
        release: bool,
        /// Configuration file (relative to the repository root).
        #[arg(long, default_value = "examples/interceptor.toml")]
        config: PathBuf,
        /// More arguments for `interceptor run`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then run every test (privileged ones too when root).
    Test {
        /// Arguments passed on to `cargo test --workspace`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Measure throughput and latency against direct connections (release build).
    Bench {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Concurrent wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Build { release } => build(release),
        Task::Run {
            release,
            config,
            args,
        } => run(release, &config, &args),
        Task::Test { args } => test(&args),
        Task::Bench {
            seconds,
            connections,
        } => bench(bench::Options {
            seconds,
            connections,
        }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (the workspace holding `xtask/`).
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask/ has a parent")
            .to_path_buf()
    })
}

/// The cargo running us (`cargo xtask` is `cargo run`), else `cargo`.
fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn status(cmd: &mut Command) -> Result<std::process::ExitStatus> {
    cmd.status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))
}

/// Runs `cmd`; an unsuccessful exit becomes an error naming it.
fn check(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{} failed ({st})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn exit_code(st: std::process::ExitStatus) -> ExitCode {
    match st.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

fn build(release: bool) -> Result<ExitCode> {
    ensure_nightly()?;
    // The example User Workers (target/workers/NAME.wasm) for the demo and tests.
    workers::build_workers(root())?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", "interceptor"]);
    if release {
        cmd.arg("--release");
    }
    check(&mut cmd)?;
    let bin = root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("interceptor");
    eprintln!("xtask: built {}", bin.display());
    Ok(ExitCode::SUCCESS)
}

fn run(release: bool, config: &Path, args: &[OsString]) -> Result<ExitCode> {
    build(release)?;
    let bin = root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("interceptor");
    if config == Path::new("examples/interceptor.toml") {
        // Git keeps no file modes but the executable bit: the demo's signing key
        // comes out readable by everyone, sandboxes included.
        let key = root().join("examples/demo-jwt.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", key.display()))?;
        print_demo_tour(&bin);
    }
    let mut cmd = Command::new(&bin);
    cmd.current_dir(root())
        .arg("run")
        .arg("--config")
        .arg(root().join(config))
        .args(args);
    // Become the daemon: signals reach it directly and its exit status is ours.
    let error = cmd.exec();
    Err(error).with_context(|| format!("cannot start {}", bin.display()))
}

/// What to try against the demo daemon, from another terminal.
fn print_demo_tour(bin: &Path) {
    let i = bin.display();
    eprintln!(
        "\n\
xtask: the demo daemon is starting. Try, from another terminal (as root):\n\
\n\
  # User Workers through the dispatcher of namespace \"customers\"\n\
  curl -s -H 'Host: hello.example.com' http://127.0.0.1:8080/\n\
  curl -s -H 'Host: nobody.example.com' -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:8080/   # 404\n\
  curl -s -H 'Host: spin.example.com' http://127.0.0.1:8080/                                     # 500 after cpu_ms\n\
  python3 -m http.server --bind 127.0.0.2 8000 &   # an upstream the demo calls api.example.com\n\
  curl -s -H 'Host: fetch.example.com' 'http://127.0.0.1:8080/?url=http://api.example.com:8000/'\n\
  curl -s -H 'Host: fetch.example.com' 'http://127.0.0.1:8080/?url=http://evil.example.com/'      # blocked\n\
\n\
  # any program, under the tenant acme's outbound Worker\n\
  {i} exec --tenant acme -- curl -s http://api.example.com:8000/\n\
  {i} exec --tenant acme -- curl -s -H 'Host: evil.example.com' http://127.0.0.2:8000/\n\
\n\
  {i} logs --tenant fetch      # or --tenant acme, --json, --follow\n\
  {i} status\n"
    );
}

fn test(args: &[OsString]) -> Result<ExitCode> {
    if is_root() {
        ensure_debian_packages(TEST_PACKAGES)?;
    } else if env::var("INTERCEPTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!(
            "xtask: not root, and INTERCEPTOR_REQUIRE_PRIVILEGED=1: the privileged tests will fail"
        );
    } else {
        eprintln!("xtask: not root: the privileged tests will be skipped");
    }
    // The integration tests start target/debug/interceptor; the Worker tests
    // load target/workers/NAME.wasm.
    build(false)?;
    // --no-fail-fast: every test binary runs, so one failure does not hide others.
    let st = status(
        cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args),
    )?;
    Ok(exit_code(st))
}

fn bench(options: bench::Options) -> Result<ExitCode> {
    if !is_root() {
        bail!("`cargo xtask bench` needs root: it loads the eBPF programs");
    }
    ensure_debian_packages(BENCH_PACKAGES)?;
    build(true)?;
    bench::run(root(), &options)?;
    Ok(ExitCode::SUCCESS)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The nightly toolchain with [`NIGHTLY_COMPONENTS`], installed when missing.
fn ensure_nightly() -> Result<()> {
    let rustup = || {
        let mut cmd = Command::new("rustup");
        // Our own RUSTUP_TOOLCHAIN (stable, from `cargo xtask`) must not
        // override the explicit --toolchain below.
        cmd.env_remove("RUSTUP_TOOLCHAIN");
        cmd
    };
    let installed = rustup()
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .stderr(Stdio::null())
        .output()
        .context("cannot run rustup: the eBPF build needs rustup (https://rustup.rs)")?;
    if !installed.status.success() {
        eprintln!("xtask: installing the nightly toolchain (for the eBPF build)");
        let mut cmd = rustup();
        cmd.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
        for component in NIGHTLY_COMPONENTS {
            cmd.args(["--component", component]);
        }
        return check(&mut cmd);
    }
    let installed = String::from_utf8_lossy(&installed.stdout);
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|component| {
            !installed.lines().any(|line| {
                let line = line.trim();
                // `rust-src`, `llvm-tools-x86_64-unknown-linux-gnu`, ...
                line == *component || line.starts_with(&format!("{component}-"))
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing nightly components: {}",
        missing.join(" ")
    );
    check(
        rustup()
            .args(["component", "add"])
            .args(&missing)
            .args(["--toolchain", "nightly"]),
    )
}

/// Installs the Debian packages among `packages` that are missing, with
/// `apt-get -y install` (after one `apt-get update`). Needs root; on a system
/// without dpkg it only says what it could not check.
fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    if Command::new("dpkg-query")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "xtask: not a Debian system: make sure these are installed: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    check(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    check(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}
