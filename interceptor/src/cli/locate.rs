//! Where the CLI finds the daemon: the config given (`--config` or
//! `INTERCEPTOR_CONFIG`), else the pointer file the running daemon wrote, else
//! the defaults of SPEC §4.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CliError;
use crate::config::Config;
use crate::dispatch::watch::worker_of;

/// Written by the daemon at start, so `exec`, `logs` and `status` work without `--config`.
pub const POINTER_FILE: &str = "/run/interceptor/daemon.json";

#[derive(Debug, Serialize, Deserialize)]
pub struct DaemonPointer {
    pub config: PathBuf,
    pub admin_socket: PathBuf,
    pub log_dir: PathBuf,
    pub pid: u32,
}

pub struct Located {
    pub admin_socket: PathBuf,
    pub log_dir: PathBuf,
    /// Every name a tenant log can have, when the config is known: its tenants and
    /// the User Workers now in its namespaces' folders.
    pub tenants: Vec<String>,
}

impl Located {
    fn from_config(config: &Config) -> Located {
        Located {
            admin_socket: config.interceptor.admin_socket.clone(),
            log_dir: config.interceptor.log_dir.clone(),
            tenants: tenants_of(config),
        }
    }
}

/// The config's tenants and the User Workers now in its namespaces' folders.
fn tenants_of(config: &Config) -> Vec<String> {
    let workers = config.dispatch_namespaces.iter().flat_map(|ns| {
        std::fs::read_dir(&ns.workers)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let file = entry.ok()?.file_name();
                worker_of(file.to_str()?).map(str::to_string)
            })
    });
    config.tenants.keys().cloned().chain(workers).collect()
}

pub fn locate(config: Option<&Path>) -> Result<Located, CliError> {
    if let Some(path) = config {
        let config = crate::config::load(path).map_err(CliError::config)?;
        return Ok(Located::from_config(&config));
    }
    if let Some(pointer) = std::fs::read_to_string(POINTER_FILE)
        .ok()
        .and_then(|text| serde_json::from_str::<DaemonPointer>(&text).ok())
    {
        // The running daemon's config, if it still reads, knows the tenants.
        let tenants = crate::config::load(&pointer.config)
            .map(|config| tenants_of(&config))
            .unwrap_or_default();
        return Ok(Located {
            admin_socket: pointer.admin_socket,
            log_dir: pointer.log_dir,
            tenants,
        });
    }
    Ok(Located {
        admin_socket: PathBuf::from("/run/interceptor/admin.sock"),
        log_dir: PathBuf::from("/var/log/interceptor"),
        tenants: Vec::new(),
    })
}
