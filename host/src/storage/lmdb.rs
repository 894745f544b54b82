//! The node's store: the raft log and hard state in a write-ahead log
//! (`wal.rs`, in `wal/` beside LMDB's files), everything else in one LMDB
//! environment (heed).
//!
//! Databases:
//! - `entries`: empty. Data dirs from before the write-ahead log kept the
//!   log here (index, big-endian -> raft `Entry`); opening moves it into a
//!   new log, then clears it;
//! - `meta`: `hard_state` (as an installed or saved snapshot left it; the
//!   log's records carry the rest), `conf_state`, `snapshot_meta`,
//!   `snapshot_chunks` (which save holds the stored snapshot's data, and
//!   how much), `applied_index` (before the log), `identity`,
//!   `log_compacted_to` (entries at and before it are gone, even where a
//!   log segment still holds them);
//! - `snapshot_chunks`: (save number << 32 | chunk number) -> up to
//!   [`SNAPSHOT_CHUNK_BYTES`] of a snapshot's data. A snapshot is written a
//!   chunk per transaction, then switched to in one small transaction, so a
//!   large state never holds LMDB's single write lock (which the log's writes
//!   need) for long;
//! - `traps`: log index -> the message of an entry whose apply trapped;
//! - `plugins`: SHA-256 -> plugin component bytes;
//! - `plugin_history`: log index -> SHA-256 of the plugin active from there.
//!
//! Durability: [`LogStore::write`] appends one record to the log and syncs
//! it (plus an LMDB transaction, fsynced, for a conf state or identity), so
//! when `write` returns the batch is on disk; a crash keeps a record whole
//! or not at all. An installed snapshot is committed in LMDB first, then
//! the log is reset; a crash between leaves the old log, which opening
//! drops because it does not hold the snapshot's entry (see
//! `Inner::reconcile`). A crash in the middle of saving a snapshot leaves
//! chunks no metadata points to; the next save deletes them. Data dirs from
//! before chunking keep their snapshot in `meta.snapshot_data` until the
//! next save replaces it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64, U128};
use heed::{Database, Env, EnvOpenOptions, RoTxn};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::{LogStore, NodeIdentity, SnapshotPiece, SnapshotSave, StoreError, WriteBatch, check_contiguous};

mod options;
mod snapshots;
mod turns;
mod wal;
pub use options::LmdbOptions;
use snapshots::{ChunkedData, chunk_key, chunks_of};
use turns::{WriteTurn, WriteTurns};

type Index = U64<BigEndian>;
type ChunkKey = U128<BigEndian>;

/// A snapshot's data is stored in pieces of at most this size, one write
/// transaction each.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Entries moved per record from a data dir's LMDB log into a new
/// write-ahead log.
const MIGRATE_BATCH: usize = 10_000;

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT_META: &str = "snapshot_meta";
/// Before chunking: the whole snapshot in one value. Read, never written.
const SNAPSHOT_DATA: &str = "snapshot_data";
/// The stored snapshot's save number (u64), chunk count (u32) and length (u64), big-endian.
const SNAPSHOT_CHUNKS: &str = "snapshot_chunks";
const APPLIED_INDEX: &str = "applied_index";
const CONF_INDEX: &str = "conf_index";
/// The index the log was last compacted to (u64), so entries a segment
/// still holds below it are not brought back by a restart.
const LOG_COMPACTED: &str = "log_compacted_to";
const IDENTITY: &str = "identity";

/// The LMDB-backed [`LogStore`]. Cheap to clone: clones share the environment.
#[derive(Clone)]
pub struct LmdbStore {
    inner: Arc<Inner>,
}

struct Inner {
    env: Env,
    /// The environment's directory (for its filesystem's free space).
    dir: std::path::PathBuf,
    /// LMDB's old copy of the log (empty once moved), for tests to fill.
    #[cfg(test)]
    entries: Database<Index, Bytes>,
    meta: Database<Str, Bytes>,
    traps: Database<Index, Str>,
    plugins: Database<Bytes, Bytes>,
    plugin_history: Database<Index, Bytes>,
    snapshot_chunks: Database<ChunkKey, Bytes>,
    /// One snapshot save or install at a time (each spans transactions).
    snapshot_lock: Mutex<()>,
    /// The next save number: above every one in `snapshot_chunks`.
    next_save: AtomicU64,
    write_turns: WriteTurns,
    /// Held by whatever changes the log or checks a write against it (a
    /// write, a snapshot's switch and compaction, an install), taken before
    /// a write turn. LMDB's turns are not needed for the log, so a write
    /// never waits behind a snapshot's chunks.
    log_lock: Mutex<()>,
    /// The raft log, hard state and applied index.
    wal: wal::Wal,
    /// The stored snapshot's index and term, as LMDB has them: raft asks
    /// for them on every term lookup, so they are kept here rather than
    /// read in a transaction each time. Changed only under `log_lock`.
    snapshot_at: RwLock<(u64, u64)>,
}

impl LmdbStore {
    /// Open (or create) the store in directory `dir`.
    pub fn open(dir: &Path, options: &LmdbOptions) -> Result<LmdbStore, StoreError> {
        std::fs::create_dir_all(dir)?;
        // SAFETY: heed requires that the same environment is not opened twice
        // in one process and that the file is not modified by others while
        // mapped. The node opens its data dir once; a second node on the same
        // dir is refused by LMDB's lock file only across processes, which is
        // what we rely on (see ARCHITECTURE.md, "one process per data dir").
        let env = unsafe {
            let mut open = EnvOpenOptions::new();
            open.map_size(options.map_size_bytes).max_dbs(8);
            if options.unsafe_no_fsync {
                open.flags(heed::EnvFlags::NO_SYNC);
            }
            open.open(dir)?
        };
        let mut txn = env.write_txn()?;
        let entries = env.create_database(&mut txn, Some("entries"))?;
        let meta = env.create_database(&mut txn, Some("meta"))?;
        let traps = env.create_database(&mut txn, Some("traps"))?;
        let plugins = env.create_database(&mut txn, Some("plugins"))?;
        let plugin_history = env.create_database(&mut txn, Some("plugin_history"))?;
        let snapshot_chunks: Database<ChunkKey, Bytes> = env.create_database(&mut txn, Some("snapshot_chunks"))?;
        let next_save = snapshot_chunks.last(&txn)?.map_or(1, |(key, _)| (key >> 32) as u64 + 1);
        txn.commit()?;
        let wal = open_wal(&env, dir, entries, meta, options)?;
        let inner = Inner {
            env,
            dir: dir.to_path_buf(),
            #[cfg(test)]
            entries,
            meta,
            traps,
            plugins,
            plugin_history,
            snapshot_chunks,
            snapshot_lock: Mutex::new(()),
            next_save: AtomicU64::new(next_save),
            write_turns: WriteTurns::default(),
            log_lock: Mutex::new(()),
            wal,
            snapshot_at: RwLock::new((0, 0)),
        };
        inner.reconcile()?;
        Ok(LmdbStore { inner: Arc::new(inner) })
    }

    fn read<T>(&self, f: impl FnOnce(&Inner, &RoTxn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let txn = self.inner.env.read_txn()?;
        f(&self.inner, &txn)
    }

    /// Chunks written by a save that crashed before switching to them.
    #[cfg(test)]
    pub(crate) fn orphan_chunks_for_test(&self, data: &[u8]) {
        self.write_chunks(data).unwrap();
    }

    /// How many snapshot chunks the store holds, of any save.
    #[cfg(test)]
    pub(crate) fn chunk_count_for_test(&self) -> u64 {
        let txn = self.inner.env.read_txn().unwrap();
        self.inner.snapshot_chunks.len(&txn).unwrap()
    }

    /// A snapshot stored the way data dirs from before chunking hold it.
    #[cfg(test)]
    pub(crate) fn put_unchunked_snapshot_for_test(&self, snapshot: &Snapshot) {
        let inner = &self.inner;
        let mut txn = inner.env.write_txn().unwrap();
        inner
            .meta
            .put(&mut txn, SNAPSHOT_META, &encode(snapshot.get_metadata()).unwrap())
            .unwrap();
        inner.meta.put(&mut txn, SNAPSHOT_DATA, &snapshot.data).unwrap();
        txn.commit().unwrap();
        let metadata = snapshot.get_metadata();
        inner.set_snapshot_at(metadata.index, metadata.term);
    }

    /// Overwrite the entry at `index` with garbage, as a bad disk would.
    #[cfg(test)]
    pub(crate) fn corrupt_entry_for_test(&self, index: u64) {
        self.inner.wal.corrupt_entry_for_test(index);
    }

    /// Put a log where data dirs from before the write-ahead log kept it.
    #[cfg(test)]
    pub(crate) fn put_lmdb_log_for_test(&self, log: &[Entry], hard_state: &HardState, applied: u64) {
        let inner = &self.inner;
        let mut txn = inner.env.write_txn().unwrap();
        for entry in log {
            inner
                .entries
                .put(&mut txn, &entry.index, &encode(entry).unwrap())
                .unwrap();
        }
        inner
            .meta
            .put(&mut txn, HARD_STATE, &encode(hard_state).unwrap())
            .unwrap();
        inner.meta.put(&mut txn, APPLIED_INDEX, &applied.to_be_bytes()).unwrap();
        txn.commit().unwrap();
    }

    /// How many entries LMDB's own copy of the log holds.
    #[cfg(test)]
    pub(crate) fn lmdb_log_len_for_test(&self) -> u64 {
        let txn = self.inner.env.read_txn().unwrap();
        self.inner.entries.len(&txn).unwrap()
    }
}

/// Open the store's write-ahead log, making it first if the data dir has
/// none: empty for a new store, or holding the log a data dir from before
/// it kept in LMDB. The new log is made under another name and renamed into
/// place once whole and durable; only then is the LMDB copy cleared, so a
/// crash anywhere leaves one whole copy.
fn open_wal(
    env: &Env,
    dir: &Path,
    entries: Database<Index, Bytes>,
    meta: Database<Str, Bytes>,
    options: &LmdbOptions,
) -> Result<wal::Wal, StoreError> {
    let sync = !options.unsafe_no_fsync;
    let wal_dir = dir.join("wal");
    if !wal_dir.exists() {
        let building = dir.join("wal.new");
        match std::fs::remove_dir_all(&building) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let txn = env.read_txn()?;
        let hard_state: HardState = read_message(meta, &txn, HARD_STATE)?.unwrap_or_default();
        let applied = read_u64(meta, &txn, APPLIED_INDEX)?;
        let log = wal::Wal::create(&building, sync, &hard_state, applied)?;
        let mut batch = Vec::new();
        for item in entries.iter(&txn)? {
            let (index, bytes) = item?;
            batch.push(decode_entry(index, bytes)?);
            if batch.len() == MIGRATE_BATCH {
                log.append(&wal::Record {
                    entries: std::mem::take(&mut batch),
                    ..Default::default()
                })?;
            }
        }
        if !batch.is_empty() {
            log.append(&wal::Record {
                entries: batch,
                ..Default::default()
            })?;
        }
        drop(log);
        drop(txn);
        std::fs::rename(&building, &wal_dir)?;
        if sync {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    let opened = wal::Wal::open(&wal_dir, sync)?;
    if opened.torn_bytes > 0 {
        tracing::warn!(
            bytes = opened.torn_bytes,
            "the write-ahead log ended in a write the last crash cut short; it was never acknowledged, and is dropped"
        );
    }
    let mut txn = env.write_txn()?;
    if !entries.is_empty(&txn)? {
        // Moved into the log above (or by an open that crashed after).
        entries.clear(&mut txn)?;
        txn.commit()?;
    }
    Ok(opened.wal)
}

/// `hard_state` with its commit index no higher than `last` (raft-rs
/// panics on a commit past the last index).
fn capped(hard_state: &HardState, last: u64) -> HardState {
    let mut capped = hard_state.clone();
    capped.commit = capped.commit.min(last);
    capped
}

fn read_message<M: protobuf::Message>(
    meta: Database<Str, Bytes>,
    txn: &RoTxn,
    key: &str,
) -> Result<Option<M>, StoreError> {
    match meta.get(txn, key)? {
        None => Ok(None),
        Some(bytes) => M::parse_from_bytes(bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{key}: {e}"))),
    }
}

fn read_u64(meta: Database<Str, Bytes>, txn: &RoTxn, key: &str) -> Result<u64, StoreError> {
    match meta.get(txn, key)? {
        None => Ok(0),
        Some(bytes) => {
            let bytes: [u8; 8] = bytes
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("{key} is not 8 bytes")))?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

impl Inner {
    fn meta_message<M: protobuf::Message>(&self, txn: &RoTxn, key: &str) -> Result<Option<M>, StoreError> {
        read_message(self.meta, txn, key)
    }

    fn meta_u64(&self, txn: &RoTxn, key: &str) -> Result<u64, StoreError> {
        read_u64(self.meta, txn, key)
    }

    /// Make the log agree with the stored snapshot, after opening:
    /// - the log must reach back to the snapshot, or there is a hole;
    /// - a log that does not hold the snapshot's entry (same index, same
    ///   term) was replaced by it: an install whose reset of the log a
    ///   crash cut off (raft installs a snapshot only where the log does
    ///   not match it), or a log the snapshot covers wholly; it is dropped;
    /// - the hard state is the later of the log's and LMDB's (an install
    ///   writes LMDB's), its commit the higher of the two, and never past
    ///   the last index (raft-rs panics on that).
    fn reconcile(&self) -> Result<(), StoreError> {
        let txn = self.env.read_txn()?;
        let snapshot = self.snapshot_meta(&txn)?;
        let stored: HardState = self.meta_message(&txn, HARD_STATE)?.unwrap_or_default();
        let compacted = self.meta_u64(&txn, LOG_COMPACTED)?.min(snapshot.index);
        drop(txn);
        self.set_snapshot_at(snapshot.index, snapshot.term);
        let logged = self.wal.hard_state();
        let mut hard_state = if stored.term > logged.term || (stored.term == logged.term && logged.vote == 0) {
            stored.clone()
        } else {
            logged.clone()
        };
        hard_state.commit = stored.commit.max(logged.commit);
        if let Some((first, last)) = self.wal.bounds() {
            let after_snapshot = snapshot.index.saturating_add(1);
            if first > after_snapshot {
                return Err(StoreError::Corrupt(format!(
                    "the log starts at {first}, after the snapshot at {}: entries {}..{first} are missing",
                    snapshot.index, after_snapshot
                )));
            }
            let holds_snapshot = first == after_snapshot
                || (snapshot.index <= last && self.wal.term(snapshot.index) == Some(snapshot.term));
            if !holds_snapshot {
                tracing::warn!(
                    snapshot = snapshot.index,
                    first,
                    last,
                    "the log does not hold the snapshot's entry (an install's reset of it was cut off by a crash); dropping it"
                );
                // Durably: entries appended after it must not replay onto
                // the old log.
                self.wal.reset(snapshot.index, &capped(&hard_state, snapshot.index))?;
            }
        }
        self.wal.compact(compacted)?;
        self.wal.set_hard_state(capped(&hard_state, self.last_index()));
        Ok(())
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, ()> {
        self.log_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_snapshot_at(&self, index: u64, term: u64) {
        *self
            .snapshot_at
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (index, term);
    }

    fn snapshot_at(&self) -> (u64, u64) {
        *self.snapshot_at.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot_meta(&self, txn: &RoTxn) -> Result<SnapshotMetadata, StoreError> {
        Ok(self.meta_message(txn, SNAPSHOT_META)?.unwrap_or_default())
    }

    /// A write transaction, begun once it is this caller's turn; the turn
    /// ends when the returned guard drops (after the commit).
    fn write_in_turn(&self) -> Result<(WriteTurn<'_>, heed::RwTxn<'_>), StoreError> {
        let turn = self.write_turns.wait();
        Ok((turn, self.env.write_txn()?))
    }

    /// The first entry's index, or the one after the snapshot.
    fn first_index(&self) -> u64 {
        match self.wal.bounds() {
            Some((first, _)) => first,
            None => self.snapshot_at().0.saturating_add(1),
        }
    }

    /// The last entry's index, or the snapshot's.
    fn last_index(&self) -> u64 {
        match self.wal.bounds() {
            Some((_, last)) => last,
            None => self.snapshot_at().0,
        }
    }
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StoreError> {
    let entry = Entry::parse_from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("entry {index}: {e}")))?;
    if entry.index != index {
        return Err(StoreError::Corrupt(format!(
            "entry stored at {index} claims index {}",
            entry.index
        )));
    }
    Ok(entry)
}

fn encode<M: protobuf::Message>(message: &M) -> Result<Vec<u8>, StoreError> {
    message
        .write_to_bytes()
        .map_err(|e| StoreError::Invalid(format!("protobuf encoding: {e}")))
}

fn encode_identity(identity: &NodeIdentity) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(identity).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn to_raft(error: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(error)))
}

impl Storage for LmdbStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.read(|inner, txn| {
            let conf_state: ConfState = inner.meta_message(txn, CONF_STATE)?.unwrap_or_default();
            Ok(RaftState::new(inner.wal.hard_state(), conf_state))
        })
        .map_err(to_raft)
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let inner = &self.inner;
        if low < inner.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > inner.last_index().saturating_add(1) {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        // raft-rs semantics: always at least one entry, then at most
        // `max_size` bytes.
        match inner.wal.entries(low, high, max_size.into()).map_err(to_raft)? {
            wal::Read::Entries(entries) => Ok(entries),
            wal::Read::Compacted => Err(raft::Error::Store(StorageError::Compacted)),
            wal::Read::Unavailable => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let inner = &self.inner;
        let (snapshot_index, snapshot_term) = inner.snapshot_at();
        if index == snapshot_index {
            return Ok(snapshot_term);
        }
        match inner.wal.term(index) {
            Some(term) => Ok(term),
            None if index < inner.first_index() => Err(raft::Error::Store(StorageError::Compacted)),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.last_index())
    }

    /// The stored snapshot for raft to send, with a reference for data:
    /// the transport streams the chunks from the store (see
    /// [`crate::snapshot::DataRef`]), so the raft loop never reads them.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let stored = self
            .read(|inner, txn| {
                let metadata = inner.snapshot_meta(txn)?;
                if metadata.index == 0 {
                    return Ok(None);
                }
                let mut snapshot = Snapshot::default();
                snapshot.data = crate::snapshot::DataRef::Stored {
                    len: self.stored_len(txn)?,
                }
                .to_bytes()
                .into();
                snapshot.set_metadata(metadata);
                Ok(Some(snapshot))
            })
            .map_err(to_raft)?;
        match stored {
            Some(snapshot) if super::snapshot_serves(&snapshot, request_index, to) => Ok(snapshot),
            // Too old, or made before `to` joined: `Staged` (raft's view of
            // the store) turns this into a want, the core into a request to
            // the apply worker; raft asks again later.
            _ => Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
        }
    }
}

impl LogStore for LmdbStore {
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        check_contiguous(&batch.entries)?;
        let inner = &self.inner;
        let _log = inner.lock_log();
        if let Some(first) = batch.entries.first() {
            let (snapshot_index, _) = inner.snapshot_at();
            if first.index <= snapshot_index {
                return Err(StoreError::Invalid(format!(
                    "entry {} is at or before the snapshot at {snapshot_index}",
                    first.index
                )));
            }
            let last = inner.last_index();
            if first.index > last.saturating_add(1) {
                return Err(StoreError::Invalid(format!(
                    "entry {} would leave a hole after the last index {last}",
                    first.index
                )));
            }
        }
        let hard_state = batch.hard_state.map(|mut hard_state| {
            // The commit index never goes back: a snapshot saved meanwhile
            // may have raised it past a batch queued before.
            hard_state.commit = hard_state.commit.max(inner.wal.hard_state().commit);
            hard_state
        });
        let record = wal::Record {
            reset: None,
            entries: batch.entries,
            hard_state,
            applied: batch.applied_index,
        };
        if !record.entries.is_empty() || record.hard_state.is_some() || record.applied.is_some() {
            // A new leader's entries replace an uncommitted suffix of ours.
            inner.wal.append(&record)?;
        }
        if batch.conf_state.is_some() || batch.identity.is_some() {
            // After the log: a conf state names an entry already in it.
            let (_turn, mut txn) = inner.write_in_turn()?;
            if let Some((conf_state, conf_index)) = &batch.conf_state {
                inner.meta.put(&mut txn, CONF_STATE, &encode(conf_state)?)?;
                inner.meta.put(&mut txn, CONF_INDEX, &conf_index.to_be_bytes())?;
            }
            if let Some(identity) = &batch.identity {
                inner.meta.put(&mut txn, IDENTITY, &encode_identity(identity)?)?;
            }
            txn.commit()?;
        }
        Ok(())
    }

    fn applied_index(&self) -> Result<u64, StoreError> {
        let before_the_log = self.read(|inner, txn| inner.meta_u64(txn, APPLIED_INDEX))?;
        Ok(self.inner.wal.applied().max(before_the_log))
    }

    fn conf_index(&self) -> Result<u64, StoreError> {
        self.read(|inner, txn| inner.meta_u64(txn, CONF_INDEX))
    }

    fn record_trap(&self, index: u64, message: &str) -> Result<(), StoreError> {
        let mut txn = self.inner.env.write_txn()?;
        self.inner.traps.put(&mut txn, &index, message)?;
        txn.commit()?;
        Ok(())
    }

    fn traps(&self, low: u64, high: u64) -> Result<Vec<(u64, String)>, StoreError> {
        self.read(|inner, txn| {
            let mut out = Vec::new();
            for item in inner.traps.range(txn, &(low..high))? {
                let (index, message) = item?;
                out.push((index, message.to_string()));
            }
            Ok(out)
        })
    }

    fn identity(&self) -> Result<Option<NodeIdentity>, StoreError> {
        self.read(|inner, txn| match inner.meta.get(txn, IDENTITY)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("identity: {e}"))),
        })
    }

    fn set_identity(&self, identity: &NodeIdentity) -> Result<(), StoreError> {
        let bytes = encode_identity(identity)?;
        let mut txn = self.inner.env.write_txn()?;
        self.inner.meta.put(&mut txn, IDENTITY, &bytes)?;
        txn.commit()?;
        Ok(())
    }

    fn put_plugin_blob(&self, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.inner.env.write_txn()?;
        if self.inner.plugins.get(&txn, sha256)?.is_none() {
            self.inner.plugins.put(&mut txn, sha256, wasm)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn plugin_blob(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|inner, txn| {
            let Some(wasm) = inner.plugins.get(txn, sha256)? else {
                return Ok(None);
            };
            if !crate::plugin_id::PluginId(*sha256).matches(wasm) {
                return Err(StoreError::Corrupt(format!(
                    "stored plugin {} does not match its hash",
                    hex::encode(sha256)
                )));
            }
            Ok(Some(wasm.to_vec()))
        })
    }

    fn activate_plugin(&self, index: u64, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.inner.env.write_txn()?;
        if self.inner.plugins.get(&txn, sha256)?.is_none() {
            self.inner.plugins.put(&mut txn, sha256, wasm)?;
        }
        self.inner.plugin_history.put(&mut txn, &index, sha256)?;
        txn.commit()?;
        Ok(())
    }

    fn plugin_history(&self) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        self.read(|inner, txn| {
            let mut out = Vec::new();
            for item in inner.plugin_history.iter(txn)? {
                let (index, sha) = item?;
                let sha: [u8; 32] = sha
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("plugin history at {index} is not a SHA-256")))?;
                out.push((index, sha));
            }
            Ok(out)
        })
    }

    fn space(&self) -> Result<super::SpaceUsage, StoreError> {
        let env = &self.inner.env;
        let (fs_free_bytes, fs_total_bytes) = super::filesystem(&self.inner.dir).unwrap_or((0, 0));
        let (log_file_bytes, log_live_bytes) = self.inner.wal.space();
        Ok(super::SpaceUsage {
            file_bytes: env.real_disk_size()? + log_file_bytes,
            live_bytes: env.non_free_pages_size()? + log_live_bytes,
            fs_free_bytes,
            fs_total_bytes,
        })
    }

    fn snapshot_metadata(&self) -> Result<SnapshotMetadata, StoreError> {
        self.read(|inner, txn| inner.snapshot_meta(txn))
    }

    fn stored_snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        self.read(|inner, txn| {
            let metadata = inner.snapshot_meta(txn)?;
            if metadata.index == 0 {
                return Ok(None);
            }
            let mut snapshot = Snapshot::default();
            snapshot.set_metadata(metadata);
            snapshot.data = inner.snapshot_data(txn)?.into();
            Ok(Some(snapshot))
        })
    }

    #[cfg(test)]
    fn save_snapshot(&self, snapshot: &Snapshot, compact_to: u64) -> Result<(), StoreError> {
        let _guard = self.snapshot_guard();
        if snapshot.get_metadata().index <= self.snapshot_metadata()?.index {
            return Ok(());
        }
        let location = self.write_chunks(&snapshot.data)?;
        self.commit_save(location, snapshot.get_metadata(), compact_to)
            .map(drop)
    }

    fn begin_snapshot_save(&self) -> Result<SnapshotSave, StoreError> {
        let id = self.inner.next_save.fetch_add(1, Ordering::Relaxed);
        Ok(SnapshotSave { id, pieces: 0, len: 0 })
    }

    fn put_snapshot_piece(&self, save: &mut SnapshotSave, piece: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        for chunk in piece.chunks(SNAPSHOT_CHUNK_BYTES) {
            let (_turn, mut txn) = inner.write_in_turn()?;
            inner
                .snapshot_chunks
                .put(&mut txn, &chunk_key(save.id, save.pieces), chunk)?;
            txn.commit()?;
            save.pieces += 1;
            save.len += chunk.len() as u64;
        }
        Ok(())
    }

    fn abort_snapshot_save(&self, save: &SnapshotSave) -> Result<(), StoreError> {
        let inner = &self.inner;
        let (_turn, mut txn) = inner.write_in_turn()?;
        inner.snapshot_chunks.delete_range(&mut txn, &chunks_of(save.id))?;
        txn.commit()?;
        Ok(())
    }

    fn finish_snapshot_save(
        &self,
        save: SnapshotSave,
        metadata: &SnapshotMetadata,
        compact_to: u64,
    ) -> Result<bool, StoreError> {
        let _guard = self.snapshot_guard();
        self.commit_save(ChunkedData::of(&save), metadata, compact_to)
    }

    fn read_snapshot(
        &self,
        piece: &mut dyn FnMut(&SnapshotMetadata, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<SnapshotMetadata>, StoreError> {
        self.read(|inner, txn| {
            let metadata = inner.snapshot_meta(txn)?;
            if metadata.index == 0 {
                return Ok(None);
            }
            inner.for_each_snapshot_chunk(txn, &mut |chunk| piece(&metadata, chunk))?;
            Ok(Some(metadata))
        })
    }

    fn stored_snapshot_len(&self) -> Result<Option<(u64, u64)>, StoreError> {
        self.read(|inner, txn| {
            let metadata = inner.snapshot_meta(txn)?;
            if metadata.index == 0 {
                return Ok(None);
            }
            Ok(Some((metadata.index, self.stored_len(txn)?)))
        })
    }

    fn install_snapshot(&self, snapshot: &Snapshot, hard_state: &HardState) -> Result<(), StoreError> {
        let _guard = self.snapshot_guard();
        let location = self.write_chunks(&snapshot.data)?;
        self.switch_installed(location, snapshot.get_metadata(), hard_state)
    }

    fn install_snapshot_file(
        &self,
        path: &Path,
        metadata: &SnapshotMetadata,
        hard_state: &HardState,
    ) -> Result<(), StoreError> {
        self.install_file(path, metadata, hard_state)
    }

    fn snapshot_piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError> {
        self.piece(index, piece)
    }
}
