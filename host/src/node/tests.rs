//! The raft core driven by hand: clusters of [`Core`]s over in-memory
//! stores, with a network and disks the test controls (messages dropped,
//! nodes cut off, writes held back). No threads, sockets or timers: a test
//! runs in milliseconds and every step is the test's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::prelude::{ConfState, Message, MessageType, Snapshot};
use tokio::sync::oneshot;

use super::core::{Action, Core, CoreParts, Installing, Proposed, ReadIndexed};
use super::{ProposeError, RaftConfig};
use crate::firewall::{Channel, Refusal, Refusals};
use crate::outcome::ApplyWaiter;
use crate::storage::mem::MemStore;
use raft::Storage as _;

use crate::storage::{LogStore, NodeIdentity, WriteBatch};

type TestCore = Core<MemStore, ApplyWaiter, oneshot::Sender<ReadIndexed>>;

fn addr(id: u64) -> String {
    format!("127.0.0.1:{}", 7000 + id)
}

struct TestNode {
    core: TestCore,
    store: MemStore,
    refusals: Arc<Refusals>,
    health: Arc<crate::health::ApplyHealth>,
    /// Writes the test holds back (`hold_disk`), in order.
    held: Vec<(u64, WriteBatch)>,
    hold_disk: bool,
    /// What the apply side was given, by index.
    applied: BTreeMap<u64, Vec<u8>>,
    applied_index: u64,
    peers: BTreeMap<u64, String>,
    wanted_snapshot: bool,
    restored: Vec<u64>,
}

/// Nodes, and the messages between them.
struct Cluster {
    nodes: BTreeMap<u64, TestNode>,
    in_flight: Vec<Message>,
    /// Nodes cut off from every other node.
    cut: BTreeSet<u64>,
    /// Every message that was delivered, for the tests that look at them.
    delivered: Vec<Message>,
    now: Instant,
    /// Drop one message in this many (0: none), by `dice`.
    drop_one_in: u64,
    dice: Dice,
}

/// A seeded, reproducible stream of numbers (xorshift64*).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// 0..n
    fn pick(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn config() -> RaftConfig {
    RaftConfig {
        election_ticks: 10,
        heartbeat_ticks: 2,
        ..RaftConfig::default()
    }
}

fn core_over(store: MemStore, id: u64) -> (TestCore, Arc<Refusals>, Arc<crate::health::ApplyHealth>) {
    let identity = store.identity().unwrap().expect("the store has an identity");
    assert_eq!(identity.id, id);
    let refusals = Arc::new(Refusals::default());
    let health = Arc::new(crate::health::ApplyHealth::default());
    let core = Core::new(CoreParts {
        identity,
        store,
        config: config(),
        applied: 0,
        read_nonce: id,
        refusals: refusals.clone(),
        health: health.clone(),
        epochs: Arc::default(),
        proposals_failed: prometheus::IntCounter::new("failed", "failed").unwrap(),
        logger: slog::Logger::root(slog::Discard, slog::o!()),
    })
    .unwrap();
    (core, refusals, health)
}

impl TestNode {
    fn new(store: MemStore, id: u64) -> TestNode {
        let (core, refusals, health) = core_over(store.clone(), id);
        TestNode {
            core,
            store,
            refusals,
            health,
            held: Vec::new(),
            hold_disk: false,
            applied: BTreeMap::new(),
            applied_index: 0,
            peers: BTreeMap::new(),
            wanted_snapshot: false,
            restored: Vec::new(),
        }
    }

    /// Carry out the core's actions as the driver would; messages go to
    /// `out`. Answers whether there were any.
    fn execute(&mut self, out: &mut Vec<Message>) -> bool {
        let actions = self.core.take_actions();
        let any = !actions.is_empty();
        for action in actions {
            match action {
                Action::Send(messages) => out.extend(messages),
                Action::Persist { seq, batch } => {
                    if self.hold_disk {
                        self.held.push((seq, batch));
                    } else {
                        self.store.write(batch).unwrap();
                        self.core.persisted(seq);
                    }
                }
                Action::Apply { entries, waiters } => {
                    let mut waiters = waiters;
                    for entry in entries {
                        // Applied again after a crash: the same entry, or
                        // raft broke its promise.
                        if let Some(before) = self.applied.get(&entry.index) {
                            assert_eq!(
                                before,
                                &entry.data.to_vec(),
                                "index {} applied twice, differently",
                                entry.index
                            );
                        }
                        self.applied.insert(entry.index, entry.data.to_vec());
                        if let Some(waiter) = waiters.remove(&entry.index) {
                            let _ = waiter.send(Ok(crate::outcome::Applied {
                                index: entry.index,
                                result: Ok(entry.data.to_vec()),
                            }));
                        }
                        self.applied_index = entry.index;
                    }
                    self.core.applied(self.applied_index).unwrap();
                }
                Action::Restore(metadata) => {
                    self.restored.push(metadata.index);
                    self.applied_index = metadata.index;
                    self.health.set(None);
                    self.core.applied(metadata.index).unwrap();
                }
                Action::WantSnapshot => self.wanted_snapshot = true,
                Action::SetPeer { id, addr } => {
                    self.peers.insert(id, addr);
                }
                Action::RemovePeer(id) => {
                    self.peers.remove(&id);
                }
            }
        }
        any
    }

    /// Let the held writes reach the disk.
    fn release_disk(&mut self, out: &mut Vec<Message>) {
        self.hold_disk = false;
        for (seq, batch) in std::mem::take(&mut self.held) {
            self.store.write(batch).unwrap();
            self.core.persisted(seq);
        }
        self.execute(out);
    }

    /// Handle every `Ready`, as the driver does, until there is none.
    fn drain(&mut self, out: &mut Vec<Message>) {
        loop {
            let mut busy = self.execute(out);
            if self.core.has_ready() {
                busy = true;
                if self.core.snapshot_pending() {
                    assert!(!self.core.has_in_flight(), "a snapshot waits for the writes before it");
                }
                let installing = self.core.ready().unwrap();
                self.execute(out);
                if let Some(Installing { snapshot, hard_state }) = installing {
                    self.store.install_snapshot(&snapshot, &hard_state).unwrap();
                    let members = (1..=9)
                        .filter(|id| snapshot_names(&snapshot, *id))
                        .map(|id| (id, addr(id)));
                    self.core.installed(members.collect()).unwrap();
                    self.execute(out);
                    assert!(!self.core.has_in_flight(), "the install's writes are durable");
                    self.core.finish_install().unwrap();
                }
            }
            if !busy {
                return;
            }
        }
    }
}

fn snapshot_names(snapshot: &Snapshot, id: u64) -> bool {
    let conf = snapshot.get_metadata().get_conf_state();
    conf.voters.contains(&id) || conf.learners.contains(&id)
}

impl Cluster {
    /// A bootstrapped cluster of `n` voters, as `raftify-host run
    /// --initial-cluster` writes it.
    fn new(n: u64) -> Cluster {
        let members: Vec<(u64, String)> = (1..=n).map(|id| (id, addr(id))).collect();
        let nodes = members
            .iter()
            .map(|(id, _)| {
                let store = MemStore::new();
                store
                    .write(crate::daemon::bootstrap_batch(*id, &members).unwrap())
                    .unwrap();
                (*id, TestNode::new(store, *id))
            })
            .collect();
        let mut cluster = Cluster {
            nodes,
            in_flight: Vec::new(),
            cut: BTreeSet::new(),
            delivered: Vec::new(),
            now: Instant::now(),
            drop_one_in: 0,
            dice: Dice(0x9E37_79B9_7F4A_7C15),
        };
        cluster.settle();
        cluster
    }

    fn node(&mut self, id: u64) -> &mut TestNode {
        self.nodes.get_mut(&id).expect("a node of the cluster")
    }

    /// Handle every node's `Ready`s and deliver messages until none move.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut out = Vec::new();
            for node in self.nodes.values_mut() {
                node.drain(&mut out);
            }
            self.in_flight.extend(out);
            if self.in_flight.is_empty() {
                return;
            }
            for message in std::mem::take(&mut self.in_flight) {
                if self.cut.contains(&message.from) || self.cut.contains(&message.to) {
                    continue;
                }
                if self.drop_one_in > 0 && self.dice.pick(self.drop_one_in) == 0 {
                    continue;
                }
                let Some(to) = self.nodes.get_mut(&message.to) else {
                    continue;
                };
                let channel = if message.get_msg_type() == MessageType::MsgSnapshot {
                    Channel::InstallSnapshot
                } else {
                    Channel::Stream
                };
                self.delivered.push(message.clone());
                to.core.step(message, channel);
            }
        }
        panic!("the cluster never settled");
    }

    /// Tick every node `ticks` times, 100 ms apart, settling after each.
    fn tick(&mut self, ticks: usize) {
        for _ in 0..ticks {
            self.now += Duration::from_millis(100);
            let now = self.now;
            for node in self.nodes.values_mut() {
                node.core.tick(now);
                node.core.persist_lazily();
            }
            self.settle();
        }
    }

    /// Make `id` the leader.
    fn elect(&mut self, id: u64) {
        self.node(id).core.raw.campaign().unwrap();
        self.settle();
        assert!(self.node(id).core.is_leader(), "node {id} won its election");
        // A new leader's first entry commits before it serves reads.
        self.tick(1);
    }

    /// Start node `id`, which the leader added: as the daemon starts a
    /// joiner, with an identity naming the members and no log.
    fn start_joiner(&mut self, id: u64) {
        let store = MemStore::new();
        store
            .write(WriteBatch {
                identity: Some(NodeIdentity {
                    id,
                    members: (1..=id).map(|id| (id, addr(id))).collect(),
                    max_id: id,
                    cluster_id: 0,
                }),
                ..Default::default()
            })
            .unwrap();
        self.nodes.insert(id, TestNode::new(store, id));
    }

    /// Tick until one of `ids` leads (their election timeouts are random);
    /// answers which.
    fn tick_until_a_leader_among(&mut self, ids: &[u64]) -> u64 {
        for _ in 0..100 {
            self.tick(1);
            if let Some(id) = ids.iter().find(|id| self.nodes[id].core.is_leader()) {
                return *id;
            }
        }
        panic!("none of {ids:?} became the leader in 100 ticks");
    }

    fn propose(&mut self, on: u64, data: &[u8]) -> oneshot::Receiver<Proposed> {
        let (reply, answer) = oneshot::channel();
        self.node(on).core.propose(data.to_vec(), reply);
        self.settle();
        answer
    }
}

fn answer<T>(mut receiver: oneshot::Receiver<T>) -> T {
    receiver.try_recv().expect("answered by now")
}

#[test]
fn a_proposal_on_the_leader_commits_and_every_replica_applies_it() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let applied = answer(cluster.propose(1, b"set a 1")).expect("committed");
    assert_eq!(applied.result, Ok(b"set a 1".to_vec()));
    cluster.tick(1);
    for id in 1..=3 {
        assert_eq!(
            cluster.node(id).applied.get(&applied.index).map(Vec::as_slice),
            Some(&b"set a 1"[..]),
            "node {id} applied it at the same index"
        );
    }
}

#[test]
fn a_follower_refuses_a_proposal_and_names_the_leader() {
    let mut cluster = Cluster::new(3);
    cluster.elect(2);
    assert_eq!(
        answer(cluster.propose(3, b"set a 1")),
        Err(ProposeError::NotLeader {
            leader_id: 2,
            leader_addr: Some(addr(2)),
        })
    );
}

#[test]
fn a_follower_sends_no_acknowledgement_before_its_write_is_durable() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    cluster.node(2).hold_disk = true;
    let waiting = cluster.propose(1, b"set a 1");
    let acks = |cluster: &Cluster| {
        cluster
            .delivered
            .iter()
            .filter(|m| m.from == 2 && m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject)
            .map(|m| m.index)
            .max()
            .unwrap_or(0)
    };
    let before = acks(&cluster);
    let index = cluster.node(1).core.raw.raft.raft_log.last_index();
    assert!(
        before < index,
        "node 2 acknowledged {before}, not the held entry {index}"
    );
    assert!(!cluster.node(2).held.is_empty(), "node 2's write waits for its disk");
    // Node 3 is enough for a quorum with the leader.
    let applied = answer(waiting).expect("committed by nodes 1 and 3");
    assert_eq!(applied.index, index);

    let mut out = Vec::new();
    cluster.node(2).release_disk(&mut out);
    cluster.in_flight.extend(out);
    cluster.settle();
    assert_eq!(acks(&cluster), index, "node 2 acknowledges once durable");
}

#[test]
fn a_proposal_whose_index_a_new_leader_took_learns_it_was_overwritten() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    cluster.cut.insert(1);
    let lost = cluster.propose(1, b"set a lost");
    let leader = cluster.tick_until_a_leader_among(&[2, 3]);
    let kept = answer(cluster.propose(leader, b"set a kept")).expect("committed by 2 and 3");
    cluster.cut.clear();
    cluster.tick(3);
    let lost = answer(lost);
    assert!(
        matches!(lost, Err(ProposeError::Overwritten(_))),
        "the old leader's proposal is answered as lost, not left hanging: {lost:?}"
    );
    assert_eq!(
        cluster.node(1).applied.get(&kept.index).map(Vec::as_slice),
        Some(&b"set a kept"[..])
    );
    assert!(!cluster.node(1).applied.values().any(|data| data == b"set a lost"));
}

#[test]
fn a_read_index_is_answered_once_the_leader_confirms_and_asked_again_when_lost() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let committed = answer(cluster.propose(1, b"set a 1")).unwrap().index;

    // From a follower whose request is lost on the way.
    cluster.cut.insert(3);
    let (reply, mut waiting) = oneshot::channel();
    let now = cluster.now;
    cluster.node(3).core.read_index(reply, now);
    cluster.settle();
    assert!(waiting.try_recv().is_err(), "no answer while cut off");
    cluster.cut.clear();
    cluster.tick(6);
    assert!(answer(waiting).unwrap() >= committed);
    let counts = cluster.node(3).core.status().reads;
    assert_eq!((counts.served, counts.retried), (1, 1));

    // With no leader known, a read says so at once.
    let mut lone = Cluster::new(3);
    let (reply, waiting) = oneshot::channel();
    let now = lone.now;
    lone.node(1).core.read_index(reply, now);
    assert!(matches!(
        answer(waiting),
        Err(ProposeError::NotLeader { leader_id: 0, .. })
    ));
}

#[test]
fn a_joining_node_gets_a_fresh_id_and_a_rejoin_gets_the_same_one() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let join = |cluster: &mut Cluster, at: &str, id: u64| {
        let (reply, answer) = oneshot::channel();
        cluster.node(1).core.join(at.to_string(), id, reply);
        cluster.settle();
        self::answer(answer).map(|applied| u64::from_be_bytes(applied.result.unwrap().try_into().unwrap()))
    };
    let invalid = |result: Result<u64, ProposeError>| match result {
        Err(ProposeError::Invalid(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(invalid(join(&mut cluster, &addr(9), 2)).contains("already a member"));
    assert!(invalid(join(&mut cluster, &addr(9), 1_000_000)).contains("too far above"));
    assert_eq!(join(&mut cluster, &addr(4), 0), Ok(4));
    assert_eq!(
        join(&mut cluster, &addr(4), 0),
        Ok(4),
        "asking again is answered, not a second member"
    );
    assert_eq!(cluster.node(1).core.learners(), [4]);
    assert_eq!(
        cluster.node(2).peers.get(&4),
        Some(&addr(4)),
        "followers learn its address"
    );

    // A removed id is never handed out again.
    let (reply, removed) = oneshot::channel();
    cluster.node(1).core.remove_member(4, reply);
    cluster.settle();
    answer(removed).expect("removed");
    assert!(invalid(join(&mut cluster, &addr(5), 4)).contains("never reused"));
    assert_eq!(join(&mut cluster, &addr(5), 0), Ok(5));
}

#[test]
fn the_last_voter_cannot_be_removed_and_a_leader_moves_away_before_its_removal() {
    let mut lone = Cluster::new(1);
    lone.elect(1);
    let (reply, refused) = oneshot::channel();
    lone.node(1).core.remove_member(1, reply);
    assert!(matches!(answer(refused), Err(ProposeError::Invalid(m)) if m.contains("only voter")));

    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let (reply, retry) = oneshot::channel();
    cluster.node(1).core.remove_member(1, reply);
    assert!(matches!(answer(retry), Err(ProposeError::NotProposed(_))));
    cluster.tick(5);
    assert!(!cluster.node(1).core.is_leader(), "leadership moved to another voter");
    assert_eq!(cluster.node(1).core.voters(), [1, 2, 3], "nothing was removed yet");
}

#[test]
fn a_committed_change_raft_refuses_is_answered_and_stops_no_node() {
    // The rules never propose it (see above); were one in the log anyway,
    // raft refuses it at apply, and the node answers and goes on.
    let mut lone = Cluster::new(1);
    lone.elect(1);
    let change = raft::prelude::ConfChange {
        change_type: raft::prelude::ConfChangeType::RemoveNode,
        node_id: 1,
        ..Default::default()
    };
    let (reply, refused) = oneshot::channel();
    lone.node(1).core.propose_conf_change(change, Some(reply));
    lone.settle();
    assert!(
        matches!(answer(refused), Err(ProposeError::Invalid(m)) if m.contains("raft refused")),
        "the proposer is told"
    );
    assert_eq!(lone.node(1).core.voters(), [1], "the configuration stays as it was");
    let applied = answer(lone.propose(1, b"after")).unwrap();
    assert_eq!(lone.node(1).applied[&applied.index], b"after".to_vec());
}

#[test]
fn a_caught_up_learner_is_promoted_but_one_that_cannot_apply_is_not() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let (reply, joined) = oneshot::channel();
    cluster.node(1).core.join(addr(4), 0, reply);
    cluster.settle();
    answer(joined).unwrap();
    cluster.start_joiner(4);
    cluster.node(1).health.report(4, true);
    cluster.tick(10);
    assert_eq!(
        cluster.node(1).core.learners(),
        [4],
        "a learner that says it cannot apply stays one"
    );

    cluster.node(1).health.report(4, false);
    cluster.tick(10);
    assert_eq!(cluster.node(1).core.voters(), [1, 2, 3, 4]);
    let last = cluster.node(1).core.raw.raft.raft_log.last_index();
    assert_eq!(
        cluster.node(4).applied_index,
        last,
        "the new voter replayed the whole log"
    );
}

#[test]
fn a_learner_behind_a_compacted_log_gets_the_leaders_snapshot() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    for i in 0..5 {
        answer(cluster.propose(1, format!("set k{i} v").as_bytes())).unwrap();
    }
    let (reply, joined) = oneshot::channel();
    cluster.node(1).core.join(addr(4), 0, reply);
    cluster.settle();
    let joined_at = answer(joined).unwrap().index;
    // The leader's log is compacted behind a snapshot that does not name
    // node 4 yet: raft asks for a newer one.
    let leader = cluster.node(1);
    let snapshot_at = |leader: &TestNode, index: u64| {
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = leader.store.term(index).unwrap();
        let conf = ConfState {
            voters: vec![1, 2, 3],
            learners: if index >= joined_at { vec![4] } else { Vec::new() },
            ..Default::default()
        };
        snapshot.mut_metadata().set_conf_state(conf);
        snapshot.data = b"the state".to_vec().into();
        snapshot
    };
    let first = snapshot_at(leader, joined_at - 1);
    leader.store.save_snapshot(&first, joined_at - 1).unwrap();

    cluster.start_joiner(4);
    cluster.tick(3);
    assert!(
        cluster.node(1).wanted_snapshot,
        "the stored snapshot does not serve node 4"
    );

    let leader = cluster.node(1);
    let applied = leader.applied_index;
    let newer = snapshot_at(leader, applied);
    leader.store.save_snapshot(&newer, applied).unwrap();
    cluster.tick(5);
    let joiner = cluster.node(4);
    assert_eq!(joiner.restored, [applied], "node 4 restored the leader's snapshot");
    assert_eq!(joiner.store.snapshot_metadata().unwrap().index, applied);
    assert_eq!(joiner.peers.get(&1), Some(&addr(1)), "and learned the members from it");
    assert!(!joiner.health.stalled());

    let after = answer(cluster.propose(1, b"set after 1")).unwrap();
    cluster.tick(1);
    assert_eq!(
        cluster.node(4).applied.get(&after.index).map(Vec::as_slice),
        Some(&b"set after 1"[..])
    );
}

#[test]
fn forged_messages_never_reach_raft() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let last = cluster.node(2).core.raw.raft.raft_log.last_index();
    let term = cluster.node(2).core.raw.raft.term;
    let forged = |kind: MessageType, from: u64, f: &dyn Fn(&mut Message)| {
        let mut message = Message::default();
        message.set_msg_type(kind);
        message.from = from;
        message.to = 2;
        message.term = term;
        f(&mut message);
        message
    };
    let cases = [
        // A heartbeat from the leader committing past the log: raft-rs
        // would panic.
        (
            forged(MessageType::MsgHeartbeat, 1, &|m| m.commit = last + 100),
            Refusal::BeyondLog,
        ),
        // A term near the top of u64.
        (
            forged(MessageType::MsgRequestVote, 3, &|m| m.term = u64::MAX - 1),
            Refusal::Overflow,
        ),
        // From a node the cluster never had.
        (forged(MessageType::MsgHeartbeat, 77, &|_| {}), Refusal::NotAMember),
        // An append from a follower, in the leader's term.
        (
            forged(MessageType::MsgAppend, 3, &|m| m.index = last),
            Refusal::NotTheLeader,
        ),
    ];
    for (message, reason) in cases {
        let before = cluster.node(2).refusals.count(reason);
        assert!(
            !cluster.node(2).core.step(message.clone(), Channel::Stream),
            "{message:?} was let through"
        );
        assert_eq!(
            cluster.node(2).refusals.count(reason),
            before + 1,
            "counted as {reason:?}"
        );
    }
    assert_eq!(cluster.node(2).core.raw.raft.raft_log.committed, last);
    assert_eq!(cluster.node(2).core.raw.raft.term, term);
    // The cluster goes on.
    answer(cluster.propose(1, b"set a 1")).expect("still committing");
}

#[test]
fn a_leader_proposes_an_epoch_when_a_member_wants_a_snapshot_and_once_at_a_time() {
    let mut cluster = Cluster::new(3);
    cluster.elect(1);
    let epochs = |cluster: &mut Cluster| {
        let node = cluster.node(2);
        node.applied
            .values()
            .filter(|data| {
                matches!(
                    crate::envelope::open(data),
                    Ok(crate::envelope::Payload::Host(crate::envelope::HostEntry::Epoch))
                )
            })
            .count()
    };
    assert_eq!(epochs(&mut cluster), 0);
    let committed = cluster.node(1).core.raw.raft.raft_log.committed;
    cluster.node(1).core.epochs.set_want(committed);
    cluster.tick(5);
    assert_eq!(
        epochs(&mut cluster),
        1,
        "one epoch, though the want stood for five ticks"
    );
}

/// The node crashes: writes its disk had not made durable are lost, and it
/// restarts from what is on disk (its apply side from the start of the log,
/// raft re-delivering what it learns is committed). What it applied before
/// is kept, so a re-delivery that differs is caught.
fn crash(cluster: &mut Cluster, id: u64) {
    let old = cluster.nodes.remove(&id).expect("a node of the cluster");
    let mut restarted = TestNode::new(old.store.clone(), id);
    restarted.applied = old.applied;
    cluster.nodes.insert(id, restarted);
}

/// Seeded rounds of messages dropped (one in ten), nodes cut off and
/// healed, disks that hold writes back, crashes that lose what was not
/// durable, and proposals on whoever leads. Afterwards every proposal that
/// was acknowledged is applied, with its bytes, at its index on every node;
/// no index was ever applied two ways; no term had two leaders.
#[test]
fn under_drops_partitions_slow_disks_and_crashes_no_acknowledged_proposal_is_lost_or_changed() {
    for seed in 1..=6u64 {
        let mut cluster = Cluster::new(3);
        cluster.drop_one_in = 10;
        cluster.dice = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut dice = Dice(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut waiting = Vec::new();
        let mut acked = BTreeMap::new();
        let mut leaders: BTreeMap<u64, u64> = BTreeMap::new();
        for step in 0..300u64 {
            let id = dice.pick(3) + 1;
            match dice.pick(12) {
                0 if cluster.cut.is_empty() => {
                    cluster.cut.insert(id);
                }
                1 => cluster.cut.clear(),
                2 => cluster.node(id).hold_disk = true,
                3 => {
                    let mut out = Vec::new();
                    cluster.node(id).release_disk(&mut out);
                    cluster.in_flight.extend(out);
                }
                4 => crash(&mut cluster, id),
                _ => {
                    for id in 1..=3 {
                        if cluster.node(id).core.is_leader() {
                            let data = format!("seed {seed} step {step} on {id}").into_bytes();
                            let (reply, answer) = oneshot::channel();
                            cluster.node(id).core.propose(data.clone(), reply);
                            waiting.push((data, answer));
                        }
                    }
                }
            }
            cluster.tick(1);
            for (id, node) in &cluster.nodes {
                if node.core.is_leader() {
                    let term = node.core.raw.raft.term;
                    let first = *leaders.entry(term).or_insert(*id);
                    assert_eq!(first, *id, "seed {seed}: term {term} had two leaders");
                }
            }
            waiting.retain_mut(|(data, answer)| match answer.try_recv() {
                Ok(Ok(applied)) => {
                    assert_eq!(
                        applied.result.as_ref(),
                        Ok(&*data),
                        "seed {seed}: answered with another entry's result"
                    );
                    acked.insert(applied.index, data.clone());
                    false
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => false,
                Err(oneshot::error::TryRecvError::Empty) => true,
            });
        }
        // Heal everything; the cluster catches up.
        cluster.cut.clear();
        cluster.drop_one_in = 0;
        for id in 1..=3 {
            let mut out = Vec::new();
            cluster.node(id).release_disk(&mut out);
            cluster.in_flight.extend(out);
        }
        cluster.tick(40);
        // The faults leave room for progress: the test is not vacuous.
        assert!(
            acked.len() >= 10,
            "seed {seed}: only {} proposals were acknowledged",
            acked.len()
        );
        eprintln!("seed {seed}: {} acknowledged, {} terms", acked.len(), leaders.len());
        for id in 1..=3 {
            let node = cluster.node(id);
            for (index, data) in &acked {
                assert_eq!(
                    node.applied.get(index),
                    Some(data),
                    "seed {seed}: node {id} lost or changed the acknowledged entry at {index}"
                );
            }
        }
    }
}
