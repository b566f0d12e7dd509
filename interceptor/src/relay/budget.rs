//! The memory that unfinished request heads (and first bytes being sniffed) may
//! hold: each connection's bytes are charged to its tenant's budget and to the
//! relay's, and a connection over budget stops reading until others give theirs
//! back. So a tenant dribbling thousands of heads holds at most its own budget,
//! and the relay at most the global one (README, "What the relay does").

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// A request head larger than this gets `431`.
pub const HEAD_LIMIT: usize = 64 * 1024;
/// What one tenant's unfinished heads may hold at once: 256 heads at the limit,
/// thousands of ordinary ones (a head is held for as long as it takes to arrive).
pub const TENANT_BUDGET: usize = 16 * 1024 * 1024;
/// What all tenants' unfinished heads may hold at once.
pub const GLOBAL_BUDGET: usize = 128 * 1024 * 1024;
/// The most read at once while a head is charged: what a connection can hold
/// beyond its charge while it waits for budget.
pub const CHARGED_READ: usize = 4 * 1024;

/// The relay's budget and each tenant's.
pub struct HeadBudgets {
    global: Arc<Semaphore>,
    tenant_size: usize,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HeadBudgets {
    pub fn new(global: usize, tenant: usize) -> Self {
        HeadBudgets {
            global: Arc::new(Semaphore::new(global)),
            tenant_size: tenant,
            tenants: Mutex::default(),
        }
    }

    /// An empty charge for one connection of `tenant`.
    pub fn charge(&self, tenant: &str) -> HeadCharge {
        let tenant = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            match tenants.get(tenant) {
                Some(budget) => budget.clone(),
                None => {
                    // User Workers come and go: forget budgets nobody holds.
                    tenants.retain(|_, budget| Arc::strong_count(budget) > 1);
                    let budget = Arc::new(Semaphore::new(self.tenant_size));
                    tenants.insert(tenant.to_string(), budget.clone());
                    budget
                }
            }
        };
        HeadCharge {
            tenant: PollSemaphore::new(tenant),
            global: PollSemaphore::new(self.global.clone()),
            tenant_held: None,
            global_held: None,
            pending_global: false,
            owed: 0,
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.global.available_permits()
    }
}

impl Default for HeadBudgets {
    fn default() -> Self {
        HeadBudgets::new(GLOBAL_BUDGET, TENANT_BUDGET)
    }
}

/// The bytes one connection holds in an unfinished head. Bytes are charged
/// after they were read ([`HeadCharge::add`]); the next read waits until the
/// charge is settled ([`HeadCharge::poll_settle`]), so a connection never holds
/// more than one read beyond what it was granted.
pub struct HeadCharge {
    tenant: PollSemaphore,
    global: PollSemaphore,
    /// Granted by the tenant's budget (a grant waiting for the global budget
    /// included).
    tenant_held: Option<OwnedSemaphorePermit>,
    /// Granted by the global budget.
    global_held: Option<OwnedSemaphorePermit>,
    /// Granted by the tenant's budget, not yet by the global one.
    pending_global: bool,
    /// Read but not granted yet.
    owed: usize,
}

fn hold(held: &mut Option<OwnedSemaphorePermit>, permit: OwnedSemaphorePermit) {
    match held {
        Some(held) => held.merge(permit),
        None => *held = Some(permit),
    }
}

impl HeadCharge {
    /// Bytes granted by both budgets.
    pub fn held(&self) -> usize {
        self.global_held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Charges `n` bytes just read. A connection is never charged past
    /// [`HEAD_LIMIT`]: the HTTP server refuses a head that reaches it.
    pub fn add(&mut self, n: usize) {
        let room = HEAD_LIMIT.saturating_sub(self.held() + self.owed);
        self.owed += n.min(room);
    }

    /// Ready once everything charged is granted.
    pub fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.owed == 0 {
            return Poll::Ready(());
        }
        // At most HEAD_LIMIT: it fits.
        let owed = self.owed as u32;
        if !self.pending_global {
            // Never closed: `None` cannot happen, and would leave nothing to wait for.
            if let Some(permit) = ready!(self.tenant.poll_acquire_many(cx, owed)) {
                hold(&mut self.tenant_held, permit);
            }
            self.pending_global = true;
        }
        if let Some(permit) = ready!(self.global.poll_acquire_many(cx, owed)) {
            hold(&mut self.global_held, permit);
        }
        self.pending_global = false;
        self.owed = 0;
        Poll::Ready(())
    }

    pub async fn settle(&mut self) {
        poll_fn(|cx| self.poll_settle(cx)).await
    }

    /// The head is complete (or its bytes went elsewhere): all given back.
    pub fn release(&mut self) {
        self.tenant_held = None;
        self.global_held = None;
        self.pending_global = false;
        self.owed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_over_its_tenants_budget_waits_until_another_gives_back() {
        let budgets = HeadBudgets::new(3 * HEAD_LIMIT, 2 * HEAD_LIMIT);
        let mut a = budgets.charge("a");
        let mut b = budgets.charge("a");
        a.add(10 * HEAD_LIMIT);
        a.settle().await;
        assert_eq!(a.held(), HEAD_LIMIT, "charged past the head limit");
        b.add(HEAD_LIMIT);
        b.settle().await;
        let mut c = budgets.charge("a");
        c.add(1);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), c.settle()).await;
        assert!(waited.is_err(), "a tenant went past its budget");
        // Another tenant still has the rest of the global budget.
        let mut other = budgets.charge("b");
        other.add(HEAD_LIMIT);
        other.settle().await;
        assert_eq!(budgets.available(), 0);
        let mut d = budgets.charge("c");
        d.add(1);
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), d.settle()).await;
        assert!(waited.is_err(), "the relay went past its budget");
        a.release();
        c.settle().await;
        assert_eq!(c.held(), 1);
        drop(b);
        d.settle().await;
        assert_eq!(d.held(), 1);
    }
}
