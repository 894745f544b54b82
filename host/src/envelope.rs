//! The envelope around every normal raft entry's data.
//!
//! The first byte says whose entry it is:
//! - [`COMMAND`]: a plugin command; the rest is passed to `apply` as is;
//! - [`HOST`]: an entry for the host itself ([`HostEntry`], bincode);
//! - [`PLUGIN_CHUNK`]: a piece of a new plugin component: its SHA-256 (32
//!   bytes), the piece's offset (u64 big-endian), then the bytes;
//! - [`PLUGIN_SWAP`]: switch to the component with this SHA-256 (32 bytes)
//!   and length (u64 big-endian), whose chunks precede it in the log;
//! - [`SESSION_COMMAND`]: a plugin command of a client session: the
//!   session's id and the command's sequence number (u64 big-endian each),
//!   then the command (see `sessions`).
//!
//! A component (tens of megabytes for a Python or JS runtime) travels in
//! chunks of at most `max_proposal_bytes`, so no single entry makes a raft
//! round (message, fsync) long enough to cost the leader its term.
//!
//! Entries with empty data are raft's own (a new leader's empty entry) and
//! carry no envelope.

use serde::{Deserialize, Serialize};

pub const COMMAND: u8 = 0x01;
pub const HOST: u8 = 0x02;
pub const PLUGIN_SWAP: u8 = 0x03;
pub const PLUGIN_CHUNK: u8 = 0x04;
pub const SESSION_COMMAND: u8 = 0x05;

/// An entry addressed to the host rather than the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostEntry {
    /// Does nothing; used to commit an entry in the current term.
    Noop,
    /// A member's space alarm goes on or off (see `space`). Proposed by the
    /// leader; while any member's is on, writes that grow the state are
    /// refused on every node.
    SpaceAlarm { member: u64, on: bool },
    /// The sandbox limits every replica uses from here on (see
    /// `sandbox::Limits`). The first leader records its own; `limits set`
    /// changes them.
    Limits(crate::sandbox::Limits),
    /// The component with this SHA-256 and length, whose chunks precede
    /// this entry, is to be compiled in the background on every node (the
    /// first phase of a swap; see `readiness`).
    PreparePlugin { sha256: [u8; 32], len: u64 },
    /// Every replica restarts its plugin instance from a snapshot taken
    /// here, and only such snapshots are stored (see `epochs`). Proposed by
    /// the leader when a member wants a snapshot.
    Epoch,
    /// Open a client session; its id is this entry's index (see `sessions`).
    OpenSession,
}

/// What a normal entry's data means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Raft's own empty entry.
    Empty,
    Command(&'a [u8]),
    /// A command numbered `seq` in session `session`.
    SessionCommand {
        session: u64,
        seq: u64,
        command: &'a [u8],
    },
    Host(HostEntry),
    PluginChunk {
        sha256: [u8; 32],
        offset: u64,
        bytes: &'a [u8],
    },
    PluginSwap {
        sha256: [u8; 32],
        len: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("unknown entry kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("malformed host entry: {0}")]
    BadHostEntry(String),
}

pub fn command(entry: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry.len() + 1);
    out.push(COMMAND);
    out.extend_from_slice(entry);
    out
}

pub fn session_command(session: u64, seq: u64, entry: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry.len() + 17);
    out.push(SESSION_COMMAND);
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(entry);
    out
}

pub fn host(entry: &HostEntry) -> Vec<u8> {
    let mut out = vec![HOST];
    // Encoding plain enums into a Vec cannot fail.
    let body = bincode::serde::encode_to_vec(entry, bincode::config::standard()).expect("bincode encodes host entries");
    out.extend_from_slice(&body);
    out
}

pub fn plugin_chunk(sha256: &[u8; 32], offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 32 + 8 + bytes.len());
    out.push(PLUGIN_CHUNK);
    out.extend_from_slice(sha256);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

pub fn plugin_swap(sha256: &[u8; 32], len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 32 + 8);
    out.push(PLUGIN_SWAP);
    out.extend_from_slice(sha256);
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// The entries that carry `wasm` into the log: its chunks, then the swap.
pub fn plugin_swap_entries(wasm: &[u8], sha256: &[u8; 32], chunk_bytes: usize) -> Vec<Vec<u8>> {
    let chunk_bytes = chunk_bytes.max(1);
    let mut entries: Vec<Vec<u8>> = wasm
        .chunks(chunk_bytes)
        .enumerate()
        .map(|(i, piece)| plugin_chunk(sha256, (i * chunk_bytes) as u64, piece))
        .collect();
    entries.push(plugin_swap(sha256, wasm.len() as u64));
    entries
}

/// The first phase of a swap: `wasm`'s chunks, then the entry that has
/// every node compile it (the swap entry follows once all are ready).
pub fn plugin_prepare_entries(wasm: &[u8], sha256: &[u8; 32], chunk_bytes: usize) -> Vec<Vec<u8>> {
    let mut entries = plugin_swap_entries(wasm, sha256, chunk_bytes);
    entries.pop();
    entries.push(host(&HostEntry::PreparePlugin {
        sha256: *sha256,
        len: wasm.len() as u64,
    }));
    entries
}

/// A SHA-256 and a u64 at the start of `rest`.
fn sha_and_u64(rest: &[u8], what: &str) -> Result<([u8; 32], u64), EnvelopeError> {
    if rest.len() < 40 {
        return Err(EnvelopeError::BadHostEntry(format!("{what} entry is truncated")));
    }
    let sha256 = rest[..32].try_into().expect("32 bytes");
    let number = u64::from_be_bytes(rest[32..40].try_into().expect("8 bytes"));
    Ok((sha256, number))
}

pub fn open(data: &[u8]) -> Result<Payload<'_>, EnvelopeError> {
    match data.split_first() {
        None => Ok(Payload::Empty),
        Some((&COMMAND, rest)) => Ok(Payload::Command(rest)),
        Some((&SESSION_COMMAND, rest)) => {
            if rest.len() < 16 {
                return Err(EnvelopeError::BadHostEntry("session command entry is truncated".into()));
            }
            Ok(Payload::SessionCommand {
                session: u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
                seq: u64::from_be_bytes(rest[8..16].try_into().expect("8 bytes")),
                command: &rest[16..],
            })
        }
        Some((&HOST, rest)) => {
            let (entry, used) =
                bincode::serde::decode_from_slice(rest, bincode::config::standard().with_limit::<{ 1 << 20 }>())
                    .map_err(|e| EnvelopeError::BadHostEntry(e.to_string()))?;
            if used != rest.len() {
                return Err(EnvelopeError::BadHostEntry("trailing bytes".into()));
            }
            Ok(Payload::Host(entry))
        }
        Some((&PLUGIN_CHUNK, rest)) => {
            let (sha256, offset) = sha_and_u64(rest, "plugin chunk")?;
            Ok(Payload::PluginChunk {
                sha256,
                offset,
                bytes: &rest[40..],
            })
        }
        Some((&PLUGIN_SWAP, rest)) => {
            let (sha256, len) = sha_and_u64(rest, "plugin swap")?;
            if rest.len() != 40 {
                return Err(EnvelopeError::BadHostEntry(
                    "plugin swap entry has trailing bytes".into(),
                ));
            }
            Ok(Payload::PluginSwap { sha256, len })
        }
        Some((&other, _)) => Err(EnvelopeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_reject_garbage() {
        assert_eq!(open(&command(b"set a 1")).unwrap(), Payload::Command(b"set a 1"));
        assert_eq!(open(&host(&HostEntry::Noop)).unwrap(), Payload::Host(HostEntry::Noop));
        assert_eq!(open(b"").unwrap(), Payload::Empty);
        assert_eq!(
            open(&plugin_swap(&[9; 32], 4)).unwrap(),
            Payload::PluginSwap {
                sha256: [9; 32],
                len: 4
            }
        );
        let entries = plugin_swap_entries(b"abcdefg", &[1; 32], 3);
        assert_eq!(entries.len(), 4);
        assert_eq!(
            open(&entries[2]).unwrap(),
            Payload::PluginChunk {
                sha256: [1; 32],
                offset: 6,
                bytes: b"g"
            }
        );
        assert_eq!(
            open(&session_command(7, 3, b"incr n")).unwrap(),
            Payload::SessionCommand {
                session: 7,
                seq: 3,
                command: b"incr n"
            }
        );
        assert!(open(&[SESSION_COMMAND, 0, 0, 0]).is_err());
        assert_eq!(
            open(&host(&HostEntry::OpenSession)).unwrap(),
            Payload::Host(HostEntry::OpenSession)
        );
        assert!(open(&[PLUGIN_SWAP, 1, 2]).is_err());
        assert!(open(&[PLUGIN_CHUNK, 1, 2]).is_err());
        assert!(open(&[0x7f, 1, 2]).is_err());
        assert!(open(&[HOST, 0xff, 0xff, 0xff]).is_err());
    }
}
