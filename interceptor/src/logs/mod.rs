//! Per-tenant subrequest logs (SPEC §6) and the `interceptor logs` command (SPEC §3).
//!
//! * [`LogEntry`] is one line of `<log_dir>/<tenant>.jsonl`: one JSON object per line,
//!   every key always present (`null` when absent), so the schema is stable for
//!   `jq` and log shippers.
//! * [`LogWriter`] appends entries synchronously (one `write(2)` on an `O_APPEND` file
//!   per entry, so a line is in the file when `write` returns), with size-bounded rotation
//!   (`<tenant>.jsonl` → `<tenant>.jsonl.1` → … → `<tenant>.jsonl.<keep>`).
//! * [`print_logs`] / [`follow_logs`] read them back for `interceptor logs`, as a table or
//!   as the raw JSON lines, with `--since`, `--decision`, `--tenant` and `--follow`.

mod entry;
mod query;
mod table;
mod writer;

use std::io;
use std::path::PathBuf;

pub use entry::{redact_url, LogEntry, Proto, Verdict};
pub use query::{follow_logs, parse_since, print_logs, LogQuery};
pub use table::{table_header, table_row};
pub use writer::{validate_tenant, LogWriter};

/// Everything that can go wrong writing or reading logs. Each variant displays as one
/// line naming the cause.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `interceptor logs --tenant NAME` for a name that is neither configured nor
    /// has a log file.
    #[error("unknown tenant `{0}`: it is not in the config and has no logs")]
    UnknownTenant(String),
    /// A tenant name that cannot be a log file name (empty, `/`, leading `.`, NUL, too long).
    #[error("invalid tenant name `{0}`: it must be non-empty, at most 200 bytes, without `/` or NUL, and not start with `.`")]
    InvalidTenant(String),
    /// The log directory does not exist (reading side).
    #[error("log directory {} does not exist (check `log_dir` in the config; the daemon creates it when it starts)", .0.display())]
    NoLogDir(PathBuf),
    /// `--since` that is not a duration.
    #[error("invalid duration `{input}`: {reason} (expected e.g. 30s, 5m, 1h30m, 2d)")]
    BadSince { input: String, reason: String },
    /// `--decision` that is not allow/block/error.
    #[error("invalid decision `{0}`: expected allow, block or error")]
    BadDecision(String),
    /// `proto` that is not http/tls/tcp/dns.
    #[error("invalid protocol `{0}`: expected http, tls, tcp or dns")]
    BadProto(String),
    /// An I/O error, with what was being done and on which file.
    #[error("{context}: {err}")]
    Io { context: String, err: io::Error },
    /// An entry that could not be serialized (should not happen).
    #[error("cannot serialize log entry: {0}")]
    Serialize(serde_json::Error),
}

impl LogError {
    pub(crate) fn io(context: impl Into<String>, err: io::Error) -> Self {
        LogError::Io {
            context: context.into(),
            err,
        }
    }

    /// The process exit code for this error under SPEC §3: 2 for usage errors (a bad
    /// `--since`, `--decision` or tenant name, an unknown tenant, as `exec` has it too),
    /// 1 for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            LogError::UnknownTenant(_)
            | LogError::BadSince { .. }
            | LogError::BadDecision(_)
            | LogError::BadProto(_)
            | LogError::InvalidTenant(_) => 2,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests;
