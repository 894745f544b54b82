//! A plugin component's identity: the SHA-256 of its bytes. Every place
//! that takes a component from somewhere else (the log's chunks, a member,
//! the store, a backup, a file) checks the bytes against it here.

use sha2::{Digest as _, Sha256};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginId(pub [u8; 32]);

impl PluginId {
    /// The id of the component `wasm`.
    pub fn of(wasm: &[u8]) -> PluginId {
        PluginId(Sha256::digest(wasm).into())
    }

    /// Whether `wasm` is the component this id names.
    pub fn matches(&self, wasm: &[u8]) -> bool {
        PluginId::of(wasm) == *self
    }
}

impl From<[u8; 32]> for PluginId {
    fn from(sha256: [u8; 32]) -> PluginId {
        PluginId(sha256)
    }
}

impl std::fmt::Display for PluginId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for PluginId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PluginId({self})")
    }
}

/// Where a component this node lacks comes from, by id: the members at
/// `addrs` (over `Peer.FetchPlugin`, `transport::grpc::PeerPlugins`), or a
/// test's stand-in. Whatever a source returns is checked against the id by
/// the caller.
pub(crate) trait PluginSource: Send {
    fn fetch(&self, id: PluginId, addrs: &[String]) -> anyhow::Result<Vec<u8>>;
}

/// A test's source: a function of the id (`None`: nobody has it).
#[cfg(test)]
impl<F: Fn(PluginId) -> Option<Vec<u8>> + Send> PluginSource for F {
    fn fetch(&self, id: PluginId, _addrs: &[String]) -> anyhow::Result<Vec<u8>> {
        self(id).ok_or_else(|| anyhow::anyhow!("no member has {id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_matches_its_bytes_and_no_others() {
        let id = PluginId::of(b"component");
        assert!(id.matches(b"component"));
        assert!(!id.matches(b"componenT"));
        assert!(!id.matches(b""));
        assert_eq!(id.to_string(), hex::encode(Sha256::digest(b"component")));
        assert_eq!(id.to_string().len(), 64);
    }
}
