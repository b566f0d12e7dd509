//! Where the CLI finds the daemon: the config given (`--config` or
//! `INTERCEPTOR_CONFIG`), else the pointer file the running daemon wrote, else
//! the defaults of SPEC §4.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CliError;

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
}

pub fn locate(config: Option<&Path>) -> Result<Located, CliError> {
    if let Some(path) = config {
        let config = crate::config::load(path).map_err(CliError::config)?;
        return Ok(Located {
            admin_socket: config.interceptor.admin_socket.clone(),
            log_dir: config.interceptor.log_dir.clone(),
        });
    }
    if let Some(pointer) = std::fs::read_to_string(POINTER_FILE)
        .ok()
        .and_then(|text| serde_json::from_str::<DaemonPointer>(&text).ok())
    {
        return Ok(Located {
            admin_socket: pointer.admin_socket,
            log_dir: pointer.log_dir,
        });
    }
    Ok(Located {
        admin_socket: PathBuf::from("/run/interceptor/admin.sock"),
        log_dir: PathBuf::from("/var/log/interceptor"),
    })
}
