//! The `interceptor` command line (SPEC §3). Every failure becomes one line on
//! stderr and an exit code: 2 for usage and configuration errors, 1 for the rest.

mod exec;
mod locate;

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::admin::{self, Reply, Request};
use crate::logs::{self, LogQuery, Verdict};

pub use locate::{DaemonPointer, POINTER_FILE};

#[derive(Parser, Debug)]
#[command(
    name = "interceptor",
    version,
    about = "Kernel-enforced egress control for multi-tenant code"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: attach the eBPF programs, serve relay, DNS and the admin socket.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a command inside a tenant's sandbox; exits with the command's status.
    Exec {
        #[arg(long, value_name = "NAME")]
        tenant: String,
        /// An outbound parameter for this run, over the tenant's own.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// The daemon's configuration (default: the running daemon's).
        #[arg(long, value_name = "FILE", env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Show a tenant's subrequest log.
    Logs {
        #[arg(long, value_name = "NAME")]
        tenant: Option<String>,
        /// Only entries newer than this, e.g. 5m, 1h30m, 2d.
        #[arg(long, value_name = "DURATION", value_parser = parse_since)]
        since: Option<std::time::Duration>,
        #[arg(long, value_enum)]
        decision: Option<Verdict>,
        /// Keep printing new entries.
        #[arg(long, short)]
        follow: bool,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "FILE", env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Whether the daemon runs, what is attached where, per-tenant counters.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "FILE", env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Internal: one User Worker's sandboxed process, started by a dispatcher
    /// (fd 3: its channel, fd 4: its precompiled component).
    #[command(hide = true)]
    Worker(crate::worker::WorkerArgs),
}

/// A failure the CLI reports: one line, one exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
    /// Configuration errors are printed as they are (`FILE:LINE:COL: message`),
    /// everything else after `interceptor: `.
    pub bare: bool,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: message.into(),
            bare: false,
        }
    }

    pub fn failure(message: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: message.into(),
            bare: false,
        }
    }

    pub fn config(error: crate::config::ConfigError) -> Self {
        CliError {
            code: 2,
            message: error.to_string(),
            bare: true,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bare {
            f.write_str(&self.message)
        } else {
            write!(f, "interceptor: {}", self.message)
        }
    }
}

impl From<admin::AdminError> for CliError {
    fn from(e: admin::AdminError) -> Self {
        CliError::failure(e.to_string())
    }
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((key.to_string(), value.to_string()))
}

fn parse_since(s: &str) -> Result<std::time::Duration, String> {
    logs::parse_since(s).map_err(|e| e.to_string())
}

/// Runs every command but `run` (the daemon needs its own runtime); returns the exit code.
pub fn run_command(command: Command) -> Result<i32, CliError> {
    match command {
        Command::Run { .. } => unreachable!("the daemon is started by main"),
        Command::Check { config } => check(&config),
        Command::Exec {
            tenant,
            params,
            config,
            command,
        } => {
            let located = locate::locate(config.as_deref())?;
            exec::run(&located.admin_socket, &tenant, params, command)
        }
        Command::Logs {
            tenant,
            since,
            decision,
            follow,
            json,
            config,
        } => {
            let located = locate::locate(config.as_deref())?;
            let query = LogQuery {
                tenant,
                since,
                decision,
                follow,
                json,
                known_tenants: located.tenants,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            logs::print_logs(&located.log_dir, &query, &mut out).map_err(|e| CliError {
                code: e.exit_code(),
                message: e.to_string(),
                bare: false,
            })?;
            let _ = out.flush();
            Ok(0)
        }
        Command::Status { json, config } => status(config.as_deref(), json),
        Command::Worker(args) => Ok(crate::worker::run_process(args)),
    }
}

fn check(path: &Path) -> Result<i32, CliError> {
    match crate::config::load(path) {
        Ok(config) => {
            for warning in config.host_warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!("{}: ok", path.display());
            Ok(0)
        }
        Err(e) => Err(CliError::config(e)),
    }
}

fn status(config: Option<&Path>, json: bool) -> Result<i32, CliError> {
    let located = locate::locate(config)?;
    let status = match admin::call(&located.admin_socket, &Request::Status)? {
        Reply::Status(status) => status,
        Reply::Error { message, .. } => return Err(CliError::failure(message)),
        other => return Err(CliError::failure(format!("unexpected reply {other:?}"))),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "daemon: running (pid {}, since {})",
        status.pid, status.started
    );
    println!("config: {}", status.config.display());
    println!("relay: {}", status.relay.join(", "));
    println!("dns: {}", status.dns.join(", "));
    println!("logs: {}", status.log_dir.display());
    println!("cgroup: {}", status.cgroup.display());
    for program in &status.attached {
        println!(
            "  attached {:<22} id {:<6} {}",
            program.attach_type, program.id, program.name
        );
    }
    println!("lsm: {}", status.lsm);
    let e = &status.enforcement;
    println!(
        "refused: {} packets out, {} packets in, {} socket calls",
        e.egress_dropped, e.ingress_dropped, e.calls_refused
    );
    if let Some(range) = &status.sandbox_uids {
        println!("sandbox uids: {range}");
    }
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>14} {:>14} {:>6} {:>10}",
        "TENANT", "ALLOWED", "BLOCKED", "ERRORS", "BYTES_SENT", "BYTES_RECEIVED", "OPEN", "UID"
    );
    for (tenant, c) in &status.tenants {
        // A tenant's uid, else (a Worker's counters) its Worker's.
        let uid = status
            .uids
            .get(&format!("tenant:{tenant}"))
            .or_else(|| {
                status
                    .uids
                    .iter()
                    .find(|(k, _)| {
                        k.strip_prefix("worker:")
                            .and_then(|w| w.split_once('/'))
                            .is_some_and(|(_, name)| name == tenant)
                    })
                    .map(|(_, uid)| uid)
            })
            .map_or("-".to_string(), u32::to_string);
        println!(
            "{:<20} {:>10} {:>10} {:>10} {:>14} {:>14} {:>6} {:>10}",
            tenant,
            c.allowed,
            c.blocked,
            c.errors,
            c.bytes_sent,
            c.bytes_received,
            c.open_connections,
            uid
        );
    }
    for ns in &status.dispatch {
        println!(
            "namespace {} on {} ({}): {} Worker process(es)",
            ns.namespace,
            ns.listen,
            ns.workers_dir.display(),
            ns.workers.len()
        );
        for w in &ns.workers {
            println!(
                "  worker {:<20} pid {:<8} requests {:<8} in flight {:<4} starts {:<4} component {} uid {}",
                w.name, w.pid, w.requests, w.in_flight, w.starts, w.component, w.uid
            );
        }
    }
    Ok(0)
}
