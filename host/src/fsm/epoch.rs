//! Instance epochs on the apply worker (see `crate::epochs` for why).
//!
//! At an epoch the worker begins a snapshot as before (`snapshots`), and
//! feeds every chunk it reads to a **successor**: a fresh instance of the
//! same plugin being restored, while the running one keeps applying. Once
//! the successor holds the epoch's state, it catches up by applying the
//! log after the epoch from the store, a slice at a time between batches,
//! and then replaces the running instance. A replica restarted from the
//! epoch's snapshot builds the very same instance: the same calls, with
//! the same bytes, in the same pieces ([`Feed`]), at the same indexes.
//!
//! An entry whose effect on the instance a catch-up could not repeat (a
//! limits change, a swap, the next epoch) first completes the epoch in
//! progress. A replay (a rebuild after a trap, a stall's recovery) that
//! crosses an epoch hands over at once ([`handover`]). Anything that
//! replaces the instance drops the successor.

use std::time::{Duration, Instant};

use raft::GetEntriesContext;
use sha2::{Digest as _, Sha256};

use super::{Fsm, FsmError, REPLAY_BATCH_BYTES};
use crate::envelope::{self, Payload};
use crate::sandbox::{CallError, Instance};
use crate::storage::LogStore;

/// Restores are fed in pieces of exactly this size (the last may be
/// shorter), wherever the bytes come from: how a plugin allocates while it
/// restores must not depend on the source's chunking. Small enough that
/// one `restore-chunk` stays within a few milliseconds, as a read does.
pub(super) const RESTORE_PIECE: usize = 256 << 10;

/// Entries a catch-up reads from the store at once, at most.
const CATCH_UP_BATCH: u64 = 256;

/// Bytes on their way into a restore, cut into [`RESTORE_PIECE`]s.
pub(super) struct Feed {
    index: u64,
    pending: Vec<u8>,
}

impl Feed {
    /// Begin restoring into `instance` at `index`.
    pub(super) fn begin(index: u64, instance: &mut Instance) -> Result<Feed, CallError> {
        instance.restore_begin(index)?;
        Ok(Feed {
            index,
            pending: Vec::new(),
        })
    }

    pub(super) fn push(&mut self, instance: &mut Instance, mut bytes: &[u8]) -> Result<(), CallError> {
        while !bytes.is_empty() {
            if self.pending.is_empty() && bytes.len() >= RESTORE_PIECE {
                instance.restore_chunk(self.index, &bytes[..RESTORE_PIECE])?;
                bytes = &bytes[RESTORE_PIECE..];
                continue;
            }
            let take = (RESTORE_PIECE - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == RESTORE_PIECE {
                instance.restore_chunk(self.index, &self.pending)?;
                self.pending.clear();
            }
        }
        Ok(())
    }

    pub(super) fn finish(mut self, instance: &mut Instance) -> Result<(), CallError> {
        if !self.pending.is_empty() {
            instance.restore_chunk(self.index, &std::mem::take(&mut self.pending))?;
        }
        instance.restore_finish(self.index)
    }
}

/// Why a handover of the state from one instance to another failed.
pub(super) enum Handover {
    OldTrapped(String),
    OldRefused(String),
    NewFailed(CallError),
}

/// Stream `old`'s snapshot at `index` into `new`; returns the state's size
/// and SHA-256.
pub(super) fn handover(index: u64, old: &mut Instance, new: &mut Instance) -> Result<(u64, [u8; 32]), Handover> {
    let old_failed = |error: CallError| match error {
        CallError::Trap(message) => Handover::OldTrapped(message),
        CallError::Guest(message) => Handover::OldRefused(message),
    };
    old.snapshot_begin(index).map_err(old_failed)?;
    let mut feed = Feed::begin(index, new).map_err(Handover::NewFailed)?;
    let (mut bytes, mut hasher) = (0u64, Sha256::new());
    loop {
        let chunk = old.snapshot_next(index, RESTORE_PIECE).map_err(old_failed)?;
        if chunk.is_empty() {
            feed.finish(new).map_err(Handover::NewFailed)?;
            return Ok((bytes, hasher.finalize().into()));
        }
        bytes += chunk.len() as u64;
        hasher.update(&chunk);
        feed.push(new, &chunk).map_err(Handover::NewFailed)?;
    }
}

/// The instance that takes over at the epoch in progress.
pub(super) struct Successor {
    index: u64,
    instance: Instance,
    /// `Some` while the snapshot is being read into it.
    feed: Option<Feed>,
    hasher: Sha256,
    /// The last entry it applied, once restored.
    caught_up_to: u64,
    started: Instant,
}

impl<S: LogStore> Fsm<S> {
    /// The worker wants a snapshot (due, or asked for): with epochs from the
    /// log, the leader is told (through the node's batches) and proposes
    /// one; otherwise (unit tests) one begins here.
    pub(super) fn want_epoch(&mut self) -> Result<(), FsmError> {
        let mut want = self
            .snapshot_waiters
            .iter()
            .map(|(at, _)| (*at).max(1))
            .max()
            .unwrap_or(0);
        if self.snapshot_due() {
            want = want.max(self.applied.max(1));
        }
        if self.epochs_from_log {
            self.epochs.set_want(want);
        } else if want > 0 && self.taking.is_none() && self.successor.is_none() {
            self.begin_epoch()?;
        }
        Ok(())
    }

    /// An epoch at the applied index: snapshot the instance, and restore
    /// that into the successor while entries go on applying (in a replay,
    /// at once).
    pub(super) fn begin_epoch(&mut self) -> Result<(), FsmError> {
        let index = self.applied;
        self.complete_epoch()?;
        self.wait_for_snapshot()?;
        self.epochs.applied_epoch(index);
        if self.replaying {
            return self.epoch_now(index);
        }
        self.start_snapshot()?;
        if self.taking.is_none() {
            // The snapshot failed: the instance goes on (alike everywhere).
            return Ok(());
        }
        let mut instance = self.instantiate(&self.plugin)?;
        match Feed::begin(index, &mut instance) {
            Ok(feed) => {
                self.successor = Some(Successor {
                    index,
                    instance,
                    feed: Some(feed),
                    hasher: Sha256::new(),
                    caught_up_to: index,
                    started: Instant::now(),
                });
            }
            Err(error) => {
                tracing::warn!(index, %error, "a fresh instance cannot begin to restore; this epoch keeps the running one")
            }
        }
        Ok(())
    }

    /// A replay crossing an epoch: hand over to a fresh instance now.
    fn epoch_now(&mut self, index: u64) -> Result<(), FsmError> {
        let started = Instant::now();
        let mut fresh = self.instantiate(&self.plugin)?;
        match handover(index, &mut self.instance, &mut fresh) {
            Ok((state_bytes, sha)) => {
                self.epochs.record((index, sha));
                self.instance = fresh;
                tracing::info!(
                    index,
                    state_bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "instance epoch (replayed): a fresh instance restored from the snapshot"
                );
            }
            Err(Handover::OldTrapped(message)) => {
                // Recorded, so the rebuild's replay skips this epoch.
                tracing::warn!(index, %message, "the plugin trapped in snapshot() at an epoch; rebuilding");
                self.record_trap(index, message)?;
                self.rebuild(index)?;
            }
            Err(Handover::OldRefused(message)) => {
                tracing::warn!(index, %message, "the plugin refused to snapshot at an epoch");
            }
            Err(Handover::NewFailed(error)) => {
                tracing::warn!(index, %error, "a fresh instance cannot restore the epoch's snapshot")
            }
        }
        Ok(())
    }

    /// A chunk of the epoch's snapshot was read: into the successor.
    pub(super) fn feed_successor(&mut self, chunk: &[u8]) {
        let Some(successor) = &mut self.successor else { return };
        let Some(feed) = &mut successor.feed else { return };
        successor.hasher.update(chunk);
        if let Err(error) = feed.push(&mut successor.instance, chunk) {
            self.drop_successor(&format!("it cannot restore the epoch's snapshot: {error}"));
        }
    }

    /// The epoch's snapshot was read to its end: finish the successor's
    /// restore and record the snapshot's digest.
    pub(super) fn successor_restored(&mut self) {
        let Some(successor) = &mut self.successor else { return };
        let Some(feed) = successor.feed.take() else { return };
        let sha: [u8; 32] = std::mem::take(&mut successor.hasher).finalize().into();
        self.epochs.record((successor.index, sha));
        if let Err(error) = feed.finish(&mut successor.instance) {
            self.drop_successor(&format!("it cannot restore the epoch's snapshot: {error}"));
        }
    }

    /// Catch the restored successor up with the log for about `budget`;
    /// once it has applied what the running instance has, it takes over.
    /// Returns whether anything moved.
    pub(super) fn pump_successor(&mut self, budget: Duration) -> Result<bool, FsmError> {
        let deadline = Instant::now() + budget;
        let mut moved = false;
        loop {
            let Some(successor) = &self.successor else {
                return Ok(moved);
            };
            if successor.feed.is_some() {
                return Ok(moved);
            }
            let next = successor.caught_up_to + 1;
            if next > self.applied {
                self.switch_to_successor();
                return Ok(true);
            }
            if moved && Instant::now() >= deadline {
                return Ok(moved);
            }
            moved = true;
            let upto = self.applied.min(next + CATCH_UP_BATCH - 1);
            let batch = match self
                .store
                .entries(next, upto + 1, REPLAY_BATCH_BYTES, GetEntriesContext::empty(false))
            {
                Ok(batch) if !batch.is_empty() => batch,
                Ok(_) => {
                    self.drop_successor("the log after the epoch is not in the store");
                    return Ok(true);
                }
                Err(error) => {
                    self.drop_successor(&format!("the log after the epoch cannot be read: {error}"));
                    return Ok(true);
                }
            };
            for entry in &batch {
                self.catch_up_entry(entry);
            }
        }
    }

    /// What the successor does with one entry: the plugin commands the
    /// running instance applied (recorded traps are skipped, as in any
    /// replay); nothing else in a catch-up touches the instance.
    fn catch_up_entry(&mut self, entry: &raft::prelude::Entry) {
        let Some(successor) = &mut self.successor else { return };
        successor.caught_up_to = entry.index;
        if entry.get_entry_type() != raft::prelude::EntryType::EntryNormal || self.traps.contains_key(&entry.index) {
            return;
        }
        if let Ok(Payload::Command(command)) = envelope::open(&entry.data)
            && let Err(CallError::Trap(message)) = successor.instance.apply(entry.index, command)
        {
            let why = format!(
                "it trapped at index {} where the running instance did not ({message}): the plugin is not deterministic",
                entry.index
            );
            tracing::error!(index = entry.index, "{why}");
            self.drop_successor(&why);
        }
    }

    fn switch_to_successor(&mut self) {
        let Some(successor) = self.successor.take() else { return };
        self.instance = successor.instance;
        tracing::info!(
            index = successor.index,
            caught_up = self.applied - successor.index,
            elapsed_ms = successor.started.elapsed().as_millis() as u64,
            "instance epoch: a fresh instance restored from the snapshot took over"
        );
    }

    /// Give the epoch in progress up: the running instance goes on.
    pub(super) fn drop_successor(&mut self, why: &str) {
        if let Some(successor) = self.successor.take() {
            tracing::warn!(index = successor.index, "the epoch's fresh instance was dropped: {why}");
        }
    }

    /// Finish the epoch in progress now: the rest of its snapshot, the
    /// catch-up, the switch. Before an entry whose effect a catch-up could
    /// not repeat.
    pub(super) fn complete_epoch(&mut self) -> Result<(), FsmError> {
        while self.successor.as_ref().is_some_and(|s| s.feed.is_some()) {
            if self.taking.is_none() {
                self.drop_successor("its snapshot was abandoned");
                break;
            }
            self.pump_snapshot(Duration::ZERO, true)?;
        }
        while self.successor.is_some() {
            self.pump_successor(Duration::from_secs(3600))?;
        }
        Ok(())
    }
}
