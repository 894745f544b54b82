//! The data of a raft snapshot: which plugin made it, the members' addresses
//! as of its index, and the plugin's own `snapshot()` bytes.
//!
//! ```text
//! magic        4 bytes   "RSN1"
//! header_len   u32 LE
//! header       bincode   SnapshotHeader
//! state        rest      the plugin's snapshot() bytes
//! ```
//!
//! The conf state, index and term live in raft's `SnapshotMetadata` beside
//! the data; the addresses do not fit there, and a node installing the
//! snapshot needs them to reach the members whose join entries were
//! compacted away.

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"RSN1";

/// Snapshot configuration. Every node takes its own snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotConfig {
    /// Take a snapshot once this many entries were applied since the last.
    pub every_entries: u64,
    /// Entries kept in the log behind a snapshot, so a follower that lags a
    /// little catches up from the log rather than a whole snapshot.
    pub keep_entries: u64,
    /// Size of one chunk of a snapshot sent to a follower.
    pub chunk_bytes: usize,
    /// The largest snapshot a node accepts from a leader.
    pub max_bytes: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            every_entries: 100_000,
            keep_entries: 1_000,
            chunk_bytes: 1 << 20,
            max_bytes: 8 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// SHA-256 of the plugin whose `snapshot()` made the state.
    pub plugin_sha256: [u8; 32],
    /// Members and their addresses as of the snapshot's index.
    pub members: Vec<(u64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a raftify snapshot: {0}")]
    Malformed(String),
}

pub fn encode(header: &SnapshotHeader, state: &[u8]) -> Vec<u8> {
    let header =
        bincode::serde::encode_to_vec(header, bincode::config::standard()).expect("bincode encodes a plain struct");
    let mut out = Vec::with_capacity(8 + header.len() + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(state);
    out
}

/// Split snapshot data into its header and the plugin state.
pub fn decode(data: &[u8]) -> Result<(SnapshotHeader, &[u8]), SnapshotError> {
    let malformed = |why: &str| SnapshotError::Malformed(why.to_string());
    if data.len() < 8 || &data[..4] != MAGIC {
        return Err(malformed("bad magic"));
    }
    let len = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes")) as usize;
    let body = &data[8..];
    if body.len() < len {
        return Err(malformed("truncated header"));
    }
    // A length prefix in the header cannot make bincode allocate more than this.
    let limit = bincode::config::standard().with_limit::<{ 1 << 20 }>();
    let (header, used) = bincode::serde::decode_from_slice(&body[..len], limit)
        .map_err(|e| SnapshotError::Malformed(format!("bad header: {e}")))?;
    if used != len {
        return Err(malformed("header has trailing bytes"));
    }
    Ok((header, &body[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_data_round_trips_and_rejects_garbage() {
        let header = SnapshotHeader {
            plugin_sha256: [7; 32],
            members: vec![(1, "127.0.0.1:1".into())],
        };
        let data = encode(&header, b"state");
        let (decoded, state) = decode(&data).unwrap();
        assert_eq!((decoded, state), (header, b"state".as_slice()));
        assert!(decode(b"RSN1").is_err());
        assert!(decode(&data[..10]).is_err());
        assert!(decode(b"XXXX\0\0\0\0").is_err());
    }
}
