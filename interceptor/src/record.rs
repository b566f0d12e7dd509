//! The last step of every subrequest: count it for `interceptor status` and, when
//! the tenant's outbound Worker logs, append it to the tenant's log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::logs::{LogEntry, LogWriter, Verdict};

/// Per-tenant totals since the daemon started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantCounters {
    pub allowed: u64,
    pub blocked: u64,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

pub struct Recorder {
    writer: LogWriter,
    counters: Mutex<BTreeMap<String, TenantCounters>>,
}

impl Recorder {
    pub fn new(writer: LogWriter) -> Arc<Self> {
        Arc::new(Recorder {
            writer,
            counters: Mutex::new(BTreeMap::new()),
        })
    }

    /// Counts `entry` and, if `log`, writes it; the line is in the file when this returns.
    pub fn record(&self, entry: &LogEntry, log: bool) {
        {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            let c = counters.entry(entry.tenant.clone()).or_default();
            match entry.decision {
                Verdict::Allow => c.allowed += 1,
                Verdict::Block => c.blocked += 1,
                Verdict::Error => c.errors += 1,
            }
            c.bytes_sent += entry.bytes_sent;
            c.bytes_received += entry.bytes_received;
        }
        if log {
            if let Err(e) = self.writer.write(entry) {
                tracing::error!(tenant = %entry.tenant, "cannot write log entry: {e}");
            }
        }
    }

    pub fn counters(&self) -> BTreeMap<String, TenantCounters> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes every written line durable (on shutdown, and periodically).
    pub fn flush(&self) {
        if let Err(e) = self.writer.flush() {
            tracing::error!("cannot flush logs: {e}");
        }
    }
}
