//! The envelope around every normal raft entry's data.
//!
//! The first byte says whose entry it is:
//! - [`COMMAND`]: a plugin command; the rest is passed to `apply` as is;
//! - [`HOST`]: an entry for the host itself ([`HostEntry`], bincode);
//! - [`PLUGIN_SWAP`]: a new plugin component: its SHA-256 (32 bytes), then
//!   the component bytes (kept raw: it may be tens of megabytes).
//!
//! Entries with empty data are raft's own (a new leader's empty entry) and
//! carry no envelope.

use serde::{Deserialize, Serialize};

pub const COMMAND: u8 = 0x01;
pub const HOST: u8 = 0x02;
pub const PLUGIN_SWAP: u8 = 0x03;

/// An entry addressed to the host rather than the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostEntry {
    /// Does nothing; used to commit an entry in the current term.
    Noop,
}

/// What a normal entry's data means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Raft's own empty entry.
    Empty,
    Command(&'a [u8]),
    Host(HostEntry),
    PluginSwap {
        sha256: [u8; 32],
        wasm: &'a [u8],
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

pub fn host(entry: &HostEntry) -> Vec<u8> {
    let mut out = vec![HOST];
    // Encoding plain enums into a Vec cannot fail.
    let body = bincode::serde::encode_to_vec(entry, bincode::config::standard()).expect("bincode encodes host entries");
    out.extend_from_slice(&body);
    out
}

pub fn plugin_swap(sha256: &[u8; 32], wasm: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 32 + wasm.len());
    out.push(PLUGIN_SWAP);
    out.extend_from_slice(sha256);
    out.extend_from_slice(wasm);
    out
}

pub fn open(data: &[u8]) -> Result<Payload<'_>, EnvelopeError> {
    match data.split_first() {
        None => Ok(Payload::Empty),
        Some((&COMMAND, rest)) => Ok(Payload::Command(rest)),
        Some((&HOST, rest)) => {
            let (entry, used) = bincode::serde::decode_from_slice(rest, bincode::config::standard())
                .map_err(|e| EnvelopeError::BadHostEntry(e.to_string()))?;
            if used != rest.len() {
                return Err(EnvelopeError::BadHostEntry("trailing bytes".into()));
            }
            Ok(Payload::Host(entry))
        }
        Some((&PLUGIN_SWAP, rest)) => {
            if rest.len() < 32 {
                return Err(EnvelopeError::BadHostEntry("plugin swap entry is truncated".into()));
            }
            let (sha256, wasm) = rest.split_at(32);
            Ok(Payload::PluginSwap {
                sha256: sha256.try_into().expect("32 bytes"),
                wasm,
            })
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
            open(&plugin_swap(&[9; 32], b"wasm")).unwrap(),
            Payload::PluginSwap {
                sha256: [9; 32],
                wasm: b"wasm"
            }
        );
        assert!(open(&[PLUGIN_SWAP, 1, 2]).is_err());
        assert!(open(&[0x7f, 1, 2]).is_err());
        assert!(open(&[HOST, 0xff, 0xff, 0xff]).is_err());
    }
}
