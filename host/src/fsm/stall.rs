//! The apply worker when it cannot restore the snapshot it must start
//! from (see `health`): it keeps the node up, answers every request with
//! the reason, and tries the restore again with backoff, from 1 s up to a
//! minute. Once the restore works, it replays what was committed meanwhile
//! from the store and applies as before.

use std::time::{Duration, Instant};

use super::{Answered, Fsm, FsmError, FsmRequest};
use crate::outcome::ProposeError;
use crate::sandbox::CallError;
use crate::storage::LogStore;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

pub(super) struct Stall {
    reason: String,
    /// The highest committed index raft handed over meanwhile.
    upto: u64,
    next_try: Instant,
    backoff: Duration,
}

/// The failures a stall rides out; any other error stops the worker.
pub(super) fn survivable(error: &FsmError) -> bool {
    matches!(error, FsmError::Restore { .. } | FsmError::MissingPlugin(_))
}

impl<S: LogStore> Fsm<S> {
    /// Stop applying for `error` (a failed restore), committed up to `upto`.
    pub(super) fn stall(&mut self, error: FsmError, upto: u64) {
        let reason = format!("this node cannot apply: {error}");
        tracing::error!(%reason, retry_in_ms = FIRST_RETRY.as_millis() as u64, "the apply worker stalled; retrying");
        self.health.set(Some(reason.clone()));
        self.stalled = Some(Stall {
            reason,
            upto: upto.max(self.applied),
            next_try: Instant::now() + FIRST_RETRY,
            backoff: FIRST_RETRY,
        });
    }

    /// How long until the next restore attempt, while stalled.
    pub(super) fn stall_wait(&self) -> Option<Duration> {
        self.stalled
            .as_ref()
            .map(|stall| stall.next_try.saturating_duration_since(Instant::now()))
    }

    /// A request while stalled: record what it commits, answer with why.
    pub(super) fn handle_stalled(&mut self, request: FsmRequest) {
        let Some(stall) = &mut self.stalled else { return };
        match request {
            FsmRequest::Apply { entries, waiters } => {
                if let Some(last) = entries.last() {
                    stall.upto = stall.upto.max(last.index);
                }
                for (_, waiter) in waiters {
                    let _ = waiter.send(Err(ProposeError::Retry(format!(
                        "committed, but {}; ask another node for the result",
                        stall.reason
                    ))));
                }
            }
            FsmRequest::Query { reply, .. } => {
                let _ = reply.send(Answered {
                    index: self.applied,
                    result: Err(CallError::Guest(stall.reason.clone())),
                });
            }
            FsmRequest::Snapshot { reply } => {
                let _ = reply.send(Err(stall.reason.clone()));
            }
            // A newer snapshot may restore where the last one did not.
            FsmRequest::Restore { .. } => stall.next_try = Instant::now(),
            FsmRequest::Shutdown => {}
        }
    }

    /// Try the restore again, if it is time. Errors other than another
    /// failed restore stop the worker.
    pub(super) fn retry_stalled(&mut self) -> Result<(), FsmError> {
        let Some(stall) = &self.stalled else { return Ok(()) };
        if Instant::now() < stall.next_try {
            return Ok(());
        }
        let upto = stall.upto;
        match self.restore_stored() {
            Ok(_) => {}
            Err(error) if survivable(&error) => {
                let stall = self.stalled.as_mut().expect("checked above");
                stall.backoff = (stall.backoff * 2).min(LAST_RETRY);
                stall.next_try = Instant::now() + stall.backoff;
                stall.reason = format!("this node cannot apply: {error}");
                tracing::warn!(reason = %stall.reason, retry_in_ms = stall.backoff.as_millis() as u64, "the restore failed again");
                self.health.set(Some(stall.reason.clone()));
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        self.stalled = None;
        self.health.set(None);
        // What was committed meanwhile is in the store: replay it.
        self.replay(upto)?;
        self.applied_tx.send_replace(self.applied);
        tracing::info!(
            applied = self.applied,
            "the apply worker restored its snapshot and applies again"
        );
        self.serve_pending_queries()
    }
}
