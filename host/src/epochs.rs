//! Instance epochs: when snapshots are taken, and whether replicas agree.
//!
//! A plugin keeps state outside its snapshot (its memory's size, the seed
//! Rust's `HashMap` caches, whatever a careless author leaves in a static).
//! A replica restarted from a snapshot runs a fresh instance restored from
//! it, so that hidden state would differ from an instance that ran all
//! along, and so could the results. An **epoch** removes the difference:
//! at a `HostEntry::Epoch` entry every replica reads its instance's
//! snapshot, restores it into a fresh instance and goes on with that one
//! (`fsm/epoch.rs`), and only snapshots taken there are stored. Every
//! instance then has the same history: restored from the snapshot at the
//! latest epoch, then the log after it.
//!
//! Epoch entries are proposed by the leader when any member wants a
//! snapshot (its periodic policy, the `snapshot` command, raft needing one
//! for a peer): a member's want travels in its peer batches. At each epoch
//! every replica hashes its snapshot's bytes: the host's replicated tables
//! in its header (members, alarms, limits, client sessions) and the
//! plugin's state. The hashes travel in the batches too, and a replica
//! whose hash differs from another's at the same index is reported loudly
//! (log, `status`, metrics): the plugin is not deterministic, or a replica
//! is corrupt. TiKV checks its regions' replicas the same way.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Senders whose reports are kept.
const MAX_REPORTS: usize = 1024;

/// Epoch digests kept per replica.
const KEEP_DIGESTS: usize = 16;

/// Divergences kept for `status`.
const KEEP_DIVERGENCES: usize = 8;

/// The SHA-256 of the snapshot's bytes (header and plugin state) at an
/// epoch's index.
pub type Digest = (u64, [u8; 32]);

/// Two replicas whose snapshots differ at the same epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub index: u64,
    pub member: u64,
    pub ours: [u8; 32],
    pub theirs: [u8; 32],
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at epoch {} node {}'s snapshot (the plugin state and the host's tables) has SHA-256 {} and this \
             node's {}",
            self.index,
            self.member,
            hex::encode(self.theirs),
            hex::encode(self.ours)
        )
    }
}

#[derive(Debug, Default)]
pub struct Epochs {
    /// This node wants a snapshot at or past this index (0: none).
    want: AtomicU64,
    /// The index of the latest epoch this node applied.
    latest: AtomicU64,
    divergences_total: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    own: BTreeMap<u64, [u8; 32]>,
    peers: HashMap<u64, Peer>,
    /// Latest first.
    divergences: Vec<Divergence>,
    /// (index, member) pairs already reported.
    reported: BTreeSet<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Peer {
    want: u64,
    digests: BTreeMap<u64, [u8; 32]>,
}

impl Epochs {
    /// This node's apply worker wants a snapshot at or past `index` (0: no
    /// longer).
    pub fn set_want(&self, index: u64) {
        self.want.store(index, Ordering::Relaxed);
    }

    pub fn want(&self) -> u64 {
        self.want.load(Ordering::Relaxed)
    }

    /// This node applied an epoch at `index`.
    pub fn applied_epoch(&self, index: u64) {
        self.latest.fetch_max(index, Ordering::Relaxed);
    }

    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::Relaxed)
    }

    /// This node's digest at an epoch; compared with what peers said.
    pub fn record(&self, digest: Digest) {
        let (index, sha) = digest;
        let mut inner = lock(&self.inner);
        inner.own.insert(index, sha);
        while inner.own.len() > KEEP_DIGESTS {
            inner.own.pop_first();
        }
        let theirs: Vec<(u64, [u8; 32])> = inner
            .peers
            .iter()
            .filter_map(|(member, peer)| peer.digests.get(&index).map(|sha| (*member, *sha)))
            .collect();
        for (member, their) in theirs {
            self.compare(&mut inner, index, member, sha, their);
        }
    }

    /// This node's latest digest, for its batches.
    pub fn latest_digest(&self) -> Option<Digest> {
        lock(&self.inner).own.last_key_value().map(|(i, s)| (*i, *s))
    }

    /// A member's batch said this; bounded whatever ids a peer claims.
    pub fn report(&self, member: u64, want: u64, digest: Option<Digest>) {
        let mut inner = lock(&self.inner);
        if !inner.peers.contains_key(&member) && inner.peers.len() >= MAX_REPORTS {
            return;
        }
        let peer = inner.peers.entry(member).or_default();
        peer.want = want;
        let Some((index, sha)) = digest else { return };
        if peer.digests.insert(index, sha) == Some(sha) {
            return;
        }
        while peer.digests.len() > KEEP_DIGESTS {
            peer.digests.pop_first();
        }
        if let Some(ours) = inner.own.get(&index).copied() {
            self.compare(&mut inner, index, member, ours, sha);
        }
    }

    fn compare(&self, inner: &mut Inner, index: u64, member: u64, ours: [u8; 32], theirs: [u8; 32]) {
        if ours == theirs || !inner.reported.insert((index, member)) {
            return;
        }
        while inner.reported.len() > MAX_REPORTS {
            inner.reported.pop_first();
        }
        let divergence = Divergence {
            index,
            member,
            ours,
            theirs,
        };
        tracing::error!(
            index,
            member,
            "REPLICAS DIVERGED: {divergence}; the plugin is not deterministic or a replica is corrupt"
        );
        self.divergences_total.fetch_add(1, Ordering::Relaxed);
        inner.divergences.insert(0, divergence);
        inner.divergences.truncate(KEEP_DIVERGENCES);
    }

    /// The highest snapshot index any of `members` wants, up to `limit`
    /// (a want past what the log committed is not honest).
    pub fn members_want(&self, members: &[u64], limit: u64) -> u64 {
        let inner = lock(&self.inner);
        members
            .iter()
            .filter_map(|member| inner.peers.get(member))
            .map(|peer| peer.want)
            .filter(|want| *want <= limit)
            .max()
            .unwrap_or(0)
    }

    /// The divergences found, latest first.
    pub fn divergences(&self) -> Vec<Divergence> {
        lock(&self.inner).divergences.clone()
    }

    pub fn divergences_total(&self) -> u64 {
        self.divergences_total.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_that_differ_at_one_index_are_reported_once_whichever_comes_first() {
        let epochs = Epochs::default();
        epochs.record((10, [1; 32]));
        epochs.report(2, 0, Some((10, [1; 32])));
        assert!(epochs.divergences().is_empty(), "the same digest");
        epochs.report(3, 0, Some((10, [9; 32])));
        epochs.report(3, 0, Some((10, [9; 32])));
        // The peer's comes first this time.
        epochs.report(2, 0, Some((20, [7; 32])));
        epochs.record((20, [8; 32]));
        let found = epochs.divergences();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!((found[0].index, found[0].member), (20, 2));
        assert_eq!((found[1].index, found[1].member, found[1].theirs), (10, 3, [9; 32]));
        assert_eq!(epochs.divergences_total(), 2);
        assert!(found[1].to_string().contains("node 3"));
    }

    #[test]
    fn wants_count_only_members_and_only_up_to_the_limit_and_reports_stay_bounded() {
        let epochs = Epochs::default();
        epochs.report(2, 50, None);
        epochs.report(3, 5000, None);
        epochs.report(9, 70, None);
        assert_eq!(epochs.members_want(&[1, 2, 3], 100), 50);
        assert_eq!(epochs.members_want(&[1, 2, 3, 9], 100), 70);
        for member in 0..5000 {
            epochs.report(member, 1, Some((member, [0; 32])));
        }
        assert!(lock(&epochs.inner).peers.len() <= MAX_REPORTS);
        for index in 0..100 {
            epochs.record((index, [1; 32]));
        }
        assert_eq!(lock(&epochs.inner).own.len(), KEEP_DIGESTS);
        assert_eq!(epochs.latest_digest().map(|d| d.0), Some(99));
    }
}
