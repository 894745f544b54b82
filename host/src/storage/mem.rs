//! The in-memory [`LogStore`]: the LMDB store's twin for tests. It follows
//! the same rules (and passes the same conformance suite) but forgets
//! everything when dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::{LogStore, NodeIdentity, SnapshotPiece, SnapshotSave, StoreError, WriteBatch, check_contiguous};

#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<u64, Entry>,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot_meta: SnapshotMetadata,
    snapshot_data: Vec<u8>,
    /// Snapshots being saved piece by piece, by save number.
    saves: BTreeMap<u64, Vec<u8>>,
    next_save: u64,
    applied_index: u64,
    conf_index: u64,
    traps: BTreeMap<u64, String>,
    identity: Option<NodeIdentity>,
    plugins: BTreeMap<[u8; 32], Vec<u8>>,
    plugin_history: BTreeMap<u64, [u8; 32]>,
}

impl Inner {
    fn first_index(&self) -> u64 {
        self.entries
            .keys()
            .next()
            .copied()
            .unwrap_or(self.snapshot_meta.index + 1)
    }

    fn last_index(&self) -> u64 {
        self.entries
            .keys()
            .next_back()
            .copied()
            .unwrap_or(self.snapshot_meta.index)
    }
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn rl(&self) -> RwLockReadGuard<'_, Inner> {
        // A poisoned lock means a test already panicked; keep going with the data.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wl(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let inner = self.rl();
        Ok(RaftState::new(inner.hard_state.clone(), inner.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let inner = self.rl();
        if low < inner.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > inner.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for entry in inner.entries.range(low..high).map(|(_, e)| e) {
            size += protobuf::Message::compute_size(entry) as u64;
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let inner = self.rl();
        if index == inner.snapshot_meta.index {
            return Ok(inner.snapshot_meta.term);
        }
        match inner.entries.get(&index) {
            Some(entry) => Ok(entry.term),
            None if index < inner.first_index() => Err(raft::Error::Store(StorageError::Compacted)),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match self.stored_snapshot() {
            Ok(Some(snapshot)) if super::snapshot_serves(&snapshot, request_index, to) => Ok(snapshot),
            _ => Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
        }
    }
}

impl LogStore for MemStore {
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        check_contiguous(&batch.entries)?;
        let mut inner = self.wl();
        if let Some(first) = batch.entries.first() {
            if first.index <= inner.snapshot_meta.index {
                return Err(StoreError::Invalid(format!(
                    "entry {} is at or before the snapshot at {}",
                    first.index, inner.snapshot_meta.index
                )));
            }
            let last = inner.last_index();
            if first.index > last + 1 {
                return Err(StoreError::Invalid(format!(
                    "entry {} would leave a hole after the last index {last}",
                    first.index
                )));
            }
            inner.entries.split_off(&first.index);
            for entry in batch.entries {
                inner.entries.insert(entry.index, entry);
            }
        }
        if let Some(mut hard_state) = batch.hard_state {
            // The commit index never goes back (see lmdb.rs).
            hard_state.commit = hard_state.commit.max(inner.hard_state.commit);
            inner.hard_state = hard_state;
        }
        if let Some((conf_state, conf_index)) = batch.conf_state {
            inner.conf_state = conf_state;
            inner.conf_index = conf_index;
        }
        if let Some(identity) = batch.identity {
            inner.identity = Some(identity);
        }
        if let Some(applied) = batch.applied_index {
            inner.applied_index = applied;
        }
        Ok(())
    }

    fn applied_index(&self) -> Result<u64, StoreError> {
        Ok(self.rl().applied_index)
    }

    fn conf_index(&self) -> Result<u64, StoreError> {
        Ok(self.rl().conf_index)
    }

    fn record_trap(&self, index: u64, message: &str) -> Result<(), StoreError> {
        self.wl().traps.insert(index, message.to_string());
        Ok(())
    }

    fn traps(&self, low: u64, high: u64) -> Result<Vec<(u64, String)>, StoreError> {
        Ok(self.rl().traps.range(low..high).map(|(i, m)| (*i, m.clone())).collect())
    }

    fn identity(&self) -> Result<Option<NodeIdentity>, StoreError> {
        Ok(self.rl().identity.clone())
    }

    fn set_identity(&self, identity: &NodeIdentity) -> Result<(), StoreError> {
        self.wl().identity = Some(identity.clone());
        Ok(())
    }

    fn put_plugin_blob(&self, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError> {
        self.wl().plugins.entry(*sha256).or_insert_with(|| wasm.to_vec());
        Ok(())
    }

    fn plugin_blob(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.rl().plugins.get(sha256).cloned())
    }

    fn activate_plugin(&self, index: u64, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.wl();
        inner.plugins.entry(*sha256).or_insert_with(|| wasm.to_vec());
        inner.plugin_history.insert(index, *sha256);
        Ok(())
    }

    fn plugin_history(&self) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        Ok(self.rl().plugin_history.iter().map(|(i, s)| (*i, *s)).collect())
    }

    fn snapshot_metadata(&self) -> Result<SnapshotMetadata, StoreError> {
        Ok(self.rl().snapshot_meta.clone())
    }

    fn stored_snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        let inner = self.rl();
        if inner.snapshot_meta.index == 0 {
            return Ok(None);
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(inner.snapshot_meta.clone());
        snapshot.data = inner.snapshot_data.clone().into();
        Ok(Some(snapshot))
    }

    fn save_snapshot(&self, snapshot: &Snapshot, compact_to: u64) -> Result<(), StoreError> {
        let mut inner = self.wl();
        let metadata = snapshot.get_metadata();
        if metadata.index <= inner.snapshot_meta.index {
            return Ok(());
        }
        if metadata.index > inner.last_index() {
            return Err(StoreError::Invalid(format!(
                "snapshot at {} is past the last log index {}",
                metadata.index,
                inner.last_index()
            )));
        }
        inner.snapshot_meta = metadata.clone();
        inner.snapshot_data = snapshot.data.to_vec();
        inner.saves.clear();
        // See LmdbStore: the snapshot's entries are committed.
        inner.hard_state.commit = inner.hard_state.commit.max(metadata.index);
        let keep = inner.entries.split_off(&(compact_to.min(metadata.index) + 1));
        inner.entries = keep;
        Ok(())
    }

    fn begin_snapshot_save(&self) -> Result<SnapshotSave, StoreError> {
        let mut inner = self.wl();
        inner.next_save += 1;
        let id = inner.next_save;
        inner.saves.insert(id, Vec::new());
        Ok(SnapshotSave { id, pieces: 0, len: 0 })
    }

    fn put_snapshot_piece(&self, save: &mut SnapshotSave, piece: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.wl();
        // Like LMDB's, a save's pieces vanish when another snapshot lands.
        if let Some(data) = inner.saves.get_mut(&save.id) {
            data.extend_from_slice(piece);
        }
        save.pieces += 1;
        save.len += piece.len() as u64;
        Ok(())
    }

    fn abort_snapshot_save(&self, save: &SnapshotSave) -> Result<(), StoreError> {
        self.wl().saves.remove(&save.id);
        Ok(())
    }

    fn finish_snapshot_save(
        &self,
        save: SnapshotSave,
        metadata: &SnapshotMetadata,
        compact_to: u64,
    ) -> Result<bool, StoreError> {
        let data = self.wl().saves.remove(&save.id);
        let Some(data) = data.filter(|data| data.len() as u64 == save.len) else {
            return Ok(false);
        };
        if metadata.index <= self.rl().snapshot_meta.index {
            return Ok(false);
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(metadata.clone());
        snapshot.data = data.into();
        self.save_snapshot(&snapshot, compact_to)?;
        Ok(true)
    }

    fn read_snapshot(
        &self,
        piece: &mut dyn FnMut(&SnapshotMetadata, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<SnapshotMetadata>, StoreError> {
        let inner = self.rl();
        if inner.snapshot_meta.index == 0 {
            return Ok(None);
        }
        // Odd-sized pieces, so callers never rely on the boundaries.
        for chunk in inner.snapshot_data.chunks(1000) {
            if piece(&inner.snapshot_meta, chunk).is_break() {
                break;
            }
        }
        Ok(Some(inner.snapshot_meta.clone()))
    }

    fn snapshot_piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError> {
        let inner = self.rl();
        if inner.snapshot_meta.index != index {
            return Ok(SnapshotPiece::Superseded);
        }
        Ok(match inner.snapshot_data.chunks(1000).nth(piece as usize) {
            Some(data) => SnapshotPiece::Data(data.to_vec()),
            None => SnapshotPiece::End,
        })
    }

    fn install_snapshot_file(
        &self,
        path: &std::path::Path,
        metadata: &SnapshotMetadata,
        hard_state: &HardState,
    ) -> Result<(), StoreError> {
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(metadata.clone());
        snapshot.data = std::fs::read(path)?.into();
        self.install_snapshot(&snapshot, hard_state)
    }

    fn install_snapshot(&self, snapshot: &Snapshot, hard_state: &HardState) -> Result<(), StoreError> {
        let mut inner = self.wl();
        let metadata = snapshot.get_metadata();
        inner.saves.clear();
        inner.entries.clear();
        inner.snapshot_meta = metadata.clone();
        inner.snapshot_data = snapshot.data.to_vec();
        inner.conf_state = metadata.get_conf_state().clone();
        inner.conf_index = metadata.index;
        inner.hard_state = hard_state.clone();
        Ok(())
    }
}
