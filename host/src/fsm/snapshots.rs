//! The apply worker's snapshots, streamed both ways so that neither the
//! host nor one plugin call ever holds a whole state:
//!
//! - **Taking** one: `snapshot-begin` at the applied index, then
//!   `snapshot-next` a chunk at a time, between apply batches and while the
//!   worker is idle, for at most [`PUMP_BUDGET`] at a stretch: entries keep
//!   applying while a large state is read (0.2.0 plugins show the state as
//!   of the begin). Chunks go through a short queue to a writer thread that
//!   stores them, about a MiB per LMDB transaction; when the last is
//!   stored, the writer switches the stored snapshot over and compacts the
//!   log. Host memory for a snapshot is the queue ([`WRITE_QUEUE`] reads)
//!   plus the chunk being gathered.
//! - **Restoring** one (`restore.rs`): the stored snapshot (or one from
//!   the leader) is fed to a fresh instance piece by piece with
//!   `restore-begin`, `restore-chunk` and `restore-finish`.
//!
//! Anything that replaces the instance (a restore, a rebuild after a trap,
//! a plugin swap) abandons a snapshot being read first; its stored pieces
//! are dropped by the next save.

use std::sync::mpsc::{self, TrySendError};
use std::time::{Duration, Instant};

use raft::prelude::SnapshotMetadata;
use tokio::sync::oneshot;

use super::{Fsm, FsmError};
use crate::sandbox::CallError;
use crate::snapshot::{self, SnapshotHeader};
use crate::storage::{LogStore, SnapshotSave, StoreError};

/// How long the worker reads a snapshot from the plugin before it looks at
/// its requests again: what a snapshot in progress may add to an apply's
/// or a query's wait.
pub(super) const PUMP_BUDGET: Duration = Duration::from_millis(3);

/// Chunks read but not yet stored, at most.
const WRITE_QUEUE: usize = 4;

/// The most one `snapshot-next` is asked for: small enough that one call
/// stays within a few milliseconds (kv reads about 100 MB/s).
const MAX_READ_BYTES: usize = 256 << 10;

/// Who waits for a snapshot at or past an index (`snapshot` command, raft).
pub(super) type SnapshotWaiter = (u64, oneshot::Sender<Result<u64, String>>);

/// A snapshot being taken.
pub(super) struct Taking {
    metadata: SnapshotMetadata,
    compact_to: u64,
    started: Instant,
    /// Time spent in the plugin's snapshot calls.
    plugin_time: Duration,
    state_bytes: u64,
    /// To the writer; `None` once it has everything (it is storing).
    queue: Option<mpsc::SyncSender<ToWriter>>,
    /// What the full queue could not take yet.
    held: Option<ToWriter>,
    writer: std::thread::JoinHandle<Result<bool, StoreError>>,
    /// The header's bytes hashed: the epoch's digest begins so (the
    /// successor adds the state as it restores it).
    pub(super) digest: sha2::Sha256,
}

enum ToWriter {
    Piece(Vec<u8>),
    /// Every piece was sent: switch to the snapshot, compact.
    Finish,
}

/// The writer thread: store pieces as they come; `Ok(true)` once the
/// snapshot is the stored one, `Ok(false)` if it was abandoned or a newer
/// snapshot got there first.
fn write_snapshot<S: LogStore>(
    store: S,
    queue: mpsc::Receiver<ToWriter>,
    metadata: SnapshotMetadata,
    compact_to: u64,
    reserve: u64,
    commit: prometheus::Histogram,
) -> Result<bool, StoreError> {
    let timed = |write: &mut dyn FnMut() -> Result<(), StoreError>| {
        let started = Instant::now();
        write()?;
        commit.observe(started.elapsed().as_secs_f64());
        Ok::<(), StoreError>(())
    };
    let mut save = store.begin_snapshot_save()?;
    let written = write_pieces(&store, &mut save, queue, metadata, compact_to, reserve, timed);
    // A save that failed or was given up drops what it stored (a full disk
    // needs that space back for the log).
    if !matches!(written, Ok(true))
        && let Err(error) = store.abort_snapshot_save(&save)
    {
        tracing::warn!(%error, "could not drop the pieces of a snapshot that was not stored");
    }
    written
}

fn write_pieces<S: LogStore>(
    store: &S,
    save: &mut SnapshotSave,
    queue: mpsc::Receiver<ToWriter>,
    metadata: SnapshotMetadata,
    compact_to: u64,
    reserve: u64,
    timed: impl Fn(&mut dyn FnMut() -> Result<(), StoreError>) -> Result<(), StoreError>,
) -> Result<bool, StoreError> {
    // A chunk that would take the disk under the reserve fails the
    // snapshot (as a full disk would) before LMDB tries: the log's writes
    // need that space, and a write that fills the disk to the last byte can
    // leave LMDB failing until space comes back.
    let room = |bytes: usize| -> Result<(), StoreError> {
        match store.space() {
            Ok(usage)
                if reserve > 0
                    && usage.fs_total_bytes > 0
                    && usage.fs_free_bytes < reserve.saturating_add(bytes as u64) =>
            {
                Err(StoreError::Io(std::io::Error::from_raw_os_error(28)))
            }
            _ => Ok(()),
        }
    };
    // Pieces are gathered into chunks of about a MiB: one transaction (and
    // fsync) each, a short turn at the write lock the log's writes share.
    let mut chunk = Vec::with_capacity(crate::storage::lmdb::SNAPSHOT_CHUNK_BYTES);
    for message in queue {
        match message {
            ToWriter::Piece(piece) => {
                chunk.extend_from_slice(&piece);
                if chunk.len() >= crate::storage::lmdb::SNAPSHOT_CHUNK_BYTES {
                    room(chunk.len())?;
                    timed(&mut || store.put_snapshot_piece(save, &chunk))?;
                    chunk.clear();
                }
            }
            ToWriter::Finish => {
                if !chunk.is_empty() {
                    room(chunk.len())?;
                    timed(&mut || store.put_snapshot_piece(save, &chunk))?;
                }
                let mut stored = Ok(false);
                timed(&mut || {
                    stored = store.finish_snapshot_save(save.clone(), &metadata, compact_to);
                    Ok(())
                })?;
                return stored;
            }
        }
    }
    Ok(false)
}

impl<S: LogStore> Fsm<S> {
    /// What a snapshot at the applied index holds besides the plugin's
    /// state: the host's replicated tables.
    pub(super) fn snapshot_header(&self) -> SnapshotHeader {
        SnapshotHeader {
            plugin_sha256: self.plugin.sha256(),
            members: self.members.iter().map(|(id, addr)| (*id, addr.clone())).collect(),
            alarms: self.alarms.iter().copied().collect(),
            limits: self.cluster_limits,
            sessions: self.sessions.clone(),
        }
    }

    /// Whether a periodic snapshot is due: `every_entries` applied since
    /// the last, holding at least `log_percent` of its size.
    pub(super) fn snapshot_due(&self) -> bool {
        let log_wanted = self.snapshot_bytes.saturating_mul(self.config.log_percent) / 100;
        self.taking.is_none()
            && self.applied >= self.snapshot_index.saturating_add(self.config.every_entries)
            && self.applied >= self.snapshot_retry_at
            && self.log_bytes_since_snapshot >= log_wanted
    }

    /// Begin a snapshot at the applied index (none may be in progress).
    pub(super) fn start_snapshot(&mut self) -> Result<(), FsmError> {
        debug_assert!(self.taking.is_none());
        let index = self.applied;
        let started = Instant::now();
        match self.instance.snapshot_begin(index) {
            Ok(()) => {}
            Err(CallError::Guest(message)) => {
                self.snapshot_failed(format!("the plugin refused to snapshot: {message}"));
                return Ok(());
            }
            Err(CallError::Trap(message)) => {
                // Deterministic: recorded, so a replay through this epoch
                // skips it rather than trap (and rebuild) again.
                if self.epochs_from_log {
                    self.record_trap(index, message.clone())?;
                }
                self.rebuild(index)?;
                self.snapshot_short_of_memory = crate::sandbox::is_out_of_memory(&message);
                self.snapshot_failed(format!("the plugin trapped in snapshot(): {message}"));
                return Ok(());
            }
        }
        let header = snapshot::encode_header(&self.snapshot_header());
        let mut metadata = SnapshotMetadata {
            index,
            term: self.store.term(index)?,
            ..Default::default()
        };
        metadata.set_conf_state(self.conf_state.clone());
        // Out of space, the log behind the snapshot goes too: a follower
        // that lags gets a snapshot instead, and the space comes back.
        let keep = if self.alarms.is_empty() {
            self.config.keep_entries
        } else {
            0
        };
        let compact_to = index.saturating_sub(keep);
        let (queue, pieces) = mpsc::sync_channel(WRITE_QUEUE);
        let store = self.store.clone();
        let span = tracing::Span::current();
        let for_writer = metadata.clone();
        let commit = self.metrics.backend_commit.clone();
        let reserve = self.config.reserve_bytes;
        let writer = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let _entered = span.enter();
                write_snapshot(store, pieces, for_writer, compact_to, reserve, commit)
            })
            .map_err(StoreError::Io)?;
        self.log_bytes_since_snapshot = 0;
        self.taking = Some(Taking {
            metadata,
            compact_to,
            started,
            plugin_time: started.elapsed(),
            state_bytes: 0,
            queue: Some(queue),
            digest: sha2::Digest::new_with_prefix(&header),
            held: Some(ToWriter::Piece(header)),
            writer,
        });
        Ok(())
    }

    /// Move the snapshot in progress along for about `budget` (or, with
    /// `block`, to its end): read chunks from the plugin, hand them to the
    /// writer, and finish once it is stored. Then start one that someone
    /// waits for. Returns whether anything moved.
    pub(super) fn pump_snapshot(&mut self, budget: Duration, block: bool) -> Result<bool, FsmError> {
        let deadline = Instant::now() + budget;
        let mut moved = false;
        while let Some(taking) = &mut self.taking {
            if let Some(message) = taking.held.take() {
                let last = matches!(message, ToWriter::Finish);
                let queue = taking.queue.as_ref().expect("a held message has a queue");
                let sent = if block {
                    queue.send(message).map_err(|_| ())
                } else {
                    match queue.try_send(message) {
                        Ok(()) => Ok(()),
                        Err(TrySendError::Full(message)) => {
                            taking.held = Some(message);
                            break;
                        }
                        Err(TrySendError::Disconnected(_)) => Err(()),
                    }
                };
                moved = true;
                if sent.is_err() || last {
                    // The writer has it all, or stopped early (with an error
                    // that finishing reports).
                    taking.queue = None;
                }
            }
            if taking.queue.is_none() {
                if block || taking.writer.is_finished() {
                    self.finish_snapshot()?;
                    moved = true;
                    continue;
                }
                break;
            }
            if !block && Instant::now() >= deadline {
                break;
            }
            // The epoch's fresh instance restores at its own pace.
            if !self.flush_successor(block) {
                break;
            }
            let started = Instant::now();
            let read_bytes = self.config.chunk_bytes.clamp(1, MAX_READ_BYTES);
            let next = self.instance.snapshot_next(self.applied, read_bytes);
            let taking = self.taking.as_mut().expect("checked above");
            taking.plugin_time += started.elapsed();
            let epoch = taking.metadata.index;
            moved = true;
            match next {
                Ok(chunk) if chunk.is_empty() => {
                    taking.held = Some(ToWriter::Finish);
                    self.successor_restored();
                }
                Ok(chunk) => {
                    taking.state_bytes += chunk.len() as u64;
                    self.feed_successor(&chunk);
                    let taking = self.taking.as_mut().expect("checked above");
                    taking.held = Some(ToWriter::Piece(chunk));
                }
                Err(CallError::Guest(message)) => {
                    self.abandon_snapshot()?;
                    self.snapshot_failed(format!("the plugin refused to snapshot: {message}"));
                }
                Err(CallError::Trap(message)) => {
                    self.abandon_snapshot()?;
                    if self.epochs_from_log {
                        self.record_trap(epoch, message.clone())?;
                    }
                    self.rebuild(self.applied)?;
                    self.snapshot_short_of_memory = crate::sandbox::is_out_of_memory(&message);
                    self.snapshot_failed(format!("the plugin trapped in snapshot(): {message}"));
                }
            }
        }
        if self.taking.is_none() {
            self.answer_snapshot_waiters();
        }
        Ok(moved)
    }

    /// The writer is done (or stopped): record the snapshot it stored.
    fn finish_snapshot(&mut self) -> Result<(), FsmError> {
        let taking = self.taking.take().expect("a snapshot in progress");
        drop(taking.queue);
        let written = taking
            .writer
            .join()
            .map_err(|_| StoreError::Invalid("the snapshot thread panicked".into()))?;
        let stored = match written {
            Ok(stored) => stored,
            // A full disk (or map) fails this snapshot, not the node: its
            // chunks never became the stored snapshot, and it is tried
            // again later, as after any failed snapshot.
            Err(error) if error.is_out_of_space(Some(0), 1) => {
                tracing::warn!(%error, "could not store a snapshot: out of space; will retry later");
                self.snapshot_failed(format!("could not store the snapshot: {error}"));
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
        let index = taking.metadata.index;
        if stored {
            self.snapshot_index = self.snapshot_index.max(index);
            self.snapshot_bytes = taking.state_bytes;
            self.metrics.snapshots.inc();
            self.metrics
                .snapshot_duration
                .observe(taking.started.elapsed().as_secs_f64());
            self.metrics
                .snapshot_bytes
                .set(taking.state_bytes.min(i64::MAX as u64) as i64);
            tracing::info!(
                index,
                state_bytes = taking.state_bytes,
                compacted_to = taking.compact_to,
                plugin_ms = taking.plugin_time.as_millis() as u64,
                elapsed_ms = taking.started.elapsed().as_millis() as u64,
                "took a snapshot"
            );
        } else {
            tracing::info!(index, "a newer snapshot was stored first; dropped this one");
        }
        self.snapshot_outcome(Ok(()));
        self.answer_snapshot_waiters();
        Ok(())
    }

    /// Stop reading the snapshot in progress (the instance is about to be
    /// replaced); one the writer is already storing is waited for.
    pub(super) fn abandon_snapshot(&mut self) -> Result<(), FsmError> {
        self.drop_successor("the running instance is being replaced");
        let Some(taking) = &mut self.taking else { return Ok(()) };
        if taking.queue.is_none() {
            return self.finish_snapshot();
        }
        taking.queue = None;
        taking.held = None;
        let taking = self.taking.take().expect("checked above");
        let written = taking
            .writer
            .join()
            .map_err(|_| StoreError::Invalid("the snapshot thread panicked".into()))?;
        if let Err(error) = written
            && !error.is_out_of_space(Some(0), 1)
        {
            return Err(error.into());
        }
        tracing::debug!(index = taking.metadata.index, "abandoned a snapshot in progress");
        Ok(())
    }

    /// Finish the snapshot in progress, if any, and whatever waits.
    /// (and the epoch it began).
    pub fn wait_for_snapshot(&mut self) -> Result<(), FsmError> {
        while self.taking.is_some() {
            self.pump_snapshot(Duration::ZERO, true)?;
        }
        self.complete_epoch()
    }

    /// Someone wants a snapshot at or past the applied index now.
    pub(super) fn want_snapshot(&mut self, reply: oneshot::Sender<Result<u64, String>>) -> Result<(), FsmError> {
        self.snapshot_waiters.push((self.applied, reply));
        self.pump_snapshot(PUMP_BUDGET, false)?;
        self.want_epoch()
    }

    /// Answer those whose snapshot is stored.
    pub(super) fn answer_snapshot_waiters(&mut self) {
        let stored = self.snapshot_index;
        let (done, waiting): (Vec<SnapshotWaiter>, Vec<SnapshotWaiter>) = std::mem::take(&mut self.snapshot_waiters)
            .into_iter()
            .partition(|(at, _)| *at <= stored);
        for (_, reply) in done {
            let _ = reply.send(Ok(stored));
        }
        self.snapshot_waiters = waiting;
    }

    fn snapshot_failed(&mut self, message: String) {
        for (_, reply) in self.snapshot_waiters.drain(..) {
            let _ = reply.send(Err(message.clone()));
        }
        self.snapshot_outcome(Err(message));
    }

    /// Count a snapshot attempt; after a failure, back off (in entries).
    fn snapshot_outcome(&mut self, outcome: Result<(), String>) {
        self.snapshot_attempts += 1;
        let mut error = self.snapshot_error.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => {
                self.snapshot_failures = 0;
                self.snapshot_retry_at = 0;
                self.snapshot_short_of_memory = false;
                error.clear();
            }
            Err(message) => {
                self.snapshot_failures = self.snapshot_failures.saturating_add(1);
                let wait = (64u64 << self.snapshot_failures.min(40)).min(self.config.every_entries.max(64));
                self.snapshot_retry_at = self.applied.saturating_add(wait);
                tracing::warn!(
                    retry_at = self.snapshot_retry_at,
                    failures = self.snapshot_failures,
                    "could not take a snapshot; will retry later: {message}"
                );
                *error = format!("{message} (failed {} times in a row)", self.snapshot_failures);
            }
        }
    }
}
