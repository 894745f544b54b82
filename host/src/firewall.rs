//! The peer-input firewall: every raft message from the network passes
//! [`check`] before `RawNode::step` sees it.
//!
//! raft-rs trusts its peers. Some inputs make it panic (a commit index past
//! the log, an append that is not contiguous or conflicts with committed
//! entries, a term so high that the next election overflows it, a read-index
//! message without its context entry), and others let a forger take a
//! follower over (an append "from" someone other than the term's leader) or
//! steer the leader (a remote `MsgPropose` or `MsgTransferLeader`). A message
//! that breaks one of the rules below is dropped and counted by reason; raft
//! tolerates lost messages, so a refusal never costs more than a retry.
//!
//! The rules see the node through a [`View`] and hold no state, so each one
//! has a unit test of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, EntryType, Message, MessageType};

/// The highest term or index a message may carry. Far beyond anything a
/// real cluster reaches (one election a millisecond for a million years is
/// 2^45), and far enough below `u64::MAX` that raft's `term + 1` and
/// `index + n` never overflow.
pub const MAX_TERM_OR_INDEX: u64 = 1 << 62;

/// How far above the highest node id this node knows a sender's id may be.
/// A node that lags behind recent joins still hears the newcomers (one of
/// them may be the leader), while made-up ids far off are refused. Join
/// ids are held to the same window (see `node/membership.rs`).
pub const MAX_UNKNOWN_ID_GAP: u64 = 64;

/// The ids a node may have: never 0, and small enough for any arithmetic.
fn valid_id(id: u64) -> bool {
    id != 0 && id <= MAX_TERM_OR_INDEX
}

/// What the rules need to know about the receiving node.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub id: u64,
    pub term: u64,
    /// The leader of `term`, 0 if none is known.
    pub leader_id: u64,
    pub last_index: u64,
    /// Whether the message's sender is a voter or learner of the current
    /// configuration, or a member this node was told of when it joined.
    pub sender_is_member: bool,
    /// The highest node id ever added to the cluster, as this node knows it.
    pub max_id: u64,
}

/// Why a message was refused. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Sent from 0 or this node's own id, or addressed to another node.
    Addressing,
    /// From an id this cluster removed, or far above any id it knows.
    NotAMember,
    /// A type raft only produces locally (`MsgHup`, `MsgPropose`, ...).
    LocalOnly,
    /// A term or index near the top of `u64`.
    Overflow,
    /// Term 0 on anything but a forwarded `MsgReadIndex` (raft-rs treats
    /// term 0 as local and skips its term checks), or a term on one.
    BadTerm,
    /// A field this host never sets (`request_snapshot`).
    Unexpected,
    /// An append, heartbeat or snapshot for the current term from a node
    /// that is not that term's leader.
    NotTheLeader,
    /// An append whose entries do not follow `index + 1, index + 2, ...`,
    /// or whose terms go down, exceed the message's term or precede
    /// `log_term`.
    BadEntries,
    /// A commit index (heartbeat) or acknowledged index (accepting append
    /// response) past this node's last entry.
    BeyondLog,
    /// A read-index message without exactly one context entry.
    BadReadIndex,
    /// A snapshot that did not come through `InstallSnapshot`, or whose
    /// metadata raft-rs could not restore (term or index 0, a term above
    /// the message's, a configuration without voters, with id 0, with
    /// duplicates, joint, or without this node).
    SnapshotOutOfBand,
    /// A conf change entry raft could not decode, or a joint one (this
    /// host never proposes those).
    BadConfChange,
    /// A peer RPC from another cluster (its cluster id differs).
    OtherCluster,
    /// A peer RPC over TLS without a client certificate.
    NoClientCert,
    /// A snapshot transfer that was malformed, too large, cut short, or
    /// whose header or plugin did not check out.
    BadSnapshot,
}

impl Refusal {
    pub const ALL: [Refusal; 15] = [
        Refusal::Addressing,
        Refusal::NotAMember,
        Refusal::LocalOnly,
        Refusal::Overflow,
        Refusal::BadTerm,
        Refusal::Unexpected,
        Refusal::NotTheLeader,
        Refusal::BadEntries,
        Refusal::BeyondLog,
        Refusal::BadReadIndex,
        Refusal::SnapshotOutOfBand,
        Refusal::BadConfChange,
        Refusal::OtherCluster,
        Refusal::NoClientCert,
        Refusal::BadSnapshot,
    ];

    /// A short name, for logs, status and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Addressing => "addressing",
            Refusal::NotAMember => "not_a_member",
            Refusal::LocalOnly => "local_only",
            Refusal::Overflow => "overflow",
            Refusal::BadTerm => "bad_term",
            Refusal::Unexpected => "unexpected",
            Refusal::NotTheLeader => "not_the_leader",
            Refusal::BadEntries => "bad_entries",
            Refusal::BeyondLog => "beyond_log",
            Refusal::BadReadIndex => "bad_read_index",
            Refusal::SnapshotOutOfBand => "snapshot_out_of_band",
            Refusal::BadConfChange => "bad_conf_change",
            Refusal::OtherCluster => "other_cluster",
            Refusal::NoClientCert => "no_client_cert",
            Refusal::BadSnapshot => "bad_snapshot",
        }
    }

    fn slot(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `Peer.Stream`: everything but snapshots.
    Stream,
    /// `Peer.InstallSnapshot`, after the data was received and its header
    /// checked.
    InstallSnapshot,
}

/// Check one message from a peer against every rule.
pub fn check(message: &Message, channel: Channel, view: &View) -> Result<(), Refusal> {
    use MessageType::*;
    let kind = message.get_msg_type();
    if message.from == 0 || message.from == view.id || message.to != view.id {
        return Err(Refusal::Addressing);
    }
    let known_removed = message.from <= view.max_id && !view.sender_is_member;
    if known_removed || message.from > view.max_id.saturating_add(MAX_UNKNOWN_ID_GAP) {
        return Err(Refusal::NotAMember);
    }
    match kind {
        MsgHup | MsgBeat | MsgPropose | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum | MsgTransferLeader => {
            return Err(Refusal::LocalOnly);
        }
        _ => {}
    }
    let snapshot = message.get_snapshot().get_metadata();
    let numbers = [
        message.term,
        message.log_term,
        message.index,
        message.commit,
        message.commit_term,
        message.reject_hint,
        message.request_snapshot,
        snapshot.index,
        snapshot.term,
    ];
    let entry_numbers = message.get_entries().iter().flat_map(|e| [e.index, e.term]);
    if numbers.into_iter().chain(entry_numbers).any(|n| n > MAX_TERM_OR_INDEX) {
        return Err(Refusal::Overflow);
    }
    // raft-rs sends term 0 only on MsgPropose (refused above) and on a
    // follower's forwarded MsgReadIndex, which must not carry a term.
    if (kind == MsgReadIndex) != (message.term == 0) {
        return Err(Refusal::BadTerm);
    }
    if message.request_snapshot != 0 {
        return Err(Refusal::Unexpected);
    }
    let leader_only = matches!(
        kind,
        MsgAppend | MsgHeartbeat | MsgSnapshot | MsgTimeoutNow | MsgReadIndexResp
    );
    if leader_only && message.term == view.term && view.leader_id != 0 && message.from != view.leader_id {
        return Err(Refusal::NotTheLeader);
    }
    match kind {
        MsgAppend => check_entries(message)?,
        MsgHeartbeat if message.commit > view.last_index => return Err(Refusal::BeyondLog),
        MsgAppendResponse if !message.reject && message.index > view.last_index => {
            return Err(Refusal::BeyondLog);
        }
        MsgReadIndex | MsgReadIndexResp if message.get_entries().len() != 1 => {
            return Err(Refusal::BadReadIndex);
        }
        MsgSnapshot if channel != Channel::InstallSnapshot || !restorable(message, view.id) => {
            return Err(Refusal::SnapshotOutOfBand);
        }
        _ => {}
    }
    if kind != MsgAppend && !message.get_entries().is_empty() && !matches!(kind, MsgReadIndex | MsgReadIndexResp) {
        return Err(Refusal::BadEntries);
    }
    Ok(())
}

/// An append's entries: contiguous from `index + 1`, terms never going
/// down, none above the message's term or below `log_term`, and conf
/// changes this host can decode.
fn check_entries(message: &Message) -> Result<(), Refusal> {
    // Term 0 means "no entry": only index 0 has it, and no entry has it
    // (bootstrap entries are at term 1).
    if message.log_term > message.term || (message.log_term == 0) != (message.index == 0) {
        return Err(Refusal::BadEntries);
    }
    let mut previous_term = message.log_term;
    for (offset, entry) in message.get_entries().iter().enumerate() {
        let expected = message.index.checked_add(offset as u64 + 1).ok_or(Refusal::Overflow)?;
        if entry.index != expected || entry.term == 0 || entry.term < previous_term || entry.term > message.term {
            return Err(Refusal::BadEntries);
        }
        previous_term = entry.term;
        match entry.get_entry_type() {
            EntryType::EntryNormal => {}
            EntryType::EntryConfChange => {
                ConfChange::parse_from_bytes(&entry.data).map_err(|_| Refusal::BadConfChange)?;
            }
            EntryType::EntryConfChangeV2 => return Err(Refusal::BadConfChange),
        }
    }
    Ok(())
}

/// A snapshot's metadata as raft-rs can restore it: index and term from
/// 1, the term no higher than the message's, and a simple configuration
/// (voters, no joint part) with valid, distinct ids that names `own`.
fn restorable(message: &Message, own: u64) -> bool {
    let meta = message.get_snapshot().get_metadata();
    let conf = meta.get_conf_state();
    let mut ids: Vec<u64> = conf.voters.iter().chain(&conf.learners).copied().collect();
    let all_valid = ids.iter().all(|id| valid_id(*id));
    ids.sort_unstable();
    let distinct = ids.windows(2).all(|pair| pair[0] != pair[1]);
    meta.index >= 1
        && meta.term >= 1
        && meta.term <= message.term
        && !conf.voters.is_empty()
        && all_valid
        && distinct
        && ids.binary_search(&own).is_ok()
        && conf.voters_outgoing.is_empty()
        && conf.learners_next.is_empty()
        && !conf.auto_leave
}

/// Refusal counters, and a log line per reason at most every ten seconds.
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; Refusal::ALL.len()],
    last_logged: std::sync::Mutex<[Option<Instant>; Refusal::ALL.len()]>,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Refusals {
    /// Count a refused raft message and log it unless this reason was
    /// logged lately.
    pub fn record(&self, reason: Refusal, message: &Message) {
        if let Some(total) = self.count_and_due(reason) {
            tracing::warn!(
                reason = reason.name(),
                kind = ?message.get_msg_type(),
                from = message.from,
                to = message.to,
                term = message.term,
                total,
                "refused a raft message from a peer"
            );
        }
    }

    /// Count a refused peer RPC (`what` says why) and log it likewise.
    pub fn record_rpc(&self, reason: Refusal, what: &str) {
        if let Some(total) = self.count_and_due(reason) {
            tracing::warn!(reason = reason.name(), total, "refused a peer request: {what}");
        }
    }

    /// Count one; the new total if a log line is due.
    fn count_and_due(&self, reason: Refusal) -> Option<u64> {
        let slot = reason.slot();
        let total = self.counts[slot].fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_logged.lock().unwrap_or_else(|e| e.into_inner());
        let due = last[slot].is_none_or(|at| at.elapsed() >= LOG_EVERY);
        if due {
            last[slot] = Some(Instant::now());
        }
        due.then_some(total)
    }

    pub fn count(&self, reason: Refusal) -> u64 {
        self.counts[reason.slot()].load(Ordering::Relaxed)
    }

    /// Every reason with its count.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL.iter().map(|r| (r.name(), self.count(*r))).collect()
    }
}

#[cfg(test)]
mod tests;
