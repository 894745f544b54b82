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
