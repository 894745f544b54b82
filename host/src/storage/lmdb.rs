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

mod options;
mod snapshots;
mod turns;
pub use options::LmdbOptions;
use snapshots::{ChunkedData, chunk_key, chunks_of};
use turns::{WriteTurn, WriteTurns};

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
    /// The first index, as the log and the stored snapshot make it. raft
    /// asks for it on every term lookup (each append sent, each ack), so
    /// it is kept here rather than read in a transaction each time; every
    /// write that can move it recomputes it while it still holds its write
    /// turn, so writers store it in the order they commit.
    first_index: AtomicU64,
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
        LmdbStore {
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
                first_index: AtomicU64::new(0),
            }),
        }
        .with_first_index_known()
    }

    fn with_first_index_known(self) -> Result<LmdbStore, StoreError> {
        self.inner.refresh_first_index()?;
        Ok(self)
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
        inner.refresh_first_index().unwrap();
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

    /// Recompute [`Inner::first_index`] from what is committed; call with
    /// the write turn held, after the commit.
    fn refresh_first_index(&self) -> Result<(), StoreError> {
        let txn = self.env.read_txn()?;
        let first = self.first_index(&txn)?;
        self.first_index.store(first, Ordering::Release);
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
        Ok(self.inner.first_index.load(Ordering::Acquire))
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
        let mut moves_first = false;
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
            moves_first = first.index <= inner.first_index.load(Ordering::Acquire);
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
        if moves_first {
            inner.refresh_first_index()?;
        }
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
        self.install_file(path, metadata, hard_state)
    }

    fn snapshot_piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError> {
        self.piece(index, piece)
    }
}
