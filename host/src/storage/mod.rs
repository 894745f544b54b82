//! Durable raft state: the log, hard state, conf state, applied index and the
//! record of entries whose apply trapped.
//!
//! [`LogStore`] extends raft-rs's read-only [`Storage`] with the write the
//! node loop makes per `Ready`: a [`WriteBatch`], committed atomically and
//! durably (the real store: one write-ahead log record, fdatasynced) before
//! anything that depends on it is sent or acknowledged. The [`persister::Persister`] thread makes
//! those writes, merging the batches that queue up during an fsync into one;
//! [`staged::Staged`] lets raft read the entries still on their way. [`lmdb::LmdbStore`] is the real store;
//! [`mem::MemStore`] is the in-memory twin for tests. Both pass the same
//! conformance suite (`tests.rs`).

pub mod data_dir;
pub mod lmdb;
/// The in-memory store, for unit tests (and the conformance suite).
#[cfg(test)]
pub mod mem;
pub mod persister;
pub mod staged;
#[cfg(test)]
mod tests;

use raft::Storage;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};

/// Why a storage operation failed. Storage errors are fatal to the node: the
/// node loop stops rather than run on with state it could not persist.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("LMDB: {}", describe_lmdb(.0))]
    Lmdb(#[from] heed::Error),
    #[error("corrupt data in the store: {0}")]
    Corrupt(String),
    #[error("cannot write: {0}")]
    Invalid(String),
    #[error("I/O: {}", describe_io(.0))]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether a write failed for lack of space: a full disk or disk quota
    /// (ENOSPC, EDQUOT), a full LMDB map, or an I/O error (how LMDB reports
    /// a failed write) while the filesystem has less than `min_free` bytes
    /// left. An LMDB transaction that failed so kept nothing, and the
    /// environment is still usable (unlike after MDB_PANIC).
    pub fn is_out_of_space(&self, fs_free_bytes: Option<u64>, min_free: u64) -> bool {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        const EIO: i32 = 5;
        let code = match self {
            StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)) => return true,
            StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::Other(code))) => Some(*code),
            StoreError::Lmdb(heed::Error::Io(io)) | StoreError::Io(io) => io.raw_os_error(),
            _ => None,
        };
        match code {
            Some(ENOSPC | EDQUOT) => true,
            Some(EIO) => fs_free_bytes.is_some_and(|free| free < min_free),
            _ => false,
        }
    }
}

/// LMDB's errors, with what a full disk or a full map means for the
/// operator (a bare "Input/output error" does not say the disk is full).
fn describe_lmdb(error: &heed::Error) -> String {
    match error {
        heed::Error::Mdb(heed::MdbError::MapFull) => {
            "the LMDB map is full: raise lmdb_map_size_bytes (--lmdb-map-size-bytes) and restart".to_string()
        }
        heed::Error::Mdb(heed::MdbError::Other(code)) => describe_io(&std::io::Error::from_raw_os_error(*code)),
        heed::Error::Io(io) => describe_io(io),
        other => other.to_string(),
    }
}

fn describe_io(error: &std::io::Error) -> String {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    const EIO: i32 = 5;
    match error.raw_os_error() {
        Some(ENOSPC | EDQUOT) => format!("{error}: the data dir's disk (or quota) is full; free space and restart"),
        Some(EIO) => format!("{error}: a write or fsync failed; when the data dir's disk is full, LMDB reports this"),
        _ => error.to_string(),
    }
}

/// Everything one `Ready` persists, written in one atomic, durable step.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// New log entries. The first may overwrite (truncate) the log's tail:
    /// entries at and after its index are replaced, as raft requires when a
    /// new leader overrides an uncommitted suffix.
    pub entries: Vec<Entry>,
    /// Term, vote and commit index. The stored commit index never goes
    /// back: a lower one (a batch queued before a snapshot raised it) keeps
    /// the stored value.
    pub hard_state: Option<HardState>,
    /// The configuration after applying the conf change entry at the given
    /// index. The index is kept so a restart does not apply it twice.
    pub conf_state: Option<(ConfState, u64)>,
    /// The node's identity and member addresses, when they changed.
    pub identity: Option<NodeIdentity>,
    /// The highest index the state machine has applied (informational: the
    /// state machine lives in memory and is rebuilt on restart).
    pub applied_index: Option<u64>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.identity.is_none()
            && self.applied_index.is_none()
    }

    /// Fold a later batch into this one, as if both were written in order:
    /// its entries replace ours from their first index on, and its state
    /// fields win.
    pub fn merge(&mut self, later: WriteBatch) {
        if let Some(first) = later.entries.first() {
            let keep = self.entries.partition_point(|e| e.index < first.index);
            self.entries.truncate(keep);
            self.entries.extend(later.entries);
        }
        if later.hard_state.is_some() {
            self.hard_state = later.hard_state;
        }
        if later.conf_state.is_some() {
            self.conf_state = later.conf_state;
        }
        if later.identity.is_some() {
            self.identity = later.identity;
        }
        if later.applied_index.is_some() {
            self.applied_index = later.applied_index;
        }
    }
}

/// A new cluster's id. Initial members bootstrap independently, so with
/// several they derive it from the member list they were all given (as
/// etcd derives its cluster id from `--initial-cluster`); a one-node
/// cluster mixes in the time and the process, so no two are alike.
pub(crate) fn new_cluster_id(members: &[(u64, String)]) -> u64 {
    use sha2::Digest as _;
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    hash.update(b"raftify-cluster\0");
    let mut sorted = members.to_vec();
    sorted.sort();
    for (id, addr) in &sorted {
        hash.update(format!("{id}={addr}\0").as_bytes());
    }
    if members.len() == 1 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hash.update(now.to_le_bytes());
        hash.update(std::process::id().to_le_bytes());
    }
    let digest = hash.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    // 0 means "no cluster id" (old data dirs).
    u64::from_le_bytes(id).max(1)
}

/// Free and total bytes of the filesystem holding `dir`.
pub fn filesystem(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let stats = fs4::statvfs(dir)?;
    Ok((stats.available_space(), stats.total_space()))
}

/// One reading of a node's space (`space.rs` interprets it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceUsage {
    /// The LMDB data file's size on disk.
    pub file_bytes: u64,
    /// Pages in use by the databases (what the quota counts).
    pub live_bytes: u64,
    /// Free and total bytes of the data dir's filesystem (0 when unknown).
    pub fs_free_bytes: u64,
    pub fs_total_bytes: u64,
}

/// What a node persists about itself besides raft state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeIdentity {
    pub id: u64,
    /// The cluster's members and their addresses, as last known.
    pub members: Vec<(u64, String)>,
    /// The highest node id the cluster ever used: removed ids are never
    /// handed out again.
    #[serde(default)]
    pub max_id: u64,
    /// The cluster this node belongs to, made when the cluster was
    /// bootstrapped; every peer RPC carries it. 0 in data dirs made before
    /// cluster ids existed (then peers' ids are not checked).
    #[serde(default)]
    pub cluster_id: u64,
}

/// A plugin component as stored: its SHA-256 and its bytes.
pub type StoredPlugin = ([u8; 32], Vec<u8>);

/// Raft's [`Storage`] plus the writes a node makes.
pub trait LogStore: Storage + Clone + Send + Sync + 'static {
    /// What the store holds and what its filesystem has left (zeros where
    /// the store cannot tell).
    fn space(&self) -> Result<SpaceUsage, StoreError> {
        Ok(SpaceUsage::default())
    }

    /// Persist `batch` atomically and durably.
    fn write(&self, batch: WriteBatch) -> Result<(), StoreError>;

    /// The applied index last persisted (0 if none).
    fn applied_index(&self) -> Result<u64, StoreError>;

    /// The index of the last conf change reflected in the stored conf state.
    fn conf_index(&self) -> Result<u64, StoreError>;

    /// Record that applying the entry at `index` trapped, with the message
    /// the proposer got, so replay skips it instead of trapping again.
    fn record_trap(&self, index: u64, message: &str) -> Result<(), StoreError>;

    /// The entries whose apply trapped, in index order, within `[low, high)`.
    fn traps(&self, low: u64, high: u64) -> Result<Vec<(u64, String)>, StoreError>;

    /// The node's identity, once bootstrapped.
    fn identity(&self) -> Result<Option<NodeIdentity>, StoreError>;

    /// Record the node's identity (first start, or membership change).
    fn set_identity(&self, identity: &NodeIdentity) -> Result<(), StoreError>;

    /// Store a plugin component under its SHA-256 (once; storing it again
    /// is a no-op).
    fn put_plugin_blob(&self, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError>;

    /// A stored plugin component, checked against its hash.
    fn plugin_blob(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Store `wasm` (if new) and record that it is the active plugin from
    /// log index `index` on, in one step. Index 0 is the cluster's first
    /// plugin; recording the same switch again is a no-op.
    fn activate_plugin(&self, index: u64, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError>;

    /// Every plugin switch as (index, SHA-256), in index order.
    fn plugin_history(&self) -> Result<Vec<(u64, [u8; 32])>, StoreError>;

    /// The plugin active at the end of the log, with its bytes.
    fn active_plugin(&self) -> Result<Option<StoredPlugin>, StoreError> {
        let Some((_, sha)) = self.plugin_history()?.pop() else {
            return Ok(None);
        };
        let wasm = self
            .plugin_blob(&sha)?
            .ok_or_else(|| StoreError::Corrupt(format!("plugin {} is active but not stored", hex::encode(sha))))?;
        Ok(Some((sha, wasm)))
    }

    /// The plugin the log starts with (the first recorded), with its bytes.
    fn first_plugin(&self) -> Result<Option<StoredPlugin>, StoreError> {
        let Some((_, sha)) = self.plugin_history()?.first().copied() else {
            return Ok(None);
        };
        let wasm = self
            .plugin_blob(&sha)?
            .ok_or_else(|| StoreError::Corrupt(format!("plugin {} is recorded but not stored", hex::encode(sha))))?;
        Ok(Some((sha, wasm)))
    }

    /// The latest stored snapshot's metadata (index 0: none), without its data.
    fn snapshot_metadata(&self) -> Result<SnapshotMetadata, StoreError>;

    /// The latest stored snapshot (metadata and data), if any.
    fn stored_snapshot(&self) -> Result<Option<Snapshot>, StoreError>;

    /// Store a snapshot this node took and drop the log entries up to
    /// `compact_to` (at most the snapshot's index), atomically. A snapshot
    /// older than the stored one is ignored. (The apply worker stores its
    /// snapshots a piece at a time; tests store whole ones.)
    #[cfg(test)]
    fn save_snapshot(&self, snapshot: &Snapshot, compact_to: u64) -> Result<(), StoreError>;

    /// Install a snapshot received from the leader: it replaces the whole
    /// log, the conf state and the hard state, atomically.
    fn install_snapshot(&self, snapshot: &Snapshot, hard_state: &HardState) -> Result<(), StoreError>;

    /// Begin storing a snapshot this node takes a piece at a time, so no
    /// one holds its whole data: [`LogStore::put_snapshot_piece`] for each
    /// piece in order, then [`LogStore::finish_snapshot_save`]. Pieces of a
    /// save never finished are dropped by a later save.
    fn begin_snapshot_save(&self) -> Result<SnapshotSave, StoreError>;

    /// Store the next piece of a save (its own transaction).
    fn put_snapshot_piece(&self, save: &mut SnapshotSave, piece: &[u8]) -> Result<(), StoreError>;

    /// Drop the pieces a save stored so far (it failed, or was given up):
    /// they would hold their space until the next save finished, and on a
    /// full disk that space is what the log needs to go on.
    fn abort_snapshot_save(&self, save: &SnapshotSave) -> Result<(), StoreError>;

    /// Make a save's pieces the stored snapshot, with `metadata`, and drop
    /// the log up to `compact_to` (as [`LogStore::save_snapshot`]).
    /// `Ok(false)` if it was superseded: a newer snapshot was stored (or
    /// installed) meanwhile, and this one is dropped.
    fn finish_snapshot_save(
        &self,
        save: SnapshotSave,
        metadata: &SnapshotMetadata,
        compact_to: u64,
    ) -> Result<bool, StoreError>;

    /// Hand the stored snapshot's data to `piece` (with its metadata), a
    /// piece at a time and all from one consistent view, until it is done
    /// or `piece` breaks; returns the snapshot's metadata (`None`: no
    /// snapshot stored).
    fn read_snapshot(
        &self,
        piece: &mut dyn FnMut(&SnapshotMetadata, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<SnapshotMetadata>, StoreError>;

    /// The stored snapshot's index and the size of its data (`None`: no
    /// snapshot stored), without handing the data over where the store
    /// knows it.
    fn stored_snapshot_len(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let mut len = 0u64;
        let metadata = self.read_snapshot(&mut |_, piece| {
            len += piece.len() as u64;
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(metadata.map(|metadata| (metadata.index, len)))
    }

    /// Piece number `piece` of the stored snapshot, if it is still the one
    /// at `index` (each piece is read in a transaction of its own).
    fn snapshot_piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError>;

    /// Install a snapshot received from the leader whose data is in the
    /// file at `path` (as [`LogStore::install_snapshot`], reading the file
    /// a piece at a time).
    fn install_snapshot_file(
        &self,
        path: &std::path::Path,
        metadata: &SnapshotMetadata,
        hard_state: &HardState,
    ) -> Result<(), StoreError>;
}

/// One piece of a stored snapshot, for a transfer to a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum SnapshotPiece {
    Data(Vec<u8>),
    /// Past the last piece.
    End,
    /// The stored snapshot is no longer the one asked for.
    Superseded,
}

/// Read access to the stored snapshot's pieces, for the transport (which is
/// not generic over the store).
pub trait SnapshotPieces: Send + Sync {
    fn piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError>;
}

impl<S: LogStore> SnapshotPieces for S {
    fn piece(&self, index: u64, piece: u32) -> Result<SnapshotPiece, StoreError> {
        self.snapshot_piece(index, piece)
    }
}

/// A snapshot being stored piece by piece ([`LogStore::begin_snapshot_save`]).
#[derive(Debug, Clone)]
pub struct SnapshotSave {
    /// The save's number: its pieces' key prefix.
    id: u64,
    pieces: u32,
    len: u64,
}

#[cfg(test)]
impl SnapshotSave {
    /// Bytes stored so far.
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// Read access to the stored snapshot, for backups (the gRPC services are
/// not generic over the store).
pub trait SnapshotSource: Send + Sync {
    /// See [`LogStore::read_snapshot`].
    fn read(
        &self,
        piece: &mut dyn FnMut(&SnapshotMetadata, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<SnapshotMetadata>, StoreError>;
    /// See [`LogStore::stored_snapshot_len`].
    fn index_and_len(&self) -> Result<Option<(u64, u64)>, StoreError>;
}

impl<S: LogStore> SnapshotSource for S {
    fn read(
        &self,
        piece: &mut dyn FnMut(&SnapshotMetadata, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<SnapshotMetadata>, StoreError> {
        self.read_snapshot(piece)
    }

    fn index_and_len(&self) -> Result<Option<(u64, u64)>, StoreError> {
        self.stored_snapshot_len()
    }
}

/// Read access to the stored plugins, for the gRPC services (which are not
/// generic over the store).
pub trait PluginRegistry: Send + Sync {
    fn blob(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_blob(&self, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError>;
    fn history(&self) -> Result<Vec<(u64, [u8; 32])>, StoreError>;
}

impl<S: LogStore> PluginRegistry for S {
    fn blob(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.plugin_blob(sha256)
    }

    fn put_blob(&self, sha256: &[u8; 32], wasm: &[u8]) -> Result<(), StoreError> {
        self.put_plugin_blob(sha256, wasm)
    }

    fn history(&self) -> Result<Vec<(u64, [u8; 32])>, StoreError> {
        self.plugin_history()
    }
}

/// Whether a stored snapshot can be sent to `to` for a request at
/// `request_index`: it must be recent enough and its configuration must
/// include `to` (raft refuses a snapshot that does not name it).
fn snapshot_serves(snapshot: &Snapshot, request_index: u64, to: u64) -> bool {
    let metadata = snapshot.get_metadata();
    let conf = metadata.get_conf_state();
    metadata.index >= request_index && (conf.voters.contains(&to) || conf.learners.contains(&to))
}

/// Checks a batch's entries are contiguous, so a bad caller cannot punch
/// holes into the log.
fn check_contiguous(entries: &[Entry]) -> Result<(), StoreError> {
    for pair in entries.windows(2) {
        if pair[1].index != pair[0].index + 1 {
            return Err(StoreError::Invalid(format!(
                "entries not contiguous: {} follows {}",
                pair[1].index, pair[0].index
            )));
        }
    }
    Ok(())
}

/// Checks a conf state is a plausible initial configuration.
pub fn initial_conf_state(voters: Vec<u64>) -> ConfState {
    ConfState {
        voters,
        ..Default::default()
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn a_full_disk_or_map_is_named() {
        let full = StoreError::Io(std::io::Error::from_raw_os_error(28));
        assert!(full.to_string().contains("disk (or quota) is full"), "{full}");
        let map = StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull));
        assert!(map.to_string().contains("raise lmdb_map_size_bytes"), "{map}");
        let eio = StoreError::Lmdb(heed::Error::Io(std::io::Error::from_raw_os_error(5)));
        assert!(eio.to_string().contains("disk is full"), "{eio}");
    }
}
