//! Trap recovery: a trap is recorded durably, and the instance is rebuilt
//! from the latest snapshot by replaying the log without the recorded
//! traps, so every replica ends in the same state.

use std::sync::atomic::Ordering;

use raft::GetEntriesContext;
use raft::prelude::ConfState;

use super::{Fsm, FsmError, REPLAY_BATCH_BYTES};
use crate::sessions::Sessions;
use crate::storage::LogStore;

impl<S: LogStore> Fsm<S> {
    pub(super) fn record_trap(&mut self, index: u64, message: String) -> Result<(), FsmError> {
        self.store.record_trap(index, &message)?;
        self.traps.insert(index, message);
        self.trap_count.store(self.traps.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Replace the instance with a fresh one holding the state as of `upto`:
    /// start over from the latest snapshot (or the log's first plugin) and
    /// apply the log again, skipping recorded traps. Plugin swaps in that
    /// stretch happen again, so the instance runs the plugin of `upto`.
    pub(super) fn rebuild(&mut self, upto: u64) -> Result<(), FsmError> {
        // The stored snapshot and the log behind it must not change under us.
        self.abandon_snapshot()?;
        let started = std::time::Instant::now();
        match self.restore_stored()? {
            true => {}
            false => {
                self.plugin = self.first_plugin.clone();
                self.set_cluster_limits(None, 0);
                self.instance = self.instantiate(&self.plugin)?;
                self.staged.clear();
                self.applied = 0;
                self.conf_state = ConfState::default();
                self.members.clear();
                self.sessions = Sessions::default();
            }
        }
        self.replay(upto)?;
        tracing::info!(
            upto,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rebuilt the plugin instance"
        );
        Ok(())
    }

    /// Apply the stored log from the applied index on, up to `upto`.
    pub(super) fn replay(&mut self, upto: u64) -> Result<(), FsmError> {
        let was = std::mem::replace(&mut self.replaying, true);
        let result = self.replay_stored(upto);
        self.replaying = was;
        result
    }

    pub(super) fn replay_stored(&mut self, upto: u64) -> Result<(), FsmError> {
        let mut next = self.applied + 1;
        if next <= upto && next < self.store.first_index()? {
            return Err(FsmError::Malformed {
                index: next,
                reason: "the log was compacted past the latest snapshot".into(),
            });
        }
        while next <= upto {
            let batch = self
                .store
                .entries(next, upto + 1, REPLAY_BATCH_BYTES, GetEntriesContext::empty(false))?;
            for entry in &batch {
                // A trap not recorded before (the record was lost in a crash)
                // records itself and rebuilds again, without it.
                self.apply_entry(entry)?;
            }
            next = batch.last().map_or(upto + 1, |e| e.index + 1);
        }
        Ok(())
    }
}
