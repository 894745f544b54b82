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
mod tests {
    use raft::prelude::{ConfChangeType, Entry};

    use super::*;

    /// Node 2, a follower of node 1 in term 5, with entries up to 10;
    /// members 1, 2, 3 (the sender is one of them).
    fn view() -> View {
        View {
            id: 2,
            term: 5,
            leader_id: 1,
            last_index: 10,
            sender_is_member: true,
            max_id: 3,
        }
    }

    fn message(kind: MessageType, from: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = from;
        m.to = 2;
        m.term = 5;
        m
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn append(index: u64, log_term: u64, entries: Vec<Entry>) -> Message {
        let mut m = message(MessageType::MsgAppend, 1);
        m.index = index;
        m.log_term = log_term;
        m.set_entries(entries.into());
        m
    }

    fn stream(m: &Message) -> Result<(), Refusal> {
        check(m, Channel::Stream, &view())
    }

    #[test]
    fn ordinary_traffic_passes() {
        assert_eq!(stream(&append(10, 5, vec![entry(11, 5), entry(12, 5)])), Ok(()));
        let mut heartbeat = message(MessageType::MsgHeartbeat, 1);
        heartbeat.commit = 10;
        assert_eq!(stream(&heartbeat), Ok(()));
        let mut vote = message(MessageType::MsgRequestPreVote, 3);
        vote.term = 6;
        vote.index = 10;
        vote.log_term = 5;
        assert_eq!(stream(&vote), Ok(()));
        let mut ack = message(MessageType::MsgAppendResponse, 3);
        ack.index = 10;
        assert_eq!(stream(&ack), Ok(()));
        // A new leader in a higher term is not "not the leader".
        let mut newer = append(10, 5, vec![entry(11, 6)]);
        newer.term = 6;
        newer.from = 3;
        assert_eq!(stream(&newer), Ok(()));
    }

    #[test]
    fn addressing_must_name_this_node_and_a_real_sender() {
        let mut m = message(MessageType::MsgHeartbeat, 1);
        m.to = 3;
        assert_eq!(stream(&m), Err(Refusal::Addressing));
        assert_eq!(stream(&message(MessageType::MsgHeartbeat, 0)), Err(Refusal::Addressing));
        assert_eq!(stream(&message(MessageType::MsgHeartbeat, 2)), Err(Refusal::Addressing));
    }

    #[test]
    fn removed_and_made_up_senders_are_refused() {
        let mut view = view();
        view.sender_is_member = false;
        // Node 3 was removed.
        let vote = message(MessageType::MsgRequestVote, 3);
        assert_eq!(check(&vote, Channel::Stream, &view), Err(Refusal::NotAMember));
        let vote = message(MessageType::MsgRequestVote, 99);
        assert_eq!(check(&vote, Channel::Stream, &view), Err(Refusal::NotAMember));
        // A node added lately that this node has not heard of yet is heard.
        let vote = message(MessageType::MsgRequestVote, 4);
        assert_eq!(check(&vote, Channel::Stream, &view), Ok(()));
    }

    #[test]
    fn local_only_types_are_refused() {
        for kind in [
            MessageType::MsgHup,
            MessageType::MsgBeat,
            MessageType::MsgPropose,
            MessageType::MsgUnreachable,
            MessageType::MsgSnapStatus,
            MessageType::MsgCheckQuorum,
            MessageType::MsgTransferLeader,
        ] {
            assert_eq!(stream(&message(kind, 1)), Err(Refusal::LocalOnly), "{kind:?}");
        }
    }

    #[test]
    fn terms_and_indexes_that_could_overflow_are_refused() {
        let mut m = message(MessageType::MsgHeartbeat, 1);
        m.term = u64::MAX;
        assert_eq!(stream(&m), Err(Refusal::Overflow));
        let mut m = append(10, 5, vec![entry(11, 5)]);
        m.mut_entries()[0].index = u64::MAX;
        assert_eq!(stream(&m), Err(Refusal::Overflow));
        let mut m = message(MessageType::MsgAppendResponse, 3);
        m.reject = true;
        m.reject_hint = MAX_TERM_OR_INDEX + 1;
        assert_eq!(stream(&m), Err(Refusal::Overflow));
    }

    #[test]
    fn only_the_terms_leader_may_append_or_heartbeat() {
        let mut forged = append(10, 5, vec![entry(11, 5)]);
        forged.from = 3;
        assert_eq!(stream(&forged), Err(Refusal::NotTheLeader));
        let forged = message(MessageType::MsgHeartbeat, 3);
        assert_eq!(stream(&forged), Err(Refusal::NotTheLeader));
        let forged = message(MessageType::MsgTimeoutNow, 3);
        assert_eq!(stream(&forged), Err(Refusal::NotTheLeader));
        // With no leader known for the term, the first one is heard.
        let mut view = view();
        view.leader_id = 0;
        assert_eq!(
            check(&message(MessageType::MsgHeartbeat, 3), Channel::Stream, &view),
            Ok(())
        );
    }

    #[test]
    fn appends_must_be_contiguous_and_ordered_in_term() {
        let gap = append(10, 5, vec![entry(11, 5), entry(13, 5)]);
        assert_eq!(stream(&gap), Err(Refusal::BadEntries));
        let starts_late = append(10, 5, vec![entry(12, 5)]);
        assert_eq!(stream(&starts_late), Err(Refusal::BadEntries));
        let term_goes_down = append(10, 4, vec![entry(11, 5), entry(12, 4)]);
        assert_eq!(stream(&term_goes_down), Err(Refusal::BadEntries));
        let future_term = append(10, 5, vec![entry(11, 7)]);
        assert_eq!(stream(&future_term), Err(Refusal::BadEntries));
        let below_log_term = append(10, 5, vec![entry(11, 4)]);
        assert_eq!(stream(&below_log_term), Err(Refusal::BadEntries));
        let mut log_term_above_term = append(10, 6, vec![]);
        log_term_above_term.term = 5;
        assert_eq!(stream(&log_term_above_term), Err(Refusal::BadEntries));
        let mut heartbeat_with_entries = message(MessageType::MsgHeartbeat, 1);
        heartbeat_with_entries.set_entries(vec![entry(11, 5)].into());
        assert_eq!(stream(&heartbeat_with_entries), Err(Refusal::BadEntries));
    }

    #[test]
    fn conf_changes_must_decode_and_be_simple() {
        let mut garbage = entry(11, 5);
        garbage.set_entry_type(EntryType::EntryConfChange);
        garbage.data = vec![0xff, 0xff, 0xff].into();
        assert_eq!(stream(&append(10, 5, vec![garbage])), Err(Refusal::BadConfChange));
        let mut joint = entry(11, 5);
        joint.set_entry_type(EntryType::EntryConfChangeV2);
        assert_eq!(stream(&append(10, 5, vec![joint])), Err(Refusal::BadConfChange));
        let mut good = entry(11, 5);
        good.set_entry_type(EntryType::EntryConfChange);
        let change = ConfChange {
            change_type: ConfChangeType::AddLearnerNode,
            node_id: 4,
            ..Default::default()
        };
        good.data = change.write_to_bytes().unwrap().into();
        assert_eq!(stream(&append(10, 5, vec![good])), Ok(()));
    }

    #[test]
    fn commits_and_acks_past_the_log_are_refused() {
        let mut heartbeat = message(MessageType::MsgHeartbeat, 1);
        heartbeat.commit = 11;
        assert_eq!(stream(&heartbeat), Err(Refusal::BeyondLog));
        let mut ack = message(MessageType::MsgAppendResponse, 3);
        ack.index = 11;
        assert_eq!(stream(&ack), Err(Refusal::BeyondLog));
        // A rejection's hint is the follower's own last index, which may be
        // past the leader's (entries of an older term): raft handles it.
        let mut reject = message(MessageType::MsgAppendResponse, 3);
        reject.reject = true;
        reject.index = 9;
        reject.reject_hint = 12;
        assert_eq!(stream(&reject), Ok(()));
    }

    #[test]
    fn read_index_messages_carry_one_context() {
        let mut empty = message(MessageType::MsgReadIndex, 3);
        empty.term = 0;
        assert_eq!(stream(&empty), Err(Refusal::BadReadIndex));
        let mut resp = message(MessageType::MsgReadIndexResp, 1);
        resp.set_entries(vec![entry(0, 0), entry(0, 0)].into());
        assert_eq!(stream(&resp), Err(Refusal::BadReadIndex));
        let mut ok = message(MessageType::MsgReadIndex, 3);
        ok.term = 0;
        ok.set_entries(vec![entry(0, 0)].into());
        assert_eq!(stream(&ok), Ok(()));
    }

    #[test]
    fn snapshots_come_only_through_install_snapshot() {
        let mut snapshot = message(MessageType::MsgSnapshot, 1);
        let meta = snapshot.mut_snapshot().mut_metadata();
        meta.index = 20;
        meta.term = 5;
        meta.mut_conf_state().voters = vec![1, 2, 3];
        assert_eq!(stream(&snapshot), Err(Refusal::SnapshotOutOfBand));
        assert_eq!(check(&snapshot, Channel::InstallSnapshot, &view()), Ok(()));
        let mut forged = snapshot.clone();
        forged.from = 3;
        assert_eq!(
            check(&forged, Channel::InstallSnapshot, &view()),
            Err(Refusal::NotTheLeader)
        );
    }

    #[test]
    fn snapshot_metadata_must_be_restorable() {
        let mut good = message(MessageType::MsgSnapshot, 1);
        let meta = good.mut_snapshot().mut_metadata();
        meta.index = 20;
        meta.term = 5;
        meta.mut_conf_state().voters = vec![1, 3];
        meta.mut_conf_state().learners = vec![2];
        assert_eq!(check(&good, Channel::InstallSnapshot, &view()), Ok(()));
        let variants: [fn(&mut raft::prelude::SnapshotMetadata); 9] = [
            |m| m.index = 0,
            |m| m.term = 0,
            |m| m.term = 6,
            |m| m.mut_conf_state().voters.clear(),
            |m| m.mut_conf_state().voters.push(0),
            |m| m.mut_conf_state().voters.push(2),
            |m| m.mut_conf_state().learners.clear(),
            |m| m.mut_conf_state().voters_outgoing = vec![1],
            |m| m.mut_conf_state().auto_leave = true,
        ];
        for (i, change) in variants.iter().enumerate() {
            let mut bad = good.clone();
            change(bad.mut_snapshot().mut_metadata());
            assert_eq!(
                check(&bad, Channel::InstallSnapshot, &view()),
                Err(Refusal::SnapshotOutOfBand),
                "variant {i}"
            );
        }
    }

    #[test]
    fn term_zero_is_only_for_forwarded_read_index() {
        // raft-rs skips its term checks for term 0; a granted vote at term
        // 0 hits `fatal!` when it answers.
        let mut vote = message(MessageType::MsgRequestVote, 1);
        vote.term = 0;
        assert_eq!(stream(&vote), Err(Refusal::BadTerm));
        let mut resp = message(MessageType::MsgReadIndexResp, 1);
        resp.term = 0;
        resp.set_entries(vec![entry(0, 0)].into());
        assert_eq!(stream(&resp), Err(Refusal::BadTerm));
        let mut read = message(MessageType::MsgReadIndex, 3);
        read.set_entries(vec![entry(0, 0)].into());
        assert_eq!(stream(&read), Err(Refusal::BadTerm), "a forwarded read has no term");
        read.term = 0;
        assert_eq!(stream(&read), Ok(()));
    }

    #[test]
    fn no_entry_has_term_zero_and_only_index_zero_has_log_term_zero() {
        let past_the_log = append(11, 0, vec![]);
        assert_eq!(stream(&past_the_log), Err(Refusal::BadEntries));
        let zero_term_entry = append(0, 0, vec![entry(1, 0)]);
        assert_eq!(stream(&zero_term_entry), Err(Refusal::BadEntries));
        assert_eq!(stream(&append(0, 0, vec![entry(1, 1)])), Ok(()));
    }

    #[test]
    fn requests_for_a_snapshot_are_refused() {
        let mut ack = message(MessageType::MsgAppendResponse, 3);
        ack.reject = true;
        ack.index = 9;
        ack.request_snapshot = 1 << 40;
        assert_eq!(stream(&ack), Err(Refusal::Unexpected));
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let refusals = Refusals::default();
        let m = message(MessageType::MsgHup, 1);
        refusals.record(Refusal::LocalOnly, &m);
        refusals.record(Refusal::LocalOnly, &m);
        assert_eq!(refusals.count(Refusal::LocalOnly), 2);
        assert_eq!(refusals.count(Refusal::Overflow), 0);
        assert!(refusals.counts().contains(&("local_only", 2)));
    }
}
