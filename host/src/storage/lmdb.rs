//! The LMDB store (heed): one environment per node.
//!
//! Databases:
//! - `entries`: log index (u64, big-endian so LMDB orders it) -> raft `Entry`
//!   (raft-rs protobuf encoding);
//! - `meta`: `hard_state`, `conf_state`, `snapshot_meta`, `snapshot_chunks`
//!   (which save holds the stored snapshot's data, and how much), `applied_index`,
//!   `identity`;
//! - `snapshot_chunks`: (save number << 32 | chunk number) -> up to
//!   [`SNAPSHOT_CHUNK_BYTES`] of a snapshot's data. A snapshot is written a
//!   chunk per transaction, then switched to in one small transaction, so a
//!   large state never holds LMDB's single write lock (which the log's writes
//!   need) for long;
//! - `traps`: log index -> the message of an entry whose apply trapped;
//! - `plugins`: SHA-256 -> plugin component bytes;
//! - `plugin_history`: log index -> SHA-256 of the plugin active from there.
//!
//! Durability: every [`LogStore::write`] is one LMDB write transaction,
//! committed with LMDB's default fsync, so when `write` returns the batch is
//! on disk and a crash keeps it whole or not at all. A crash in the middle of
//! saving a snapshot leaves chunks no metadata points to; the next save
//! deletes them. Data dirs from before chunking keep their snapshot in
//! `meta.snapshot_data` until the next save replaces it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64, U128};
use heed::{Database, Env, EnvOpenOptions, RoTxn};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::{LogStore, NodeIdentity, SnapshotPiece, SnapshotSave, StoreError, WriteBatch, check_contiguous};

type Index = U64<BigEndian>;
type ChunkKey = U128<BigEndian>;

/// A snapshot's data is stored in pieces of at most this size, one write
/// transaction each.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Log entries deleted per transaction when compacting behind a snapshot.
const COMPACT_BATCH: u64 = 10_000;

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT_META: &str = "snapshot_meta";
/// Before chunking: the whole snapshot in one value. Read, never written.
const SNAPSHOT_DATA: &str = "snapshot_data";
/// The stored snapshot's save number (u64), chunk count (u32) and length (u64), big-endian.
const SNAPSHOT_CHUNKS: &str = "snapshot_chunks";
const APPLIED_INDEX: &str = "applied_index";
const CONF_INDEX: &str = "conf_index";
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
}

/// A first-come, first-served turn at LMDB's write lock. LMDB's own writer
/// mutex is not fair: a snapshot written chunk after chunk could take it
/// back each time and keep the log's writes (the persister) waiting for its
/// whole length. The log's writes and the snapshot's transactions queue
/// here instead, each for one transaction.
#[derive(Default)]
struct WriteTurns {
    /// (next ticket to hand out, ticket being served)
    tickets: Mutex<(u64, u64)>,
    served: std::sync::Condvar,
}

struct WriteTurn<'a>(&'a WriteTurns);

impl WriteTurns {
    fn wait(&self) -> WriteTurn<'_> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let ticket = tickets.0;
        tickets.0 += 1;
        while tickets.1 != ticket {
            tickets = self
                .served
                .wait(tickets)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        WriteTurn(self)
    }
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        let mut tickets = self.0.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tickets.1 += 1;
        self.0.served.notify_all();
    }
}

/// Where the stored snapshot's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkedData {
    save: u64,
    chunks: u32,
    len: u64,
}

impl ChunkedData {
    /// Where a save's chunks are.
    fn of(save: &SnapshotSave) -> ChunkedData {
        ChunkedData {
            save: save.id,
            chunks: save.pieces,
            len: save.len,
        }
    }

    fn to_bytes(self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..8].copy_from_slice(&self.save.to_be_bytes());
        out[8..12].copy_from_slice(&self.chunks.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<ChunkedData, StoreError> {
        let bytes: [u8; 20] = bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("{SNAPSHOT_CHUNKS} is not 20 bytes")))?;
        Ok(ChunkedData {
            save: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            chunks: u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")),
            len: u64::from_be_bytes(bytes[12..].try_into().expect("8 bytes")),
        })
    }
}

fn chunk_key(save: u64, chunk: u32) -> u128 {
    (u128::from(save) << 32) | u128::from(chunk)
}

/// Every chunk key of save `save`.
fn chunks_of(save: u64) -> std::ops::Range<u128> {
    chunk_key(save, 0)..chunk_key(save + 1, 0)
}

/// Options for opening a store.
#[derive(Debug, Clone)]
pub struct LmdbOptions {
    /// The largest the LMDB file may grow. LMDB maps it into the address
    /// space but only uses disk for what is written.
    pub map_size_bytes: usize,
    /// Commit without fsync. UNSAFE: a power loss or kernel crash loses
    /// writes that were acknowledged. For tests and benchmarks only.
    pub unsafe_no_fsync: bool,
}

impl Default for LmdbOptions {
    fn default() -> Self {
        LmdbOptions {
            map_size_bytes: 16 << 30,
            unsafe_no_fsync: false,
        }
    }
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
        Ok(LmdbStore {
            inner: Arc::new(Inner {
                env,
                dir: dir.to_path_buf(),
                entries,
                meta,
                traps,
                plugins,
                plugin_history,
                snapshot_chunks,
                snapshot_lock: Mutex::new(()),
                next_save: AtomicU64::new(next_save),
                write_turns: WriteTurns::default(),
            }),
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Inner, &RoTxn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let txn = self.inner.env.read_txn()?;
        f(&self.inner, &txn)
    }

    /// Write `data` as the chunks of a new save, one transaction each.
    fn write_chunks(&self, data: &[u8]) -> Result<ChunkedData, StoreError> {
        let mut save = self.begin_snapshot_save()?;
        self.put_snapshot_piece(&mut save, data)?;
        Ok(ChunkedData::of(&save))
    }

    /// Switch to a save whose chunks are all written (holding the snapshot
    /// lock), then compact the log behind it. `Ok(false)`: a newer
    /// snapshot was stored or installed meanwhile (which may have dropped
    /// this save's chunks), so this one is dropped.
    fn commit_save(
        &self,
        location: ChunkedData,
        metadata: &SnapshotMetadata,
        compact_to: u64,
    ) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let (turn, mut txn) = inner.write_in_turn()?;
        let own = chunks_of(location.save);
        let whole = location.chunks == 0
            || (inner.snapshot_chunks.get(&txn, &own.start)?.is_some()
                && inner
                    .snapshot_chunks
                    .get(&txn, &chunk_key(location.save, location.chunks - 1))?
                    .is_some());
        if metadata.index <= inner.snapshot_meta(&txn)?.index || !whole {
            inner.snapshot_chunks.delete_range(&mut txn, &own)?;
            txn.commit()?;
            return Ok(false);
        }
        if metadata.index > inner.last_index(&txn)? {
            let last = inner.last_index(&txn)?;
            inner.snapshot_chunks.delete_range(&mut txn, &own)?;
            txn.commit()?;
            return Err(StoreError::Invalid(format!(
                "snapshot at {} is past the last log index {last}",
                metadata.index
            )));
        }
        inner.switch_snapshot(&mut txn, metadata, location)?;
        // A snapshot covers applied, so committed, entries; the persisted
        // commit index may lag (it is written lazily), and raft refuses to
        // start with a snapshot past it.
        let mut hard_state: HardState = inner.meta_message(&txn, HARD_STATE)?.unwrap_or_default();
        if hard_state.commit < metadata.index {
            hard_state.commit = metadata.index;
            inner.meta.put(&mut txn, HARD_STATE, &encode(&hard_state)?)?;
        }
        txn.commit()?;
        drop(turn);
        // Compact in small transactions too: the snapshot is durable, so
        // the entries it covers may go in any order, and a crash midway
        // leaves some for the next snapshot to drop.
        let compact_to = compact_to.min(metadata.index);
        loop {
            let (_turn, mut txn) = inner.write_in_turn()?;
            let Some((first, _)) = inner.entries.first(&txn)? else {
                break;
            };
            if first > compact_to {
                break;
            }
            let upto = compact_to.min(first.saturating_add(COMPACT_BATCH - 1));
            inner.entries.delete_range(&mut txn, &(first..=upto))?;
            txn.commit()?;
        }
        Ok(true)
    }

    /// Hold the snapshot lock (a panic elsewhere leaves nothing half-done
    /// that the lock protects: every step is its own transaction).
    fn snapshot_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .snapshot_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    }

    /// Overwrite the entry at `index` with garbage, as a torn disk would.
    #[cfg(test)]
    pub(crate) fn corrupt_entry_for_test(&self, index: u64) {
        let mut txn = self.inner.env.write_txn().unwrap();
        self.inner.entries.put(&mut txn, &index, &[0xff, 0xff, 0xff]).unwrap();
        txn.commit().unwrap();
    }
}

impl Inner {
    fn meta_message<M: protobuf::Message>(&self, txn: &RoTxn, key: &str) -> Result<Option<M>, StoreError> {
        match self.meta.get(txn, key)? {
            None => Ok(None),
            Some(bytes) => M::parse_from_bytes(bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{key}: {e}"))),
        }
    }

    fn meta_u64(&self, txn: &RoTxn, key: &str) -> Result<u64, StoreError> {
        match self.meta.get(txn, key)? {
            None => Ok(0),
            Some(bytes) => {
                let bytes: [u8; 8] = bytes
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("{key} is not 8 bytes")))?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
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

    /// The stored snapshot's data: its chunks, or the pre-chunking value.
    fn snapshot_data(&self, txn: &RoTxn) -> Result<Vec<u8>, StoreError> {
        let mut data = Vec::new();
        self.for_each_snapshot_chunk(txn, &mut |chunk| {
            data.extend_from_slice(chunk);
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(data)
    }

    /// Hand the stored snapshot's data to `piece` chunk by chunk (the
    /// pre-chunking value as one), checking every chunk is there.
    fn for_each_snapshot_chunk(
        &self,
        txn: &RoTxn,
        piece: &mut dyn FnMut(&[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let Some(location) = self.meta.get(txn, SNAPSHOT_CHUNKS)? else {
            let data = self.meta.get(txn, SNAPSHOT_DATA)?;
            let data = data.ok_or_else(|| StoreError::Corrupt("snapshot metadata without data".into()))?;
            let _ = piece(data);
            return Ok(());
        };
        let location = ChunkedData::from_bytes(location)?;
        let (mut chunks, mut len) = (0u32, 0u64);
        for item in self.snapshot_chunks.range(txn, &chunks_of(location.save))? {
            let (key, chunk) = item?;
            if key != chunk_key(location.save, chunks) {
                return Err(StoreError::Corrupt(format!("snapshot chunk {chunks} is missing")));
            }
            chunks += 1;
            len += chunk.len() as u64;
            if piece(chunk).is_break() {
                return Ok(());
            }
        }
        if chunks != location.chunks || len != location.len {
            return Err(StoreError::Corrupt(format!(
                "the snapshot has {chunks} chunks and {len} bytes; its metadata says {} and {}",
                location.chunks, location.len
            )));
        }
        Ok(())
    }

    /// Point the snapshot metadata at `location` and drop every other
    /// save's chunks (the previous snapshot's, and any a crash left).
    fn switch_snapshot(
        &self,
        txn: &mut heed::RwTxn,
        metadata: &SnapshotMetadata,
        location: ChunkedData,
    ) -> Result<(), StoreError> {
        self.meta.put(txn, SNAPSHOT_META, &encode(metadata)?)?;
        self.meta.put(txn, SNAPSHOT_CHUNKS, &location.to_bytes())?;
        self.meta.delete(txn, SNAPSHOT_DATA)?;
        let own = chunks_of(location.save);
        self.snapshot_chunks.delete_range(txn, &(..own.start))?;
        self.snapshot_chunks.delete_range(txn, &(own.end..))?;
        let covered = metadata.index.min(self.first_index(txn)?.saturating_sub(1));
        self.drop_superseded_plugins(txn, covered)
    }

    /// Free the components nothing can need once the snapshot and the log
    /// cover everything after `covered`: those the history replaced at or
    /// before it. The first is kept (a joiner starts from it), and so is
    /// any that is active again later. History entries stay (for `plugin
    /// list`); components not in the history (fetched for a snapshot being
    /// installed) are left alone.
    fn drop_superseded_plugins(&self, txn: &mut heed::RwTxn, covered: u64) -> Result<(), StoreError> {
        let mut history = Vec::new();
        for item in self.plugin_history.iter(txn)? {
            let (index, sha) = item?;
            history.push((index, sha.to_vec()));
        }
        let needed: std::collections::HashSet<&[u8]> = history
            .iter()
            .enumerate()
            .filter(|(k, _)| *k == 0 || history.get(k + 1).is_none_or(|(next, _)| *next > covered))
            .map(|(_, (_, sha))| sha.as_slice())
            .collect();
        for (_, sha) in &history {
            if !needed.contains(sha.as_slice()) {
                self.plugins.delete(txn, sha)?;
            }
        }
        Ok(())
    }

    fn first_index(&self, txn: &RoTxn) -> Result<u64, StoreError> {
        match self.entries.first(txn)? {
            Some((index, _)) => Ok(index),
            None => Ok(self.snapshot_meta(txn)?.index + 1),
        }
    }

    fn last_index(&self, txn: &RoTxn) -> Result<u64, StoreError> {
        match self.entries.last(txn)? {
            Some((index, _)) => Ok(index),
            None => Ok(self.snapshot_meta(txn)?.index),
        }
    }

    fn entry(&self, txn: &RoTxn, index: u64) -> Result<Option<Entry>, StoreError> {
        match self.entries.get(txn, &index)? {
            None => Ok(None),
            Some(bytes) => decode_entry(index, bytes).map(Some),
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
            let hard_state: HardState = inner.meta_message(txn, HARD_STATE)?.unwrap_or_default();
            let conf_state: ConfState = inner.meta_message(txn, CONF_STATE)?.unwrap_or_default();
            Ok(RaftState::new(hard_state, conf_state))
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
        let max_size = max_size.into();
        let result = self.read(|inner, txn| {
            if low < inner.first_index(txn)? {
                return Ok(Err(StorageError::Compacted));
            }
            if high > inner.last_index(txn)? + 1 {
                return Ok(Err(StorageError::Unavailable));
            }
            let mut out = Vec::with_capacity((high - low) as usize);
            let mut size = 0u64;
            for item in inner.entries.range(txn, &(low..high))? {
                let (index, bytes) = item?;
                size += bytes.len() as u64;
                // raft-rs semantics: always return at least one entry.
                if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                    break;
                }
                out.push(decode_entry(index, bytes)?);
            }
            if out.first().is_some_and(|e: &Entry| e.index != low) {
                return Err(StoreError::Corrupt(format!("log has a hole at {low}")));
            }
            Ok(Ok(out))
        });
        match result {
            Ok(Ok(entries)) => Ok(entries),
            Ok(Err(e)) => Err(raft::Error::Store(e)),
            Err(e) => Err(to_raft(e)),
        }
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let result = self.read(|inner, txn| {
            let snapshot = inner.snapshot_meta(txn)?;
            if index == snapshot.index {
                return Ok(Ok(snapshot.term));
            }
            match inner.entry(txn, index)? {
                Some(entry) => Ok(Ok(entry.term)),
                None if index < inner.first_index(txn)? => Ok(Err(StorageError::Compacted)),
                None => Ok(Err(StorageError::Unavailable)),
            }
        });
        match result {
            Ok(Ok(term)) => Ok(term),
            Ok(Err(e)) => Err(raft::Error::Store(e)),
            Err(e) => Err(to_raft(e)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.read(|inner, txn| inner.first_index(txn)).map_err(to_raft)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.read(|inner, txn| inner.last_index(txn)).map_err(to_raft)
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
        let (_turn, mut txn) = inner.write_in_turn()?;
        if let Some(first) = batch.entries.first() {
            let snapshot = inner.snapshot_meta(&txn)?;
            if first.index <= snapshot.index {
                return Err(StoreError::Invalid(format!(
                    "entry {} is at or before the snapshot at {}",
                    first.index, snapshot.index
                )));
            }
            let last = inner.last_index(&txn)?;
            if first.index > last + 1 {
                return Err(StoreError::Invalid(format!(
                    "entry {} would leave a hole after the last index {last}",
                    first.index
                )));
            }
            // A new leader may replace an uncommitted suffix of our log.
            inner.entries.delete_range(&mut txn, &(first.index..))?;
            for entry in &batch.entries {
                inner.entries.put(&mut txn, &entry.index, &encode(entry)?)?;
            }
        }
        if let Some(hard_state) = &batch.hard_state {
            // The commit index never goes back: a snapshot saved meanwhile
            // may have raised it past a batch queued before.
            let stored: HardState = inner.meta_message(&txn, HARD_STATE)?.unwrap_or_default();
            let mut hard_state = hard_state.clone();
            hard_state.commit = hard_state.commit.max(stored.commit);
            inner.meta.put(&mut txn, HARD_STATE, &encode(&hard_state)?)?;
        }
        if let Some((conf_state, conf_index)) = &batch.conf_state {
            inner.meta.put(&mut txn, CONF_STATE, &encode(conf_state)?)?;
            inner.meta.put(&mut txn, CONF_INDEX, &conf_index.to_be_bytes())?;
        }
        if let Some(identity) = &batch.identity {
            inner.meta.put(&mut txn, IDENTITY, &encode_identity(identity)?)?;
        }
        if let Some(applied) = batch.applied_index {
            inner.meta.put(&mut txn, APPLIED_INDEX, &applied.to_be_bytes())?;
        }
        txn.commit()?;
        Ok(())
    }

    fn applied_index(&self) -> Result<u64, StoreError> {
        self.read(|inner, txn| inner.meta_u64(txn, APPLIED_INDEX))
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
        Ok(super::SpaceUsage {
            file_bytes: env.real_disk_size()?,
            live_bytes: env.non_free_pages_size()?,
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
        use std::io::Read as _;
        let _guard = self.snapshot_guard();
        let mut file = std::fs::File::open(path)?;
        let mut save = self.begin_snapshot_save()?;
        let mut chunk = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        loop {
            // Fill a whole chunk (reads may return less).
            let mut filled = 0;
            while filled < chunk.len() {
                match file.read(&mut chunk[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            self.put_snapshot_piece(&mut save, &chunk[..filled])?;
        }
        self.switch_installed(ChunkedData::of(&save), metadata, hard_state)
    }

    fn snapshot_piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError> {
        self.read(|inner, txn| {
            if inner.snapshot_meta(txn)?.index != index {
                return Ok(SnapshotPiece::Superseded);
            }
            let Some(location) = inner.meta.get(txn, SNAPSHOT_CHUNKS)? else {
                // Stored before chunking: one piece.
                return Ok(match (piece, inner.meta.get(txn, SNAPSHOT_DATA)?) {
                    (0, Some(data)) => SnapshotPiece::Data(data.to_vec()),
                    _ => SnapshotPiece::End,
                });
            };
            let location = ChunkedData::from_bytes(location)?;
            if piece >= location.chunks {
                return Ok(SnapshotPiece::End);
            }
            match inner.snapshot_chunks.get(txn, &chunk_key(location.save, piece))? {
                Some(data) => Ok(SnapshotPiece::Data(data.to_vec())),
                None => Err(StoreError::Corrupt(format!("snapshot chunk {piece} is missing"))),
            }
        })
    }
}

impl LmdbStore {
    /// Make an installed snapshot's chunks the stored snapshot, replacing
    /// the log, the conf state and the hard state, in one transaction.
    fn switch_installed(
        &self,
        location: ChunkedData,
        metadata: &SnapshotMetadata,
        hard_state: &HardState,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let (_turn, mut txn) = inner.write_in_turn()?;
        inner.entries.clear(&mut txn)?;
        inner.switch_snapshot(&mut txn, metadata, location)?;
        inner
            .meta
            .put(&mut txn, CONF_STATE, &encode(metadata.get_conf_state())?)?;
        inner.meta.put(&mut txn, CONF_INDEX, &metadata.index.to_be_bytes())?;
        inner.meta.put(&mut txn, HARD_STATE, &encode(hard_state)?)?;
        txn.commit()?;
        Ok(())
    }

    /// The stored snapshot's size, without reading it.
    fn stored_len(&self, txn: &RoTxn) -> Result<u64, StoreError> {
        let inner = &self.inner;
        match inner.meta.get(txn, SNAPSHOT_CHUNKS)? {
            Some(location) => Ok(ChunkedData::from_bytes(location)?.len),
            None => Ok(inner.meta.get(txn, SNAPSHOT_DATA)?.map_or(0, |data| data.len() as u64)),
        }
    }
}
