//! The last step of every subrequest: count it for `interceptor status` and, when
//! the tenant's outbound Worker logs, append it to the tenant's log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};

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

/// [`TenantCounters`] that relay threads bump without a lock.
#[derive(Default)]
struct LiveCounters {
    allowed: AtomicU64,
    blocked: AtomicU64,
    errors: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl LiveCounters {
    fn snapshot(&self) -> TenantCounters {
        TenantCounters {
            allowed: self.allowed.load(Relaxed),
            blocked: self.blocked.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
        }
    }
}

pub struct Recorder {
    writer: LogWriter,
    counters: RwLock<HashMap<String, Arc<LiveCounters>>>,
}

impl Recorder {
    pub fn new(writer: LogWriter) -> Arc<Self> {
        Arc::new(Recorder {
            writer,
            counters: RwLock::new(HashMap::new()),
        })
    }

    /// Counts `entry` and, if `log`, writes it; the line is in the file when this returns.
    pub fn record(&self, entry: &LogEntry, log: bool) {
        let c = self.counters_of(&entry.tenant);
        match entry.decision {
            Verdict::Allow => &c.allowed,
            Verdict::Block => &c.blocked,
            Verdict::Error => &c.errors,
        }
        .fetch_add(1, Relaxed);
        c.bytes_sent.fetch_add(entry.bytes_sent, Relaxed);
        c.bytes_received.fetch_add(entry.bytes_received, Relaxed);
        if log {
            if let Err(e) = self.writer.write(entry) {
                tracing::error!(tenant = %entry.tenant, "cannot write log entry: {e}");
            }
        }
    }

    fn counters_of(&self, tenant: &str) -> Arc<LiveCounters> {
        if let Some(c) = self
            .counters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
        {
            return c.clone();
        }
        self.counters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(tenant.to_owned())
            .or_default()
            .clone()
    }

    pub fn counters(&self) -> BTreeMap<String, TenantCounters> {
        self.counters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(tenant, c)| (tenant.clone(), c.snapshot()))
            .collect()
    }

    /// Makes every written line durable (on shutdown, and periodically).
    pub fn flush(&self) {
        if let Err(e) = self.writer.flush() {
            tracing::error!("cannot flush logs: {e}");
        }
    }
}
