//! Subrequests per incoming dispatched request, for `limits.subrequests`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts older than this belong to requests long finished.
const FORGET_AFTER: Duration = Duration::from_secs(900);
const PRUNE_ABOVE: usize = 4096;

#[derive(Default)]
pub struct SubrequestCounter {
    counts: Mutex<HashMap<u64, (u64, Instant)>>,
}

impl SubrequestCounter {
    /// Counts one more subrequest of `request_id`; returns the new total.
    pub fn count(&self, request_id: u64) -> u64 {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if counts.len() > PRUNE_ABOVE {
            counts.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
        }
        let entry = counts.entry(request_id).or_insert((0, now));
        entry.0 += 1;
        entry.1 = now;
        entry.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_request_on_its_own() {
        let c = SubrequestCounter::default();
        assert_eq!(c.count(1), 1);
        assert_eq!(c.count(1), 2);
        assert_eq!(c.count(2), 1);
        assert_eq!(c.count(1), 3);
    }
}
