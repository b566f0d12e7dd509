//! The last step of every subrequest: count it for `interceptor status` and the
//! metrics and, when the tenant's outbound Worker logs, append it to the
//! tenant's log (one place, so that the three always agree).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};

use serde::{Deserialize, Serialize};

use crate::logs::{LogEntry, LogWriter, Verdict};
use crate::metrics::{Metrics, TenantMetrics};

/// Per-tenant totals since the daemon started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantCounters {
    pub allowed: u64,
    pub blocked: u64,
    pub errors: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Relay connections open now (filled in by the daemon, which knows them).
    #[serde(default)]
    pub open_connections: u64,
}

/// [`TenantCounters`] that relay threads bump without a lock.
struct LiveCounters {
    allowed: AtomicU64,
    blocked: AtomicU64,
    errors: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    /// The tenant's series, when metrics are served.
    metrics: Option<TenantMetrics>,
}

impl LiveCounters {
    fn snapshot(&self) -> TenantCounters {
        TenantCounters {
            allowed: self.allowed.load(Relaxed),
            blocked: self.blocked.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            open_connections: 0,
        }
    }
}

pub struct Recorder {
    writer: LogWriter,
    counters: RwLock<HashMap<String, Arc<LiveCounters>>>,
    metrics: Option<Arc<Metrics>>,
}

impl Recorder {
    pub fn new(writer: LogWriter) -> Arc<Self> {
        Self::with_metrics(writer, None)
    }

    /// A recorder that also counts into `metrics` (`[interceptor] metrics`).
    pub fn with_metrics(writer: LogWriter, metrics: Option<Arc<Metrics>>) -> Arc<Self> {
        Arc::new(Recorder {
            writer,
            counters: RwLock::new(HashMap::new()),
            metrics,
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
        if let (Some(metrics), Some(series)) = (&self.metrics, &c.metrics) {
            series.record(metrics, entry);
        }
        if log {
            match self.writer.write(entry) {
                Ok(()) => self.lines_written(1),
                Err(e) => tracing::error!(tenant = %entry.tenant, "cannot write log entry: {e}"),
            }
        }
    }

    fn lines_written(&self, lines: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.log_lines(lines);
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
            .or_insert_with(|| {
                Arc::new(LiveCounters {
                    allowed: AtomicU64::new(0),
                    blocked: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    bytes_sent: AtomicU64::new(0),
                    bytes_received: AtomicU64::new(0),
                    metrics: self.metrics.as_ref().map(|m| m.tenant(tenant)),
                })
            })
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

    /// Counts `entry` and, if `log`, queues its line for this thread's next batch
    /// write; the returned [`Logged`] resolves once the line is in the file. The
    /// relay holds a response's last bytes until then, so the guarantee is the
    /// same as [`record`](Self::record)'s, with one `write(2)` per batch of
    /// requests instead of one each. On a thread that does not batch (see
    /// [`batch_on_this_thread`]), this is [`record`](Self::record).
    pub fn record_batched(self: &Arc<Self>, entry: &LogEntry, log: bool) -> Option<Logged> {
        if !log || !BATCHING.get() {
            self.record(entry, log);
            return None;
        }
        self.record(entry, false);
        let mut line = match entry.to_json_line() {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(tenant = %entry.tenant, "cannot write log entry: {e}");
                return None;
            }
        };
        line.push('\n');
        let (batch, start_flush) = PENDING.with_borrow_mut(|p| {
            match p.lines.iter_mut().find(|(t, _)| *t == entry.tenant) {
                Some((_, buf)) => buf.push_str(&line),
                None => p.lines.push((entry.tenant.clone(), line)),
            }
            (p.flushed + 1, !std::mem::replace(&mut p.flush_queued, true))
        });
        if start_flush {
            // Queued behind the tasks already runnable on this thread, so their
            // lines join the same write.
            let recorder = self.clone();
            tokio::spawn(async move { recorder.write_pending() });
        }
        Some(Logged { batch })
    }

    /// Writes this thread's queued lines (a relay thread also calls it last,
    /// so nothing queued is lost when it stops).
    pub fn write_pending(&self) {
        let lines = PENDING.with_borrow_mut(|p| {
            p.flush_queued = false;
            std::mem::take(&mut p.lines)
        });
        for (tenant, lines) in lines {
            match self.writer.append_lines(&tenant, lines.as_bytes()) {
                Ok(()) => {
                    self.lines_written(memchr::memchr_iter(b'\n', lines.as_bytes()).count() as u64)
                }
                Err(e) => tracing::error!(%tenant, "cannot write log entries: {e}"),
            }
        }
        let waiters = PENDING.with_borrow_mut(|p| {
            p.flushed += 1;
            std::mem::take(&mut p.waiters)
        });
        for waker in waiters {
            waker.wake();
        }
    }

    /// Makes every written line durable (on shutdown, and periodically).
    pub fn flush(&self) {
        if let Err(e) = self.writer.flush() {
            tracing::error!("cannot flush logs: {e}");
        }
    }
}

thread_local! {
    /// Whether [`Recorder::record_batched`] batches on this thread.
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    static PENDING: RefCell<PendingLines> = RefCell::default();
}

/// Makes [`Recorder::record_batched`] batch on the calling thread. Only for a
/// thread that runs a current-thread tokio runtime: the batch is written by a
/// task spawned on it, and waited for by tasks of the same thread.
pub fn batch_on_this_thread() {
    BATCHING.set(true);
}

/// Log lines of this thread not written yet.
#[derive(Default)]
struct PendingLines {
    /// Per tenant, the lines in arrival order.
    lines: Vec<(String, String)>,
    /// Tasks waiting for the current batch.
    waiters: Vec<Waker>,
    /// Batches written so far.
    flushed: u64,
    flush_queued: bool,
}

/// Resolves once the batch holding a line has been written.
pub struct Logged {
    batch: u64,
}

impl Future for Logged {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        PENDING.with_borrow_mut(|p| {
            if p.flushed >= self.batch {
                Poll::Ready(())
            } else {
                p.waiters.push(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}
