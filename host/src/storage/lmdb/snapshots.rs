//! The stored snapshot in LMDB: its data in chunks of a numbered save,
//! written a transaction per chunk and switched to in one small
//! transaction (a save's chunks, the switch, compaction behind it), read
//! back a chunk at a time for peers, and installed from a leader's.

use std::path::Path;

use heed::RoTxn;
use raft::prelude::{HardState, SnapshotMetadata};

use super::{
    CONF_INDEX, CONF_STATE, HARD_STATE, Inner, LOG_COMPACTED, LmdbStore, SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNKS,
    SNAPSHOT_DATA, SNAPSHOT_META, encode,
};
use crate::storage::{LogStore as _, SnapshotPiece, SnapshotSave, StoreError};

/// Where the stored snapshot's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkedData {
    save: u64,
    chunks: u32,
    len: u64,
}

impl ChunkedData {
    /// Where a save's chunks are.
    pub(super) fn of(save: &SnapshotSave) -> ChunkedData {
        ChunkedData {
            save: save.id,
            chunks: save.pieces,
            len: save.len,
        }
    }

    pub(super) fn to_bytes(self) -> [u8; 20] {
        let mut out = [0u8; 20];
        out[..8].copy_from_slice(&self.save.to_be_bytes());
        out[8..12].copy_from_slice(&self.chunks.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Result<ChunkedData, StoreError> {
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

pub(super) fn chunk_key(save: u64, chunk: u32) -> u128 {
    (u128::from(save) << 32) | u128::from(chunk)
}

/// Every chunk key of save `save`.
pub(super) fn chunks_of(save: u64) -> std::ops::Range<u128> {
    chunk_key(save, 0)..chunk_key(save + 1, 0)
}

impl LmdbStore {
    /// Write `data` as the chunks of a new save, one transaction each.
    pub(super) fn write_chunks(&self, data: &[u8]) -> Result<ChunkedData, StoreError> {
        let mut save = self.begin_snapshot_save()?;
        self.put_snapshot_piece(&mut save, data)?;
        Ok(ChunkedData::of(&save))
    }

    /// Switch to a save whose chunks are all written (holding the snapshot
    /// lock), then compact the log behind it. `Ok(false)`: a newer
    /// snapshot was stored or installed meanwhile (which may have dropped
    /// this save's chunks), so this one is dropped.
    pub(super) fn commit_save(
        &self,
        location: ChunkedData,
        metadata: &SnapshotMetadata,
        compact_to: u64,
    ) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let _log = inner.lock_log();
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
        if metadata.index > inner.last_index() {
            let last = inner.last_index();
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
        let compact_to = compact_to.min(metadata.index);
        inner.meta.put(&mut txn, LOG_COMPACTED, &compact_to.to_be_bytes())?;
        // (LMDB's copy of the hard state; opening takes the higher commit
        // of it and the log's.)
        let mut hard_state = inner.wal.hard_state();
        if hard_state.commit < metadata.index {
            hard_state.commit = metadata.index;
            inner.meta.put(&mut txn, HARD_STATE, &encode(&hard_state)?)?;
        }
        txn.commit()?;
        drop(turn);
        inner.set_snapshot_at(metadata.index, metadata.term);
        inner.wal.raise_commit(metadata.index);
        // The snapshot is durable, so the entries it covers may go; a
        // crash before their segments are deleted leaves them for the next
        // snapshot to drop.
        inner.wal.compact(compact_to)?;
        Ok(true)
    }

    /// Hold the snapshot lock (a panic elsewhere leaves nothing half-done
    /// that the lock protects: every step is its own transaction).
    pub(super) fn snapshot_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .snapshot_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Make an installed snapshot's chunks the stored snapshot, replacing
    /// the log, the conf state and the hard state, in one transaction.
    pub(super) fn switch_installed(
        &self,
        location: ChunkedData,
        metadata: &SnapshotMetadata,
        hard_state: &HardState,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _log = inner.lock_log();
        let (turn, mut txn) = inner.write_in_turn()?;
        inner.switch_snapshot_replacing_log(&mut txn, metadata, location)?;
        inner
            .meta
            .put(&mut txn, CONF_STATE, &encode(metadata.get_conf_state())?)?;
        inner.meta.put(&mut txn, CONF_INDEX, &metadata.index.to_be_bytes())?;
        inner.meta.put(&mut txn, HARD_STATE, &encode(hard_state)?)?;
        inner.meta.put(&mut txn, LOG_COMPACTED, &metadata.index.to_be_bytes())?;
        txn.commit()?;
        drop(turn);
        // Then the log: emptied in memory at once (what opening would make
        // of it, should the reset below not land), then on disk.
        inner.set_snapshot_at(metadata.index, metadata.term);
        inner.wal.forget_entries(metadata.index);
        inner.wal.set_hard_state(hard_state.clone());
        inner.wal.reset(metadata.index, hard_state)
    }

    /// The stored snapshot's size, without reading it.
    pub(super) fn stored_len(&self, txn: &RoTxn) -> Result<u64, StoreError> {
        let inner = &self.inner;
        match inner.meta.get(txn, SNAPSHOT_CHUNKS)? {
            Some(location) => Ok(ChunkedData::from_bytes(location)?.len),
            None => Ok(inner.meta.get(txn, SNAPSHOT_DATA)?.map_or(0, |data| data.len() as u64)),
        }
    }

    /// Install the snapshot a peer sent, from the file it was received to,
    /// a chunk at a time.
    pub(super) fn install_file(
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

    /// Piece `piece` of the stored snapshot at `index`, for a peer.
    pub(super) fn piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError> {
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

impl Inner {
    /// The stored snapshot's data: its chunks, or the pre-chunking value.
    pub(super) fn snapshot_data(&self, txn: &RoTxn) -> Result<Vec<u8>, StoreError> {
        let mut data = Vec::new();
        self.for_each_snapshot_chunk(txn, &mut |chunk| {
            data.extend_from_slice(chunk);
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(data)
    }

    /// Hand the stored snapshot's data to `piece` chunk by chunk (the
    /// pre-chunking value as one), checking every chunk is there.
    pub(super) fn for_each_snapshot_chunk(
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
    pub(super) fn switch_snapshot(
        &self,
        txn: &mut heed::RwTxn,
        metadata: &SnapshotMetadata,
        location: ChunkedData,
    ) -> Result<(), StoreError> {
        let covered = metadata.index.min(self.first_index().saturating_sub(1));
        self.point_at_snapshot(txn, metadata, location, covered)
    }

    /// As [`Inner::switch_snapshot`], for a snapshot that replaces the
    /// whole log (an install).
    fn switch_snapshot_replacing_log(
        &self,
        txn: &mut heed::RwTxn,
        metadata: &SnapshotMetadata,
        location: ChunkedData,
    ) -> Result<(), StoreError> {
        self.point_at_snapshot(txn, metadata, location, metadata.index)
    }

    fn point_at_snapshot(
        &self,
        txn: &mut heed::RwTxn,
        metadata: &SnapshotMetadata,
        location: ChunkedData,
        covered: u64,
    ) -> Result<(), StoreError> {
        self.meta.put(txn, SNAPSHOT_META, &encode(metadata)?)?;
        self.meta.put(txn, SNAPSHOT_CHUNKS, &location.to_bytes())?;
        self.meta.delete(txn, SNAPSHOT_DATA)?;
        let own = chunks_of(location.save);
        self.snapshot_chunks.delete_range(txn, &(..own.start))?;
        self.snapshot_chunks.delete_range(txn, &(own.end..))?;
        self.drop_superseded_plugins(txn, covered)
    }

    /// Free the components nothing can need once the snapshot and the log
    /// cover everything after `covered`: those the history replaced at or
    /// before it. The first is kept (a joiner starts from it), and so is
    /// any that is active again later. History entries stay (for `plugin
    /// list`); components not in the history (fetched for a snapshot being
    /// installed) are left alone.
    pub(super) fn drop_superseded_plugins(&self, txn: &mut heed::RwTxn, covered: u64) -> Result<(), StoreError> {
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
}
