//! The cluster's sandbox limits, recorded in the log.
//!
//! Fuel budgets, the memory cap and the result limit decide what a plugin
//! call returns, so every replica must use the same values (a node with a
//! smaller budget would trap where the others do not, and diverge). They
//! live in the log, as `HostEntry::Limits`, and in every snapshot's header:
//!
//! - a cluster's first leader records its own flags once its log is
//!   committed and applied with no limits in it (a new cluster, or one that
//!   ran before limits were replicated);
//! - `raftify-host limits set` proposes new ones;
//! - the apply worker uses the recorded values from their index on,
//!   whatever its node's flags say, and says so in the log when they differ.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::envelope::HostEntry;
use crate::sandbox::Limits;

/// How long the leader waits to see its proposal applied before it tries
/// again (it may have been lost with a leader change).
const REPROPOSE_AFTER: Duration = Duration::from_secs(5);

/// The raft loop's part: on a leader whose cluster has recorded no limits,
/// propose this node's.
pub struct LimitsWatch {
    local: Limits,
    recorded: watch::Receiver<Option<Limits>>,
    proposed_at: Option<Instant>,
}

/// Where the leader's log stands, as the watch needs it.
#[derive(Debug, Clone, Copy)]
pub struct LogPosition {
    /// The node leads and has committed an entry of its own term.
    pub leading: bool,
    pub committed: u64,
    pub last_index: u64,
    pub applied: u64,
}

impl LimitsWatch {
    pub fn new(local: Limits, recorded: watch::Receiver<Option<Limits>>) -> LimitsWatch {
        LimitsWatch {
            local,
            recorded,
            proposed_at: None,
        }
    }

    /// Called every tick: the entry to propose now, if any. Only when the
    /// whole log is committed and applied can the leader know it holds no
    /// limits (a previous leader's proposal may sit uncommitted in it).
    pub fn tick(&mut self, at: LogPosition) -> Option<HostEntry> {
        if self.recorded.borrow().is_some() || !at.leading {
            self.proposed_at = None;
            return None;
        }
        let settled = at.committed == at.last_index && at.applied >= at.committed;
        let waiting = self.proposed_at.is_some_and(|t| t.elapsed() < REPROPOSE_AFTER);
        if !settled || waiting {
            return None;
        }
        self.proposed_at = Some(Instant::now());
        Some(HostEntry::Limits(self.local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxConfig;

    fn position(leading: bool, committed: u64, last_index: u64, applied: u64) -> LogPosition {
        LogPosition {
            leading,
            committed,
            last_index,
            applied,
        }
    }

    #[test]
    fn a_settled_leader_records_its_limits_once_and_only_while_none_are_recorded() {
        let local = Limits::of(&SandboxConfig::default());
        let (recorded_tx, recorded) = watch::channel(None);
        let mut watch = LimitsWatch::new(local, recorded);
        assert_eq!(watch.tick(position(false, 5, 5, 5)), None, "followers never propose");
        assert_eq!(
            watch.tick(position(true, 5, 6, 5)),
            None,
            "an uncommitted tail may hold limits"
        );
        assert_eq!(watch.tick(position(true, 6, 6, 5)), None, "not all applied yet");
        assert_eq!(watch.tick(position(true, 6, 6, 6)), Some(HostEntry::Limits(local)));
        assert_eq!(
            watch.tick(position(true, 7, 7, 7)),
            None,
            "proposed, not yet seen applied"
        );
        recorded_tx.send_replace(Some(local));
        assert_eq!(watch.tick(position(true, 8, 8, 8)), None);
    }
}
