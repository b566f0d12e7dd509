use std::process::ExitCode;

// The relay allocates per request (headers, log lines); glibc's malloc showed up
// in its profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use interceptor::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INTERCEPTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let code = match cli.command {
        Command::Run { config } => run_daemon(&config),
        command => match cli::run_command(command) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{e}");
                e.code
            }
        },
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn run_daemon(path: &std::path::Path) -> i32 {
    let config = match interceptor::config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("interceptor: cannot start the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(interceptor::daemon::run(config, path.to_path_buf())) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("interceptor: {e}");
            1
        }
    }
}
