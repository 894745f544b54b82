//! Instance epochs on the apply worker (see `crate::epochs` for why).
//!
//! At an epoch the worker begins a snapshot as before (`snapshots`), and
//! feeds every chunk it reads to a **successor**: a fresh instance of the
//! same plugin, restored on a thread of its own while the running one
//! keeps applying. Once the successor holds the epoch's state, that thread
//! catches it up by applying the log after the epoch from the store; when
//! it is level, the worker applies the last few entries to it and switches. A replica restarted from the
//! epoch's snapshot builds the very same instance: the same calls, with
//! the same bytes, in the same pieces ([`Feed`]), at the same indexes.
//!
//! An entry whose effect on the instance a catch-up could not repeat (a
//! limits change, a swap, the next epoch) first completes the epoch in
//! progress. A replay (a rebuild after a trap, a stall's recovery) that
//! crosses an epoch hands over at once ([`handover`]). Anything that
//! replaces the instance drops the successor.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use raft::GetEntriesContext;
use sha2::{Digest as _, Sha256};

use super::{Fsm, FsmError, REPLAY_BATCH_BYTES};
use crate::envelope::{self, Payload};
use crate::epochs::Epochs;
use crate::sandbox::{CallError, Instance};
use crate::snapshot;
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
/// and, with the state added to `digest`, its SHA-256.
pub(super) fn handover(
    index: u64,
    old: &mut Instance,
    new: &mut Instance,
    mut digest: Sha256,
) -> Result<(u64, [u8; 32]), Handover> {
    let old_failed = |error: CallError| match error {
        CallError::Trap(message) => Handover::OldTrapped(message),
        CallError::Guest(message) => Handover::OldRefused(message),
    };
    old.snapshot_begin(index).map_err(old_failed)?;
    let mut feed = Feed::begin(index, new).map_err(Handover::NewFailed)?;
    let mut bytes = 0u64;
    loop {
        let chunk = old.snapshot_next(index, RESTORE_PIECE).map_err(old_failed)?;
        if chunk.is_empty() {
            feed.finish(new).map_err(Handover::NewFailed)?;
            return Ok((bytes, digest.finalize().into()));
        }
        bytes += chunk.len() as u64;
        digest.update(&chunk);
        feed.push(new, &chunk).map_err(Handover::NewFailed)?;
    }
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
        self.start_successor(index)
    }

    /// A replay crossing an epoch: hand over to a fresh instance now.
    fn epoch_now(&mut self, index: u64) -> Result<(), FsmError> {
        let started = Instant::now();
        let mut fresh = self.instantiate(&self.plugin)?;
        let digest = Sha256::new_with_prefix(snapshot::encode_header(&self.snapshot_header()));
        match handover(index, &mut self.instance, &mut fresh, digest) {
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
}

/// Chunks on their way to the successor, at most.
const FEED_QUEUE: usize = 4;

/// The instance that takes over at the epoch in progress. It is restored
/// and caught up on a thread of its own (`epoch`), so neither costs the
/// apply thread its time; only the last few entries, once it is level,
/// are applied to it here.
pub(super) struct Successor {
    index: u64,
    /// To the thread; `None` once every chunk was sent.
    chunks: Option<mpsc::SyncSender<Vec<u8>>>,
    /// A chunk the full queue could not take yet.
    held: Option<Vec<u8>>,
    /// The snapshot was read to its end: close the queue once `held` is in.
    finishing: bool,
    /// The apply thread's applied index, which the catch-up runs to.
    applied: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<Result<(Instance, u64), String>>,
    started: Instant,
}

/// What the successor's thread needs.
struct Restorer<S: LogStore> {
    index: u64,
    instance: Instance,
    store: S,
    /// Entries after the epoch whose apply trapped before it began.
    traps: BTreeSet<u64>,
    /// The epoch's digest so far: the snapshot's header (the state follows).
    digest: Sha256,
    /// Session commands after the epoch the apply thread answered without
    /// the plugin (retries of applied sequences), as it goes.
    answered: Arc<std::sync::Mutex<BTreeSet<u64>>>,
    epochs: Arc<Epochs>,
    applied: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl<S: LogStore> Restorer<S> {
    /// Restore from the chunks, then apply the log until level with the
    /// apply thread; hand the instance back with the last index applied.
    fn run(mut self, chunks: mpsc::Receiver<Vec<u8>>) -> Result<(Instance, u64), String> {
        let restore_failed = |e: CallError| format!("it cannot restore the epoch's snapshot: {e}");
        let mut feed = Feed::begin(self.index, &mut self.instance).map_err(restore_failed)?;
        let mut digest = self.digest.clone();
        for chunk in chunks {
            digest.update(&chunk);
            feed.push(&mut self.instance, &chunk).map_err(restore_failed)?;
        }
        if self.stop.load(Ordering::Relaxed) {
            return Err("stopped".into());
        }
        self.epochs.record((self.index, digest.finalize().into()));
        feed.finish(&mut self.instance).map_err(restore_failed)?;
        let mut done = self.index;
        loop {
            let target = self.applied.load(Ordering::Relaxed);
            if done >= target || self.stop.load(Ordering::Relaxed) {
                return Ok((self.instance, done));
            }
            let upto = target.min(done + CATCH_UP_BATCH);
            done = catch_up(
                &self.store,
                &mut self.instance,
                &self.traps,
                &self.answered,
                done + 1,
                upto,
            )?;
        }
    }
}

/// Apply the plugin commands in `from..=upto` from the store to `instance`
/// (recorded traps skipped, as in any replay, and session commands the
/// apply thread answered without the plugin; nothing else in a catch-up
/// touches the instance). Returns the last index applied.
fn catch_up<S: LogStore>(
    store: &S,
    instance: &mut Instance,
    traps: &BTreeSet<u64>,
    answered: &std::sync::Mutex<BTreeSet<u64>>,
    from: u64,
    upto: u64,
) -> Result<u64, String> {
    let mut done = from - 1;
    while done < upto {
        let batch = store
            .entries(done + 1, upto + 1, REPLAY_BATCH_BYTES, GetEntriesContext::empty(false))
            .map_err(|e| format!("the log after the epoch cannot be read: {e}"))?;
        if batch.is_empty() {
            return Err("the log after the epoch is not in the store".into());
        }
        for entry in &batch {
            done = entry.index;
            if entry.get_entry_type() != raft::prelude::EntryType::EntryNormal || traps.contains(&entry.index) {
                continue;
            }
            let command = match envelope::open(&entry.data) {
                Ok(Payload::Command(command)) => command,
                Ok(Payload::SessionCommand { command, .. })
                    if !answered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&entry.index) =>
                {
                    command
                }
                _ => continue,
            };
            if let Err(CallError::Trap(message)) = instance.apply(entry.index, command) {
                return Err(format!(
                    "it trapped at index {} where the running instance did not ({message}): the plugin is not deterministic",
                    entry.index
                ));
            }
        }
    }
    Ok(done)
}

impl<S: LogStore> Fsm<S> {
    /// Start the successor for the epoch at `index`: a fresh instance on a
    /// thread of its own, fed the snapshot's chunks as they are read.
    fn start_successor(&mut self, index: u64) -> Result<(), FsmError> {
        let instance = self.instantiate(&self.plugin)?;
        let (chunks, receiver) = mpsc::sync_channel(FEED_QUEUE);
        let (report, done) = mpsc::sync_channel(1);
        let applied = Arc::new(AtomicU64::new(self.applied));
        let stop = Arc::new(AtomicBool::new(false));
        let restorer = Restorer {
            index,
            instance,
            store: self.store.clone(),
            traps: self.traps.range(index + 1..).map(|(i, _)| *i).collect(),
            digest: self
                .taking
                .as_ref()
                .map(|taking| taking.digest.clone())
                .unwrap_or_default(),
            answered: {
                self.answered = Arc::default();
                self.answered.clone()
            },
            epochs: self.epochs.clone(),
            applied: applied.clone(),
            stop: stop.clone(),
        };
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("epoch".into())
            .spawn(move || {
                let _entered = span.enter();
                crate::background::lower_priority();
                let _ = report.send(restorer.run(receiver));
            })
            .map_err(crate::storage::StoreError::Io)?;
        self.successor = Some(Successor {
            index,
            chunks: Some(chunks),
            held: None,
            finishing: false,
            applied,
            stop,
            done,
            started: Instant::now(),
        });
        Ok(())
    }

    /// A chunk of the epoch's snapshot was read: to the successor.
    pub(super) fn feed_successor(&mut self, chunk: &[u8]) {
        if let Some(successor) = &mut self.successor {
            debug_assert!(successor.held.is_none());
            successor.held = Some(chunk.to_vec());
            self.flush_successor(false);
        }
    }

    /// The epoch's snapshot was read to its end.
    pub(super) fn successor_restored(&mut self) {
        if let Some(successor) = &mut self.successor {
            successor.finishing = true;
            self.flush_successor(false);
        }
    }

    /// Hand the held chunk over (waiting for room, with `block`); whether
    /// the successor can take another.
    pub(super) fn flush_successor(&mut self, block: bool) -> bool {
        let Some(successor) = &mut self.successor else {
            return true;
        };
        if let (Some(chunk), Some(chunks)) = (successor.held.take(), &successor.chunks) {
            let sent = if block {
                chunks.send(chunk).map_err(drop)
            } else {
                match chunks.try_send(chunk) {
                    Ok(()) => Ok(()),
                    Err(mpsc::TrySendError::Full(chunk)) => {
                        successor.held = Some(chunk);
                        return false;
                    }
                    Err(mpsc::TrySendError::Disconnected(_)) => Err(()),
                }
            };
            if sent.is_err() {
                // The thread stopped; its report says why.
                successor.chunks = None;
            }
        }
        if successor.finishing && successor.held.is_none() {
            successor.chunks = None;
        }
        true
    }

    /// Tell the catch-up how far to go; once the successor is level, apply
    /// what came since to it here and switch (with `block`, wait for
    /// that). Returns whether the epoch ended (switched, or dropped).
    pub(super) fn pump_successor(&mut self, block: bool) -> Result<bool, FsmError> {
        self.flush_successor(block);
        let Some(successor) = &self.successor else {
            return Ok(false);
        };
        successor.applied.store(self.applied, Ordering::Relaxed);
        let report = if block {
            successor.done.recv().map_err(|_| "its thread stopped".to_string())
        } else {
            match successor.done.try_recv() {
                Ok(report) => Ok(report),
                Err(mpsc::TryRecvError::Empty) => return Ok(false),
                Err(mpsc::TryRecvError::Disconnected) => Err("its thread stopped".to_string()),
            }
        };
        let successor = self.successor.take().expect("checked above");
        let caught_up = report.and_then(|level| level).and_then(|(mut instance, done)| {
            let traps: BTreeSet<u64> = self.traps.range(done + 1..).map(|(i, _)| *i).collect();
            if done < self.applied {
                catch_up(
                    &self.store,
                    &mut instance,
                    &traps,
                    &self.answered,
                    done + 1,
                    self.applied,
                )?;
            }
            Ok(instance)
        });
        match caught_up {
            Ok(instance) => {
                self.instance = instance;
                self.publish_memory();
                tracing::info!(
                    index = successor.index,
                    caught_up = self.applied - successor.index,
                    elapsed_ms = successor.started.elapsed().as_millis() as u64,
                    "instance epoch: a fresh instance restored from the snapshot took over"
                );
            }
            Err(why) => tracing::warn!(index = successor.index, "the epoch's fresh instance was dropped: {why}"),
        }
        Ok(true)
    }

    /// Give the epoch in progress up: the running instance goes on.
    pub(super) fn drop_successor(&mut self, why: &str) {
        if let Some(successor) = self.successor.take() {
            successor.stop.store(true, Ordering::Relaxed);
            tracing::debug!(index = successor.index, "the epoch's fresh instance was dropped: {why}");
        }
    }

    /// Finish the epoch in progress now: the rest of its snapshot, the
    /// catch-up, the switch. Before an entry whose effect a catch-up could
    /// not repeat.
    pub(super) fn complete_epoch(&mut self) -> Result<(), FsmError> {
        while let Some(successor) = &self.successor
            && successor.chunks.is_some()
        {
            if self.taking.is_none() && !successor.finishing {
                self.drop_successor("its snapshot was abandoned");
                return Ok(());
            }
            self.flush_successor(true);
            if self.taking.is_some() {
                self.pump_snapshot(Duration::ZERO, true)?;
            }
        }
        if self.successor.is_some() {
            self.pump_successor(true)?;
        }
        Ok(())
    }
}
