//! The data of a raft snapshot: which plugin made it, the members' addresses
//! as of its index, and the plugin's own `snapshot()` bytes.
//!
//! ```text
//! magic        4 bytes   "RSN4" ("RSN3": a header without client sessions,
//!                        "RSN2": nor sandbox limits, "RSN1": nor space alarms)
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

const MAGIC: &[u8; 4] = b"RSN4";
/// Snapshots written before client sessions were replicated: read, never written.
const MAGIC_V3: &[u8; 4] = b"RSN3";
/// Snapshots written before sandbox limits were replicated: read, never written.
const MAGIC_V2: &[u8; 4] = b"RSN2";
/// Snapshots written before space alarms were replicated: read, never written.
const MAGIC_V1: &[u8; 4] = b"RSN1";

/// When a node snapshots and how snapshots travel: `run`'s flags of that
/// heading, the same names in a `--config` file, and `RAFTIFY_*`
/// variables. Every node takes its own snapshots.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[command(next_help_heading = "Snapshots")]
#[serde(default)]
pub struct SnapshotConfig {
    /// Take a snapshot once this many entries were applied since the last.
    #[arg(
        long = "snapshot-every-entries",
        id = "snapshot_every_entries",
        env = "RAFTIFY_SNAPSHOT_EVERY_ENTRIES",
        default_value_t = SnapshotConfig::DEFAULT.every_entries
    )]
    #[serde(rename = "snapshot_every_entries")]
    pub every_entries: u64,
    /// Log entries kept behind a snapshot, so a follower that lags a little
    /// catches up from the log rather than a whole snapshot.
    #[arg(
        long = "snapshot-keep-entries",
        id = "snapshot_keep_entries",
        env = "RAFTIFY_SNAPSHOT_KEEP_ENTRIES",
        default_value_t = SnapshotConfig::DEFAULT.keep_entries
    )]
    #[serde(rename = "snapshot_keep_entries")]
    pub keep_entries: u64,
    /// Before a periodic snapshot, also wait until the entries applied since
    /// the last one hold this percentage of its size, so a large state is
    /// not rewritten every few seconds; 0: count entries only.
    #[arg(
        long = "snapshot-log-percent",
        id = "snapshot_log_percent",
        env = "RAFTIFY_SNAPSHOT_LOG_PERCENT",
        default_value_t = SnapshotConfig::DEFAULT.log_percent
    )]
    #[serde(rename = "snapshot_log_percent")]
    pub log_percent: u64,
    /// Size of one chunk of a snapshot, as it is read from the plugin and
    /// sent to a follower.
    #[arg(
        long = "snapshot-chunk-bytes",
        id = "snapshot_chunk_bytes",
        env = "RAFTIFY_SNAPSHOT_CHUNK_BYTES",
        default_value_t = SnapshotConfig::DEFAULT.chunk_bytes
    )]
    #[serde(rename = "snapshot_chunk_bytes")]
    pub chunk_bytes: usize,
    /// The largest snapshot this node accepts from a leader.
    #[arg(
        long = "max-snapshot-bytes",
        id = "max_snapshot_bytes",
        env = "RAFTIFY_MAX_SNAPSHOT_BYTES",
        default_value_t = SnapshotConfig::DEFAULT.max_bytes
    )]
    #[serde(rename = "max_snapshot_bytes")]
    pub max_bytes: u64,
    /// Free disk a snapshot being stored leaves alone (the space reserve,
    /// `min_free_bytes`, set when the node starts): the log needs it to go
    /// on, and a snapshot that would eat into it fails instead (0: no check).
    #[arg(skip)]
    #[serde(skip)]
    pub reserve_bytes: u64,
}

impl SnapshotConfig {
    pub const DEFAULT: SnapshotConfig = SnapshotConfig {
        every_entries: 100_000,
        keep_entries: 1_000,
        log_percent: 25,
        chunk_bytes: 1 << 20,
        max_bytes: 8 << 30,
        reserve_bytes: 0,
    };
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig::DEFAULT
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// SHA-256 of the plugin whose `snapshot()` made the state.
    pub plugin_sha256: [u8; 32],
    /// Members and their addresses as of the snapshot's index.
    pub members: Vec<(u64, String)>,
    /// Members whose space alarm is on as of the snapshot's index.
    pub alarms: Vec<u64>,
    /// The cluster's sandbox limits as of the snapshot's index (`None`: it
    /// had recorded none yet).
    pub limits: Option<crate::sandbox::Limits>,
    /// The client sessions as of the snapshot's index.
    pub sessions: crate::sessions::Sessions,
}

/// The header of an `RSN3` snapshot.
#[derive(Deserialize)]
struct HeaderV3 {
    plugin_sha256: [u8; 32],
    members: Vec<(u64, String)>,
    alarms: Vec<u64>,
    limits: Option<crate::sandbox::Limits>,
}

/// The header of an `RSN2` snapshot.
#[derive(Deserialize)]
struct HeaderV2 {
    plugin_sha256: [u8; 32],
    members: Vec<(u64, String)>,
    alarms: Vec<u64>,
}

/// The header of an `RSN1` snapshot.
#[derive(Deserialize)]
struct HeaderV1 {
    plugin_sha256: [u8; 32],
    members: Vec<(u64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a raftify snapshot: {0}")]
    Malformed(String),
}

/// Raft's messages and `Ready`s carry a snapshot's data in memory. Ours
/// carry a reference instead, so no whole state passes through the raft
/// loop: the leader's points at its stored snapshot (the transport streams
/// it from LMDB), a receiver's at the file it wrote (installed from there).
/// Real snapshot data starts with `RSN1` to `RSN4`, never with these.
const STORED_REF: &[u8; 4] = b"RSNS";
const FILE_REF: &[u8; 4] = b"RSNF";

/// Where the data a reference stands for is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataRef {
    /// The store's snapshot (the one with the message's index), `len` bytes.
    Stored { len: u64 },
    /// A received snapshot's file.
    File { path: std::path::PathBuf, len: u64 },
}

impl DataRef {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            DataRef::Stored { len } => {
                out.extend_from_slice(STORED_REF);
                out.extend_from_slice(&len.to_le_bytes());
            }
            DataRef::File { path, len } => {
                out.extend_from_slice(FILE_REF);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(path.as_os_str().as_encoded_bytes());
            }
        }
        out
    }

    /// The reference `data` is, if it is one.
    pub fn parse(data: &[u8]) -> Option<DataRef> {
        if data.len() < 12 {
            return None;
        }
        let len = u64::from_le_bytes(data[4..12].try_into().expect("8 bytes"));
        match &data[..4] {
            magic if magic == STORED_REF && data.len() == 12 => Some(DataRef::Stored { len }),
            magic if magic == FILE_REF => {
                let path = std::str::from_utf8(&data[12..]).ok()?;
                Some(DataRef::File { path: path.into(), len })
            }
            _ => None,
        }
    }

    /// The size of the data it stands for.
    pub fn data_bytes(&self) -> u64 {
        match self {
            DataRef::Stored { len } | DataRef::File { len, .. } => *len,
        }
    }
}

/// The name of a received snapshot's file under `DATA_DIR/incoming`, once
/// it is whole: one per index and term, so a second copy of the same
/// snapshot replaces the first (with the same bytes) and files of
/// different snapshots never collide.
pub fn ready_file_name(index: u64, term: u64) -> String {
    format!("snapshot-{index}-{term}.ready")
}

/// Remove received snapshots' files for indexes up to `upto` (all of them
/// with `u64::MAX`): raft has installed them or will refuse them.
pub fn remove_ready_files(dir: &std::path::Path, upto: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("snapshot-"))
            .and_then(|n| n.strip_suffix(".ready"))
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if index <= upto {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The header of the snapshot in a file, reading no more than it needs.
pub fn read_file_header(path: &std::path::Path) -> Result<SnapshotHeader, SnapshotError> {
    use std::io::Read as _;
    let mut file =
        std::fs::File::open(path).map_err(|e| SnapshotError::Malformed(format!("{}: {e}", path.display())))?;
    let mut reader = Reader::default();
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| SnapshotError::Malformed(format!("{}: {e}", path.display())))?;
        if n == 0 {
            return Err(SnapshotError::Malformed("truncated header".into()));
        }
        if let Step::Header(header, _) = reader.push(&buffer[..n])? {
            return Ok(header);
        }
    }
}

/// The most header bytes a snapshot may have: its members' addresses and
/// its session table, whose own limits keep it well under this.
const MAX_HEADER_BYTES: usize = 80 << 20;
const _: () = assert!(
    crate::sessions::MAX_SESSIONS
        * (crate::sessions::MAX_KEPT_BYTES_PER_SESSION + crate::sessions::MAX_KEPT_PER_SESSION * 32 + 64)
        < MAX_HEADER_BYTES
);

/// The bytes before the plugin state: magic, header length, header.
pub fn encode_header(header: &SnapshotHeader) -> Vec<u8> {
    let header =
        bincode::serde::encode_to_vec(header, bincode::config::standard()).expect("bincode encodes a plain struct");
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out
}

pub fn encode(header: &SnapshotHeader, state: &[u8]) -> Vec<u8> {
    let mut out = encode_header(header);
    out.extend_from_slice(state);
    out
}

/// Split snapshot data into its header and the plugin state.
pub fn decode(data: &[u8]) -> Result<(SnapshotHeader, &[u8]), SnapshotError> {
    let mut reader = Reader::default();
    match reader.push(data)? {
        Step::Header(header, _) => Ok((header, &data[reader.header_len..])),
        Step::More | Step::State(_) => Err(SnapshotError::Malformed("truncated header".into())),
    }
}

/// Reads snapshot data given in pieces of any size: first the header, then
/// the plugin state as it comes, without holding more than the header.
#[derive(Default)]
pub struct Reader {
    /// Bytes of the header so far, until it is complete.
    pending: Vec<u8>,
    done: bool,
    /// Magic, length and header, once complete.
    header_len: usize,
}

/// What one piece of snapshot data held.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Only part of the header: feed more.
    More,
    /// The header is complete; the state bytes that followed it in the
    /// pieces so far.
    Header(SnapshotHeader, Vec<u8>),
    /// Plugin state.
    State(&'a [u8]),
}

impl Reader {
    /// The bytes of magic, length and header, once the header is complete.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    pub fn push<'a>(&mut self, piece: &'a [u8]) -> Result<Step<'a>, SnapshotError> {
        if self.done {
            return Ok(Step::State(piece));
        }
        let malformed = |why: &str| SnapshotError::Malformed(why.to_string());
        // Take only what the header needs, so a huge first piece is not copied.
        let wanted = match self.pending.len() {
            n if n < 8 => 8 - n,
            _ => 8 + self.declared_len()? - self.pending.len(),
        };
        let take = wanted.min(piece.len());
        self.pending.extend_from_slice(&piece[..take]);
        let rest = &piece[take..];
        if self.pending.len() >= 4
            && ![MAGIC, MAGIC_V3, MAGIC_V2, MAGIC_V1]
                .iter()
                .any(|m| m[..] == self.pending[..4])
        {
            return Err(malformed("bad magic"));
        }
        if self.pending.len() < 8 {
            return Ok(Step::More);
        }
        let len = self.declared_len()?;
        if self.pending.len() < 8 + len {
            // The length is known now: take what this piece has of it.
            let more = (8 + len - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..more]);
            if self.pending.len() < 8 + len {
                return Ok(Step::More);
            }
            return self.finish_header(&rest[more..]);
        }
        self.finish_header(rest)
    }

    fn declared_len(&self) -> Result<usize, SnapshotError> {
        let len = u32::from_le_bytes(self.pending[4..8].try_into().expect("4 bytes")) as usize;
        if len > MAX_HEADER_BYTES {
            return Err(SnapshotError::Malformed(format!("a header of {len} bytes")));
        }
        Ok(len)
    }

    fn finish_header<'a>(&mut self, rest: &'a [u8]) -> Result<Step<'a>, SnapshotError> {
        // A length prefix in the header cannot make bincode allocate more than this.
        let limit = bincode::config::standard().with_limit::<{ MAX_HEADER_BYTES }>();
        let body = &self.pending[8..];
        let bad = |e: bincode::error::DecodeError| SnapshotError::Malformed(format!("bad header: {e}"));
        let (header, used) = if &self.pending[..4] == MAGIC_V1 {
            let (v1, used): (HeaderV1, usize) = bincode::serde::decode_from_slice(body, limit).map_err(bad)?;
            let header = SnapshotHeader {
                plugin_sha256: v1.plugin_sha256,
                members: v1.members,
                alarms: Vec::new(),
                limits: None,
                sessions: Default::default(),
            };
            (header, used)
        } else if &self.pending[..4] == MAGIC_V2 {
            let (v2, used): (HeaderV2, usize) = bincode::serde::decode_from_slice(body, limit).map_err(bad)?;
            let header = SnapshotHeader {
                plugin_sha256: v2.plugin_sha256,
                members: v2.members,
                alarms: v2.alarms,
                limits: None,
                sessions: Default::default(),
            };
            (header, used)
        } else if &self.pending[..4] == MAGIC_V3 {
            let (v3, used): (HeaderV3, usize) = bincode::serde::decode_from_slice(body, limit).map_err(bad)?;
            let header = SnapshotHeader {
                plugin_sha256: v3.plugin_sha256,
                members: v3.members,
                alarms: v3.alarms,
                limits: v3.limits,
                sessions: Default::default(),
            };
            (header, used)
        } else {
            bincode::serde::decode_from_slice(body, limit).map_err(bad)?
        };
        if used != body.len() {
            return Err(SnapshotError::Malformed("header has trailing bytes".into()));
        }
        self.done = true;
        self.header_len = self.pending.len();
        self.pending = Vec::new();
        Ok(Step::Header(header, rest.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_data_round_trips_and_rejects_garbage() {
        let header = SnapshotHeader {
            plugin_sha256: [7; 32],
            members: vec![(1, "127.0.0.1:1".into())],
            alarms: vec![1],
            limits: Some(crate::sandbox::Limits::of(&crate::sandbox::SandboxConfig::default())),
            sessions: {
                let mut sessions = crate::sessions::Sessions::default();
                let id = sessions.open(3);
                sessions.record(4, id, 1, &Ok(b"kept".to_vec()));
                sessions
            },
        };
        let data = encode(&header, b"state");
        let (decoded, state) = decode(&data).unwrap();
        assert_eq!((decoded, state), (header, b"state".as_slice()));
        assert!(decode(b"RSN1").is_err());
        assert!(decode(&data[..10]).is_err());
        assert!(decode(b"XXXX\0\0\0\0").is_err());
        assert!(decode(b"RSN1\xff\xff\xff\xff").is_err(), "a header too long to be real");
    }

    /// Snapshots stored before space alarms (`RSN1`) still read, with none.
    #[test]
    fn a_snapshot_from_before_alarms_reads_with_none() {
        #[derive(Serialize)]
        struct V1 {
            plugin_sha256: [u8; 32],
            members: Vec<(u64, String)>,
        }
        let v1 = V1 {
            plugin_sha256: [3; 32],
            members: vec![(1, "127.0.0.1:1".into())],
        };
        let body = bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap();
        let mut data = b"RSN1".to_vec();
        data.extend_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(b"old state");
        let (header, state) = decode(&data).unwrap();
        assert_eq!(header.plugin_sha256, [3; 32]);
        assert_eq!(header.members, v1.members);
        assert!(header.alarms.is_empty());
        assert_eq!(state, b"old state");
        assert!(
            encode(&header, b"").starts_with(b"RSN4"),
            "new snapshots carry alarms and limits"
        );
    }

    /// Snapshots stored before client sessions (`RSN3`) still read, with none.
    #[test]
    fn a_snapshot_from_before_sessions_reads_with_none() {
        #[derive(Serialize)]
        struct V3 {
            plugin_sha256: [u8; 32],
            members: Vec<(u64, String)>,
            alarms: Vec<u64>,
            limits: Option<crate::sandbox::Limits>,
        }
        let limits = Some(crate::sandbox::Limits::of(&crate::sandbox::SandboxConfig::default()));
        let v3 = V3 {
            plugin_sha256: [4; 32],
            members: vec![(2, "127.0.0.1:2".into())],
            alarms: vec![2],
            limits,
        };
        let body = bincode::serde::encode_to_vec(&v3, bincode::config::standard()).unwrap();
        let mut data = b"RSN3".to_vec();
        data.extend_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(b"v3 state");
        let (header, state) = decode(&data).unwrap();
        assert_eq!((header.alarms.as_slice(), header.limits), (&[2u64][..], limits));
        assert_eq!(header.sessions, Default::default());
        assert_eq!(state, b"v3 state");
    }

    /// Snapshots stored before sandbox limits (`RSN2`) still read, with none.
    #[test]
    fn a_snapshot_from_before_limits_reads_with_none() {
        #[derive(Serialize)]
        struct V2 {
            plugin_sha256: [u8; 32],
            members: Vec<(u64, String)>,
            alarms: Vec<u64>,
        }
        let v2 = V2 {
            plugin_sha256: [4; 32],
            members: vec![(2, "127.0.0.1:2".into())],
            alarms: vec![2],
        };
        let body = bincode::serde::encode_to_vec(&v2, bincode::config::standard()).unwrap();
        let mut data = b"RSN2".to_vec();
        data.extend_from_slice(&(body.len() as u32).to_le_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(b"state");
        let (header, state) = decode(&data).unwrap();
        assert_eq!(
            (header.plugin_sha256, header.alarms, header.limits),
            ([4; 32], vec![2], None)
        );
        assert_eq!(state, b"state");
    }

    #[test]
    fn references_round_trip_and_real_data_is_never_one() {
        for reference in [
            DataRef::Stored { len: 7 },
            DataRef::File {
                path: "/data/incoming/snapshot-5-2.ready".into(),
                len: 1 << 40,
            },
        ] {
            assert_eq!(DataRef::parse(&reference.to_bytes()), Some(reference));
        }
        let header = SnapshotHeader {
            plugin_sha256: [1; 32],
            members: vec![],
            alarms: vec![],
            limits: None,
            sessions: Default::default(),
        };
        assert_eq!(DataRef::parse(&encode(&header, b"state of some length")), None);
        assert_eq!(DataRef::parse(b"RSNS"), None);
    }

    #[test]
    fn a_snapshot_read_in_pieces_of_any_size_gives_the_header_then_the_state() {
        let header = SnapshotHeader {
            plugin_sha256: [9; 32],
            members: vec![(1, "127.0.0.1:1".into()), (2, "127.0.0.1:2".into())],
            alarms: vec![2],
            limits: None,
            sessions: Default::default(),
        };
        let state: Vec<u8> = (0..200u8).collect();
        let data = encode(&header, &state);
        for size in [1, 2, 7, 8, 9, 40, data.len()] {
            let mut reader = Reader::default();
            let (mut got_header, mut got_state) = (None, Vec::new());
            for piece in data.chunks(size) {
                match reader.push(piece).unwrap() {
                    Step::More => assert!(got_header.is_none()),
                    Step::Header(h, rest) => {
                        assert!(got_header.replace(h).is_none());
                        got_state.extend(rest);
                    }
                    Step::State(bytes) => {
                        assert!(got_header.is_some());
                        got_state.extend_from_slice(bytes);
                    }
                }
            }
            assert_eq!(got_header.as_ref(), Some(&header), "pieces of {size}");
            assert_eq!(got_state, state, "pieces of {size}");
        }
        assert!(Reader::default().push(b"RSN9").is_err());
    }
}
