//! Whether a node can apply what its log commits, and what peers say of
//! theirs.
//!
//! A node whose plugin cannot restore the snapshot it must start from (the
//! plugin's `restore()` fails, or no member has the plugin) used to stop.
//! Now its apply worker stalls instead (`fsm/stall.rs`): the node stays up,
//! keeps its log and its place in the quorum, answers `status` with the
//! reason, refuses reads and writes with it, and retries the restore with
//! backoff. Its peer batches say it cannot apply (`RaftBatch.cannot_apply`),
//! so a leader never promotes it to voter while that holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Senders whose reports are kept.
const MAX_REPORTS: usize = 1024;

#[derive(Debug, Default)]
pub struct ApplyHealth {
    stalled: AtomicBool,
    reason: Mutex<String>,
    reported: Mutex<HashMap<u64, bool>>,
}

impl ApplyHealth {
    /// This node's apply worker stalled for `reason`, or (`None`) applies.
    pub fn set(&self, reason: Option<String>) {
        self.stalled.store(reason.is_some(), Ordering::Relaxed);
        *lock(&self.reason) = reason.unwrap_or_default();
    }

    /// Whether this node cannot apply now.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Why (empty while it applies).
    pub fn reason(&self) -> String {
        lock(&self.reason).clone()
    }

    /// A member's batch said this; bounded whatever ids a peer claims.
    pub fn report(&self, member: u64, cannot_apply: bool) {
        let mut reported = lock(&self.reported);
        if !cannot_apply {
            reported.remove(&member);
        } else if reported.len() < MAX_REPORTS || reported.contains_key(&member) {
            reported.insert(member, true);
        }
    }

    /// Whether `member` last said it cannot apply.
    pub fn reported_stalled(&self, member: u64) -> bool {
        lock(&self.reported).get(&member).copied().unwrap_or(false)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_reported_and_cleared_and_reports_stay_bounded() {
        let health = ApplyHealth::default();
        assert!(!health.stalled());
        health.set(Some("restore failed".into()));
        assert!(health.stalled());
        assert_eq!(health.reason(), "restore failed");
        health.set(None);
        assert!(!health.stalled() && health.reason().is_empty());
        for member in 0..5000 {
            health.report(member, true);
        }
        assert!(lock(&health.reported).len() <= MAX_REPORTS);
        assert!(health.reported_stalled(3));
        health.report(3, false);
        assert!(!health.reported_stalled(3));
    }
}
