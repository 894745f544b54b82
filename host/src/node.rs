//! The raft loop: one task owns the `RawNode` and drives it.
//!
//! Each turn: wait for a tick, a request, a persistence report or an
//! applied-index report; drain every other queued request (so one `Ready`
//! covers as much as possible); then handle the `Ready`:
//!
//! 1. send the leader's messages (raft allows them before persisting, so
//!    the leader's own write runs in parallel with replication);
//! 2. hand committed entries to the apply worker (conf changes are applied
//!    here first, since they change the `RawNode`);
//! 3. stage the new entries (so raft can read them back at once) and hand
//!    them, with the hard state, to the persister thread;
//! 4. `advance_append_async`, and keep the `Ready`'s persisted messages
//!    until the persister reports that write durable; then
//!    `on_persist_ready` and send them.
//!
//! The loop never waits for an fsync: while one runs, it keeps stepping
//! messages and proposals, and the persister writes everything that queued
//! up meanwhile in its next transaction (group commit).
//!
//! Applying is asynchronous too: the worker reports its applied index back
//! and the loop calls `advance_apply_to`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, Snapshot};
use raft::{RawNode, StateRole};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::envelope::{self, HostEntry};
use crate::firewall::{self, Channel, Refusal, Refusals};
use crate::fsm::{Applied, ApplyWaiter, FsmRequest};
use crate::limits::{LimitsWatch, LogPosition};
use crate::space::SpaceWatch;
use crate::storage::persister::{Completion, Persister};
use crate::storage::staged::Staged;
use crate::storage::{LogStore, NodeIdentity, StoreError, WriteBatch};
use crate::transport::Transport;

/// Raft timing and flow-control settings. All are named limits with
/// defaults; see `config.rs` for the flags that set them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RaftConfig {
    /// How often the raft clock ticks.
    pub tick_interval_ms: u64,
    /// Ticks without a leader before a follower campaigns.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Append messages in flight to one follower before waiting for acks.
    pub max_inflight_messages: usize,
    /// Bytes of entries in one append message.
    pub max_entries_bytes_per_message: u64,
    /// Proposals this node is waiting on before it answers "busy".
    pub max_pending_proposals: usize,
    /// A learner is promoted to voter once it is within this many entries
    /// of the leader's log.
    pub promote_lag_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_inflight_messages: 256,
            max_entries_bytes_per_message: 1 << 20,
            max_pending_proposals: 100_000,
            promote_lag_entries: 64,
        }
    }
}

/// Why a proposal or read did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader{}", leader_hint(*.leader_id, .leader_addr))]
    NotLeader {
        leader_id: u64,
        leader_addr: Option<String>,
    },
    #[error("busy: {0} proposals are already waiting; retry later")]
    Busy(usize),
    #[error("the proposal was dropped by raft: {0}")]
    Dropped(String),
    #[error("the proposal was lost: a new leader replaced the entry at index {0} before it committed")]
    Overwritten(u64),
    #[error("no result within {0} ms; the proposal may or may not have been committed")]
    Timeout(u64),
    /// A read (never a write) that could not be served in time: no leader,
    /// no quorum, or this node is behind the read index.
    #[error(
        "the read was not served within {0} ms (no leader or quorum confirmed it yet); it wrote nothing, so retrying is safe"
    )]
    ReadTimeout(u64),
    #[error("the node is shutting down")]
    Shutdown,
    /// Not now, but retrying soon may work (e.g. a membership change is in
    /// progress, or leadership is moving).
    #[error("{0}")]
    Retry(String),
    /// The request can never succeed as asked.
    #[error("{0}")]
    Invalid(String),
}

fn leader_hint(leader_id: u64, leader_addr: &Option<String>) -> String {
    match (leader_id, leader_addr) {
        (0, _) => ": no leader is known yet".to_string(),
        (id, Some(addr)) => format!(": the leader is node {id} at {addr}"),
        (id, None) => format!(": the leader is node {id}"),
    }
}

/// A snapshot of the node's state for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: String,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// (id, address, voter)
    pub members: Vec<(u64, String, bool)>,
    pub snapshot_index: u64,
    /// On the leader: (id, matched, next index, state, recently active).
    pub progress: Vec<(u64, u64, u64, String, bool)>,
    pub reads: ReadCounts,
    /// Times this node saw a new leader (the first one included), as
    /// etcd's `leader_changes_seen_total`.
    pub leader_changes: u64,
    /// Proposals this node's raft loop waits to see committed.
    pub pending_proposals: u64,
}

impl NodeStatus {
    /// The address of the leader this node knows, if it knows one.
    pub fn leader_addr(&self) -> Option<String> {
        self.members
            .iter()
            .find(|(id, _, _)| *id == self.leader_id)
            .map(|(_, addr, _)| addr.clone())
    }
}

/// Requests into the raft loop.
pub enum NodeRequest {
    Propose {
        data: Vec<u8>,
        reply: ApplyWaiter,
    },
    /// Add a node at `addr` as a learner; the waiter's result is its id
    /// (u64 big-endian). `requested_id` 0 lets the leader pick.
    Join {
        addr: String,
        requested_id: u64,
        reply: ApplyWaiter,
    },
    RemoveMember {
        id: u64,
        reply: ApplyWaiter,
    },
    TransferLeader {
        id: u64,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// The transport finished (or failed) sending a snapshot to `to`.
    SnapshotSent {
        to: u64,
        ok: bool,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    /// A raft message from `Peer.Stream`.
    Raft(Box<Message>),
    /// Would the firewall let this `MsgSnapshot` (data not yet received)
    /// through? Asked before a transfer starts.
    CheckSnapshot {
        message: Box<Message>,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// A `MsgSnapshot` from `Peer.InstallSnapshot`, its data received and
    /// its header checked.
    Snapshot(Box<Message>),
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    /// The node is about to stop: if it leads, hand leadership to the most
    /// caught-up other voter. Answers the voter chosen, if any.
    StepDown {
        reply: oneshot::Sender<Option<u64>>,
    },
    /// `alarm disarm`: on the leader, propose every space alarm off.
    /// Answers how many were on.
    DisarmAlarms {
        reply: oneshot::Sender<Result<usize, ProposeError>>,
    },
    /// Stop the loop: the daemon is shutting down.
    Shutdown,
}

/// Why the raft loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("the apply worker stopped")]
    FsmGone,
}

/// A linearizable read waiting for its read index.
struct PendingRead {
    reply: oneshot::Sender<Result<u64, ProposeError>>,
    /// When its ReadIndex request last went to raft.
    sent: Instant,
    /// Whether it had to be sent more than once.
    retried: bool,
}

/// Linearizable reads this node answered since it started, and how many of
/// them needed their ReadIndex request sent again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounts {
    pub served: u64,
    pub retried: u64,
}

/// How long a proposed epoch may take to apply before it is proposed again.
const EPOCH_RETRY: Duration = Duration::from_secs(3);

/// How often an unanswered ReadIndex request is sent again (etcd: 500 ms).
/// A request can be lost on the way to a leader that died, dropped by a
/// leader that has not committed an entry of its term yet, or lost with a
/// broken peer stream; raft never answers those, so the loop asks again.
const READ_RETRY: Duration = Duration::from_millis(500);

pub struct Node<S: LogStore> {
    raw: RawNode<Staged<S>>,
    store: S,
    /// The store as raft reads it: disk plus the staged tail.
    staged: Staged<S>,
    persister: Persister,
    persisted: std_mpsc::Receiver<Completion>,
    persisted_wake: Arc<Notify>,
    /// Writes handed to the persister and not yet reported durable, in order.
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    config: RaftConfig,
    transport: Transport,
    fsm: std_mpsc::Sender<FsmRequest>,
    /// Proposals this node made as leader, by log index.
    proposals: BTreeMap<u64, Proposal>,
    reads: HashMap<Vec<u8>, PendingRead>,
    next_read_id: u64,
    /// Read contexts are (node id, this run's nonce, counter): raft-rs keys
    /// pending reads by context, so two nodes (or two runs of one) must
    /// never send the same one.
    read_nonce: u64,
    /// (term, leader, whether an entry of the term is known committed) when
    /// pending reads were last sent: a change sends them again at once. A
    /// new leader drops read requests until it committed an entry of its
    /// term, so that moment matters too.
    read_leader: (u64, u64, bool),
    /// New leaders seen in `Ready`s' soft state (see
    /// `NodeStatus::leader_changes`), and the last one.
    leader_changes: u64,
    last_leader: u64,
    read_counts: ReadCounts,
    applied: watch::Receiver<u64>,
    /// The hard state last written, to persist commit-index advances.
    hard_state: HardState,
    hard_state_dirty: bool,
    applied_dirty: bool,
    /// This node's id, the members' addresses and the highest id used.
    identity: NodeIdentity,
    /// The last conf change already reflected in the stored conf state;
    /// raft re-delivers older ones after a restart and they are skipped.
    conf_index: u64,
    /// Campaign as soon as raft allows: this node is the only voter.
    campaign_when_applied: bool,
    /// Peer messages the firewall refused, by reason.
    refusals: Arc<Refusals>,
    /// Which peers said they cannot apply (never promoted while so).
    health: Arc<crate::health::ApplyHealth>,
    /// Space readings, and the leader's alarm proposals.
    space: SpaceWatch,
    /// The leader's proposal of the sandbox limits, when none are recorded.
    limits: LimitsWatch,
    /// The last `Epoch` entry this leader proposed: when, and at which
    /// index it would be (see `epochs`).
    epoch_proposed: Option<(Instant, u64)>,
    /// When the latest heartbeat to each peer left, until it is answered
    /// (the round-trip metric; heartbeats go only to members).
    heartbeats_out: HashMap<u64, Instant>,
}

/// A write the persister has not reported durable yet.
struct InFlight {
    seq: u64,
    /// The `Ready` it persists, if any.
    ready: Option<u64>,
    /// Its first entry's index, if it has entries.
    first_entry: Option<u64>,
    /// Messages that may leave only once it is durable.
    messages: Vec<Message>,
}

struct Proposal {
    term: u64,
    waiter: ApplyWaiter,
    /// Conf changes are answered by the raft loop, normal entries by the
    /// apply worker.
    conf_change: bool,
}

impl<S: LogStore> Node<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: NodeIdentity,
        store: S,
        config: RaftConfig,
        transport: Transport,
        fsm: std_mpsc::Sender<FsmRequest>,
        applied: watch::Receiver<u64>,
        refusals: Arc<Refusals>,
        health: Arc<crate::health::ApplyHealth>,
        space: SpaceWatch,
        limits: LimitsWatch,
        logger: slog::Logger,
    ) -> Result<Node<S>, NodeError> {
        let id = identity.id;
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            max_inflight_msgs: config.max_inflight_messages,
            max_size_per_msg: config.max_entries_bytes_per_message,
            // The state machine is in memory: after a restart the apply
            // worker restores the latest snapshot and raft re-delivers the
            // committed log after it.
            applied: store.snapshot_metadata()?.index,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let hard_state = store.initial_state()?.hard_state;
        let conf_index = store.conf_index()?;
        let staged = Staged::new(store.clone());
        let raw = RawNode::new(&raft_config, staged.clone(), &logger)?;
        let (done, persisted) = std_mpsc::channel();
        let persisted_wake = Arc::new(Notify::new());
        let wake = persisted_wake.clone();
        // Out of space, writes wait (and the alarm goes up) rather than
        // stop the node.
        let (space_state, min_free, reader) = (space.state(), space.config().min_free_bytes, store.clone());
        let out_of_space = move |error: &StoreError| {
            let free = reader
                .space()
                .ok()
                .filter(|usage| usage.fs_total_bytes > 0)
                .map(|usage| usage.fs_free_bytes);
            let out = error.is_out_of_space(free, min_free);
            if out {
                space_state.mark_out_of_space();
            }
            out
        };
        let fsync = transport.link().metrics.wal_fsync.clone();
        let written = move |took: Duration| fsync.observe(took.as_secs_f64());
        let persister =
            Persister::start_waiting_for_space(store.clone(), done, move || wake.notify_one(), out_of_space, written)
                .map_err(|e| NodeError::Store(StoreError::Io(e)))?;
        // A one-voter cluster need not wait an election timeout; raft lets
        // it campaign once its configuration entries are applied.
        let campaign_when_applied = raw.raft.prs().conf().voters().ids().iter().collect::<Vec<_>>() == [id];
        Ok(Node {
            raw,
            store,
            staged,
            persister,
            persisted,
            persisted_wake,
            in_flight: VecDeque::new(),
            next_seq: 0,
            config,
            transport,
            fsm,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            next_read_id: 0,
            read_nonce: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()).rotate_left(32),
            read_leader: (0, 0, false),
            leader_changes: 0,
            last_leader: raft::INVALID_ID,
            read_counts: ReadCounts::default(),
            applied,
            hard_state,
            hard_state_dirty: false,
            applied_dirty: false,
            identity,
            conf_index,
            campaign_when_applied,
            refusals,
            health,
            space,
            limits,
            epoch_proposed: None,
            heartbeats_out: HashMap::new(),
        })
    }

    /// Run until a `Shutdown` request, `requests` closing, or a fatal error.
    pub async fn run(mut self, mut requests: mpsc::Receiver<NodeRequest>) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick()?,
                request = requests.recv() => {
                    let Some(mut request) = request else { return Ok(()) };
                    // Drain whatever else is queued: one Ready for all of it.
                    loop {
                        if matches!(request, NodeRequest::Shutdown) {
                            return Ok(());
                        }
                        self.handle(request);
                        match requests.try_recv() {
                            Ok(next) => request = next,
                            Err(_) => break,
                        }
                    }
                }
                _ = self.persisted_wake.notified() => {
                    while let Ok(completion) = self.persisted.try_recv() {
                        self.on_persisted(completion)?;
                    }
                }
                changed = self.applied.changed() => {
                    if changed.is_err() {
                        return Err(NodeError::FsmGone);
                    }
                    let applied = *self.applied.borrow_and_update();
                    self.raw.advance_apply_to(applied);
                    self.applied_dirty = true;
                    if self.campaign_when_applied && applied >= self.raw.raft.raft_log.committed {
                        self.campaign_when_applied = false;
                        if self.raw.raft.state == StateRole::Follower {
                            self.raw.campaign()?;
                        }
                    }
                }
            }
            if self.raw.has_ready() {
                self.on_ready()?;
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), NodeError> {
        self.raw.tick();
        self.promote_caught_up_learners();
        if self.store.take_snapshot_request() {
            // raft needs a snapshot newer than the stored one (e.g. one that
            // names a new member); the apply worker takes it.
            let (reply, _) = oneshot::channel();
            self.fsm
                .send(FsmRequest::Snapshot { reply })
                .map_err(|_| NodeError::FsmGone)?;
        }
        self.retry_reads();
        let (leader, mut members) = (self.is_leader(), self.voters());
        members.extend(self.learners());
        if leader {
            self.propose_epoch_if_wanted(&members);
        }
        for entry in self.space.tick(&self.store, leader, &members) {
            self.propose_host(entry);
        }
        let raft = &self.raw.raft;
        let position = LogPosition {
            leading: leader && raft.commit_to_current_term(),
            committed: raft.raft_log.committed,
            last_index: raft.raft_log.last_index(),
            applied: *self.applied.borrow(),
        };
        if let Some(entry) = self.limits.tick(position) {
            self.propose_host(entry);
        }
        // Commit-index and applied-index advances are persisted lazily, at
        // most once per tick: they can be relearned, so they need no fsync
        // of their own on the hot path.
        if self.hard_state_dirty || self.applied_dirty {
            self.persist(WriteBatch::default())?;
        }
        Ok(())
    }

    fn handle(&mut self, request: NodeRequest) {
        match request {
            NodeRequest::Propose { data, reply } => self.propose(data, reply),
            NodeRequest::Join {
                addr,
                requested_id,
                reply,
            } => self.join(addr, requested_id, reply),
            NodeRequest::RemoveMember { id, reply } => self.remove_member(id, reply),
            NodeRequest::TransferLeader { id, reply } => self.transfer_leader(id, reply),
            NodeRequest::SnapshotSent { to, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            NodeRequest::ReadIndex { reply } => self.read_index(reply),
            NodeRequest::Raft(message) => self.step_peer(*message, Channel::Stream),
            NodeRequest::Snapshot(message) => self.step_peer(*message, Channel::InstallSnapshot),
            NodeRequest::CheckSnapshot { message, reply } => {
                let view = self.view(message.from);
                let _ = reply.send(firewall::check(&message, Channel::InstallSnapshot, &view));
            }
            // `run` stops before handing this over.
            NodeRequest::Shutdown => {}
            NodeRequest::StepDown { reply } => {
                let target = self.step_down();
                let _ = reply.send(target);
            }
            NodeRequest::DisarmAlarms { reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let entries = self.space.disarm();
                let count = entries.len();
                entries.into_iter().for_each(|entry| self.propose_host(entry));
                let _ = reply.send(Ok(count));
            }
            NodeRequest::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Step a message from a peer, if the firewall lets it through.
    fn step_peer(&mut self, message: Message, channel: Channel) {
        if let Err(reason) = firewall::check(&message, channel, &self.view(message.from)) {
            self.refusals.record(reason, &message);
            return;
        }
        if message.get_msg_type() == raft::prelude::MessageType::MsgHeartbeatResponse
            && let Some(sent) = self.heartbeats_out.remove(&message.from)
        {
            self.transport
                .link()
                .metrics
                .peer_round_trip
                .with_label_values(&[message.from.to_string().as_str()])
                .observe(sent.elapsed().as_secs_f64());
        }
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(%error, "dropped a raft message");
        }
    }

    /// What the firewall needs to know of this node, for a message from
    /// `sender`. (Built per message, without allocating.)
    fn view(&self, sender: u64) -> firewall::View {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        // The configuration raft has applied, and the members this node was
        // told of (a joiner knows them from its join before it has replayed
        // a single conf change).
        let sender_is_member = conf.voters().contains(sender)
            || conf.learners().contains(&sender)
            || self.identity.members.iter().any(|(id, _)| *id == sender);
        firewall::View {
            id: raft.id,
            term: raft.term,
            leader_id: raft.leader_id,
            last_index: raft.raft_log.last_index(),
            sender_is_member,
            max_id: self.identity.max_id,
        }
    }

    fn addr_of(&self, id: u64) -> Option<String> {
        self.identity
            .members
            .iter()
            .find(|(member, _)| *member == id)
            .map(|(_, addr)| addr.clone())
    }

    /// A member (this one too) wants a snapshot past the latest epoch:
    /// propose one, once at a time (again if it is not applied within
    /// `EPOCH_RETRY`, since a proposal can be lost with a leader change).
    fn propose_epoch_if_wanted(&mut self, members: &[u64]) {
        let epochs = self.transport.link().epochs.clone();
        let committed = self.raw.raft.raft_log.committed;
        let want = epochs.want().max(epochs.members_want(members, committed));
        if want == 0 || want <= epochs.latest() {
            return;
        }
        if let Some((at, index)) = self.epoch_proposed
            && epochs.latest() < index
            && at.elapsed() < EPOCH_RETRY
        {
            return;
        }
        let index = self.raw.raft.raft_log.last_index() + 1;
        tracing::debug!(want, index, "proposing an epoch");
        self.propose_host(HostEntry::Epoch);
        self.epoch_proposed = Some((Instant::now(), index));
    }

    /// Propose an entry for the host (no one waits on it).
    fn propose_host(&mut self, entry: HostEntry) {
        if let Err(error) = self.raw.propose(Vec::new(), envelope::host(&entry)) {
            tracing::warn!(?entry, %error, "could not propose a host entry");
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> ProposeError {
        let leader_id = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader_id,
            leader_addr: self.addr_of(leader_id),
        }
    }

    fn propose(&mut self, data: Vec<u8>, reply: ApplyWaiter) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.proposals.len() >= self.config.max_pending_proposals {
            let _ = reply.send(Err(ProposeError::Busy(self.proposals.len())));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        if let Err(error) = self.raw.propose(Vec::new(), data) {
            self.transport.link().metrics.proposals_failed.inc();
            let _ = reply.send(Err(ProposeError::Dropped(error.to_string())));
            return;
        }
        let index = self.raw.raft.raft_log.last_index();
        debug_assert_eq!(index, before + 1, "a proposal appends exactly one entry");
        self.proposals.insert(
            index,
            Proposal {
                term: self.raw.raft.term,
                waiter: reply,
                conf_change: false,
            },
        );
    }

    fn propose_conf_change(&mut self, change: ConfChange, reply: Option<ApplyWaiter>) {
        if self.raw.raft.has_pending_conf() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(ProposeError::Retry(
                    "another membership change is in progress; retry shortly".into(),
                )));
            }
            return;
        }
        if let Err(error) = self.raw.propose_conf_change(Vec::new(), change) {
            if let Some(reply) = reply {
                let _ = reply.send(Err(ProposeError::Dropped(error.to_string())));
            }
            return;
        }
        if let Some(waiter) = reply {
            let index = self.raw.raft.raft_log.last_index();
            self.proposals.insert(
                index,
                Proposal {
                    term: self.raw.raft.term,
                    waiter,
                    conf_change: true,
                },
            );
        }
    }

    fn voters(&self) -> Vec<u64> {
        let mut voters: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        voters.sort();
        voters
    }

    fn learners(&self) -> Vec<u64> {
        let mut learners: Vec<u64> = self.raw.raft.prs().conf().learners().iter().copied().collect();
        learners.sort();
        learners
    }

    fn is_member(&self, id: u64) -> bool {
        self.voters().contains(&id) || self.learners().contains(&id)
    }

    fn join(&mut self, addr: String, requested_id: u64, reply: ApplyWaiter) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        // Idempotent: a node that joined and asks again gets its id back.
        if let Some((id, _)) = self.identity.members.iter().find(|(_, a)| *a == addr)
            && self.is_member(*id)
        {
            let index = self.raw.raft.raft_log.committed;
            let _ = reply.send(Ok(Applied {
                index,
                result: Ok(id.to_be_bytes().to_vec()),
            }));
            return;
        }
        let id = match self.join_id(requested_id) {
            Ok(id) => id,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let change = ConfChange {
            change_type: ConfChangeType::AddLearnerNode,
            node_id: id,
            context: addr.into_bytes().into(),
            ..Default::default()
        };
        self.propose_conf_change(change, Some(reply));
    }

    /// The id a joining node gets: the one it asked for, if that was never
    /// used and is not far off (see `firewall::MAX_UNKNOWN_ID_GAP`), or the
    /// next unused one. Never 0, never a removed node's.
    fn join_id(&self, requested_id: u64) -> Result<u64, ProposeError> {
        let max_id = self.identity.max_id;
        let highest = max_id.saturating_add(firewall::MAX_UNKNOWN_ID_GAP);
        if requested_id == 0 {
            return max_id
                .checked_add(1)
                .ok_or_else(|| ProposeError::Invalid("this cluster has used every node id".into()));
        }
        if self.is_member(requested_id) {
            let at = self.addr_of(requested_id).unwrap_or_default();
            return Err(ProposeError::Invalid(format!(
                "node id {requested_id} is already a member, at {at}"
            )));
        }
        if requested_id <= max_id {
            return Err(ProposeError::Invalid(format!(
                "node id {requested_id} was used before; ids are never reused (ask for none, or one above {max_id})"
            )));
        }
        if requested_id > highest {
            return Err(ProposeError::Invalid(format!(
                "node id {requested_id} is too far above the highest id used ({max_id}); ask for one up to {highest}"
            )));
        }
        Ok(requested_id)
    }

    /// The most up-to-date voter other than this node.
    fn best_successor(&self) -> Option<u64> {
        let own = self.raw.raft.id;
        self.voters()
            .into_iter()
            .filter(|v| *v != own)
            .max_by_key(|v| self.raw.raft.prs().get(*v).map_or(0, |p| p.matched))
    }

    /// Leader only: start moving leadership to the best successor.
    fn step_down(&mut self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let target = self.best_successor()?;
        tracing::info!(to = target, "stopping: handing leadership over");
        self.raw.transfer_leader(target);
        Some(target)
    }

    fn remove_member(&mut self, id: u64, reply: ApplyWaiter) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if !self.is_member(id) {
            let _ = reply.send(Err(ProposeError::Invalid(format!("node {id} is not a member"))));
            return;
        }
        let voters = self.voters();
        if voters == [id] {
            let _ = reply.send(Err(ProposeError::Invalid(format!(
                "node {id} is the only voter; a cluster cannot remove its last voter"
            ))));
            return;
        }
        if id == self.raw.raft.id {
            // Hand leadership to the most up-to-date other voter first; the
            // new leader then removes this node when the caller retries.
            if let Some(target) = self.best_successor() {
                self.raw.transfer_leader(target);
            }
            let _ = reply.send(Err(ProposeError::Retry(format!(
                "node {id} is the leader; leadership is moving to another voter first; retry shortly"
            ))));
            return;
        }
        let change = ConfChange {
            change_type: ConfChangeType::RemoveNode,
            node_id: id,
            ..Default::default()
        };
        self.propose_conf_change(change, Some(reply));
    }

    fn transfer_leader(&mut self, id: u64, reply: oneshot::Sender<Result<(), ProposeError>>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if !self.voters().contains(&id) {
            let _ = reply.send(Err(ProposeError::Invalid(format!("node {id} is not a voter"))));
            return;
        }
        if id != self.raw.raft.id {
            self.raw.transfer_leader(id);
        }
        let _ = reply.send(Ok(()));
    }

    /// Leader: promote one learner that has caught up, if no other change
    /// is in flight.
    fn promote_caught_up_learners(&mut self) {
        if !self.is_leader() || self.raw.raft.has_pending_conf() {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        let lag = self.config.promote_lag_entries;
        // A learner that never acknowledged an entry (a dead address: the
        // log may be shorter than `lag`) or went quiet is not caught up.
        let caught_up = self.learners().into_iter().find(|learner| {
            self.raw
                .raft
                .prs()
                .get(*learner)
                .is_some_and(|p| p.matched > 0 && p.recent_active && p.matched.saturating_add(lag) >= last)
                // One whose log is whole but whose state is not (its
                // restore fails) would count toward a quorum it cannot
                // serve: it stays a learner.
                && !self.health.reported_stalled(*learner)
        });
        if let Some(learner) = caught_up {
            tracing::info!(node = learner, "promoting a caught-up learner to voter");
            let change = ConfChange {
                change_type: ConfChangeType::AddNode,
                node_id: learner,
                ..Default::default()
            };
            self.propose_conf_change(change, None);
        }
    }

    fn read_index(&mut self, reply: oneshot::Sender<Result<u64, ProposeError>>) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        self.next_read_id += 1;
        let mut ctx = Vec::with_capacity(24);
        ctx.extend_from_slice(&self.raw.raft.id.to_be_bytes());
        ctx.extend_from_slice(&self.read_nonce.to_be_bytes());
        ctx.extend_from_slice(&self.next_read_id.to_be_bytes());
        self.raw.read_index(ctx.clone());
        self.reads.insert(
            ctx,
            PendingRead {
                reply,
                sent: Instant::now(),
                retried: false,
            },
        );
    }

    /// Each tick: forget reads whose caller gave up (its deadline passed),
    /// and send again those unanswered for `READ_RETRY`, or all of them
    /// when the leader or term changed. A retry with the same context is
    /// harmless: the leader keeps one pending read per context, and the
    /// first answer serves the read.
    fn retry_reads(&mut self) {
        self.reads.retain(|_, read| !read.reply.is_closed());
        let raft = &self.raw.raft;
        let committed_in_term = raft
            .raft_log
            .term(raft.raft_log.committed)
            .is_ok_and(|t| t == raft.term);
        let leader = (raft.term, raft.leader_id, committed_in_term);
        let changed = leader != self.read_leader;
        self.read_leader = leader;
        if leader.1 == raft::INVALID_ID || self.reads.is_empty() {
            return;
        }
        let now = Instant::now();
        let due: Vec<Vec<u8>> = self
            .reads
            .iter_mut()
            .filter(|(_, read)| changed || now.duration_since(read.sent) >= READ_RETRY)
            .map(|(ctx, read)| {
                read.sent = now;
                read.retried = true;
                ctx.clone()
            })
            .collect();
        for ctx in due {
            self.raw.read_index(ctx);
        }
    }

    fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        let mut members: Vec<(u64, String, bool)> = conf
            .voters()
            .ids()
            .iter()
            .map(|id| (id, true))
            .chain(conf.learners().iter().map(|id| (*id, false)))
            .map(|(id, voter)| (id, self.addr_of(id).unwrap_or_default(), voter))
            .collect();
        members.sort();
        NodeStatus {
            id: raft.id,
            role: role_name(raft.state).to_string(),
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: *self.applied.borrow(),
            first_index: self.store.first_index().unwrap_or(0),
            last_index: raft.raft_log.last_index(),
            members,
            snapshot_index: self.store.snapshot_metadata().map_or(0, |m| m.index),
            reads: self.read_counts,
            leader_changes: self.leader_changes,
            pending_proposals: self.proposals.len() as u64,
            progress: if raft.state == StateRole::Leader {
                let mut progress: Vec<_> = raft
                    .prs()
                    .iter()
                    .map(|(id, p)| {
                        let state = match p.state {
                            raft::ProgressState::Probe => "probe",
                            raft::ProgressState::Replicate => "replicate",
                            raft::ProgressState::Snapshot => "snapshot",
                        };
                        (*id, p.matched, p.next_idx, state.to_string(), p.recent_active)
                    })
                    .collect();
                progress.sort();
                progress
            } else {
                Vec::new()
            },
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if self.raw.snap().is_some_and(|snapshot| !snapshot.is_empty()) {
            // Rare: the log is replaced synchronously, after every earlier
            // write (and before `ready()`, which must be advanced before
            // raft hears of those writes).
            self.flush()?;
        }
        let mut ready = self.raw.ready();
        // As etcd counts: a leader after none, or after another.
        if let Some(soft) = ready.ss()
            && soft.leader_id != self.last_leader
        {
            if soft.leader_id != raft::INVALID_ID {
                self.leader_changes += 1;
            }
            self.last_leader = soft.leader_id;
        }
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone(), ready.hs().cloned())?;
        }
        self.serve_reads(ready.take_read_states());
        let committed = ready.take_committed_entries();
        self.apply_committed(committed)?;
        let mut batch = WriteBatch {
            entries: ready.take_entries(),
            ..Default::default()
        };
        let mut vote_changed = false;
        if let Some(hard_state) = ready.hs() {
            // Term and vote must be durable before any message that depends
            // on them leaves; a commit-index advance alone may lag on disk
            // (raft relearns it), so it rides along with the next write
            // instead of costing an fsync of its own.
            vote_changed = hard_state.term != self.hard_state.term || hard_state.vote != self.hard_state.vote;
            self.hard_state = hard_state.clone();
            self.hard_state_dirty = true;
        }
        let persisted_messages = ready.take_persisted_messages();
        let installed_snapshot = !ready.snapshot().is_empty();
        if installed_snapshot || (!vote_changed && batch.entries.is_empty() && self.in_flight.is_empty()) {
            // Nothing to wait for; or a snapshot, which the apply worker is
            // restoring already: raft must count it persisted before the
            // worker reports it applied, so this `Ready` ends synchronously.
            if installed_snapshot {
                self.staged.stage(&batch.entries);
                self.submit(&mut batch, None, Vec::new());
                self.flush()?;
            }
            self.send(persisted_messages);
            let mut light = self.raw.advance_append(ready);
            if let Some(commit) = light.commit_index() {
                self.hard_state.commit = commit;
                self.hard_state_dirty = true;
            }
            self.send(light.take_messages());
            self.apply_committed(light.take_committed_entries())?;
            return Ok(());
        }
        self.staged.stage(&batch.entries);
        self.submit(&mut batch, Some(ready.number()), persisted_messages);
        self.raw.advance_append_async(ready);
        Ok(())
    }

    /// The persister made writes durable: release what waited on them.
    fn on_persisted(&mut self, completion: Completion) -> Result<(), NodeError> {
        let seq = completion?;
        let mut ready = None;
        let mut messages = Vec::new();
        while let Some(write) = self.in_flight.front()
            && write.seq <= seq
        {
            let write = self.in_flight.pop_front().expect("non-empty");
            ready = write.ready.or(ready);
            messages.extend(write.messages);
        }
        let durable_through = self
            .in_flight
            .iter()
            .filter_map(|write| write.first_entry)
            .min()
            .map_or(u64::MAX, |first| first - 1);
        self.staged.mark_durable(durable_through);
        // Before sending: a vote a candidate wins must find its earlier
        // `Ready`s already acknowledged.
        if let Some(number) = ready {
            self.raw.on_persist_ready(number);
        }
        self.send(messages);
        Ok(())
    }

    /// Wait until every submitted write is durable.
    fn flush(&mut self) -> Result<(), NodeError> {
        while !self.in_flight.is_empty() {
            let persisted = &self.persisted;
            let completion = tokio::task::block_in_place(|| persisted.recv())
                .unwrap_or_else(|_| Err(StoreError::Invalid("the persister thread stopped".into())));
            self.on_persisted(completion)?;
        }
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        // A heartbeat's round trip, from the latest one sent (heartbeats
        // come a tick apart, far more than a round trip; after a partition
        // the wait is not counted as one).
        for message in &messages {
            if message.get_msg_type() == raft::prelude::MessageType::MsgHeartbeat {
                self.heartbeats_out.insert(message.to, Instant::now());
            }
        }
        for peer in self.transport.send(messages) {
            self.raw.report_unreachable(peer);
        }
    }

    /// A snapshot from the leader: persist it (replacing the log), adopt its
    /// members' addresses, and have the apply worker restore it.
    fn install_snapshot(&mut self, snapshot: Snapshot, hard_state: Option<HardState>) -> Result<(), NodeError> {
        let index = snapshot.get_metadata().index;
        let corrupt = |e: crate::snapshot::SnapshotError| {
            NodeError::Store(StoreError::Corrupt(format!("snapshot at {index}: {e}")))
        };
        // A received snapshot's data is the file the peer service wrote
        // (raft carried a reference to it); one made in process is inline.
        let file = match crate::snapshot::DataRef::parse(&snapshot.data) {
            Some(crate::snapshot::DataRef::File { path, .. }) => Some(path),
            Some(crate::snapshot::DataRef::Stored { .. }) => {
                return Err(NodeError::Store(StoreError::Corrupt(format!(
                    "snapshot at {index}: a reference to another node's store"
                ))));
            }
            None => None,
        };
        let header = match &file {
            Some(path) => tokio::task::block_in_place(|| crate::snapshot::read_file_header(path)).map_err(corrupt)?,
            None => crate::snapshot::decode(&snapshot.data).map_err(corrupt)?.0,
        };
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state;
        }
        // raft has moved its commit index to the snapshot's at least.
        self.hard_state.commit = self.hard_state.commit.max(index);
        let store = &self.store;
        let hard_state = self.hard_state.clone();
        let bytes = tokio::task::block_in_place(|| match &file {
            Some(path) => {
                store.install_snapshot_file(path, snapshot.get_metadata(), &hard_state)?;
                let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
                if let Some(dir) = path.parent() {
                    crate::snapshot::remove_ready_files(dir, index);
                }
                Ok::<u64, StoreError>(bytes)
            }
            None => {
                store.install_snapshot(&snapshot, &hard_state)?;
                Ok(snapshot.data.len() as u64)
            }
        })?;
        self.staged.clear();
        self.hard_state_dirty = false;
        self.conf_index = index;
        for (id, addr) in &header.members {
            self.transport.set_peer(*id, addr.clone());
        }
        let own = (self.identity.id, self.addr_of(self.identity.id).unwrap_or_default());
        self.identity.members = header.members;
        if !self.identity.members.iter().any(|(id, _)| *id == own.0) {
            self.identity.members.push(own);
        }
        self.identity.max_id = self
            .identity
            .members
            .iter()
            .map(|(id, _)| *id)
            .max()
            .unwrap_or(0)
            .max(self.identity.max_id);
        self.persist(WriteBatch {
            identity: Some(self.identity.clone()),
            ..Default::default()
        })?;
        tracing::info!(index, bytes, "installed a snapshot from the leader");
        // Until the apply worker has restored it, this node cannot apply:
        // its batches say so from the acknowledgement of this install on,
        // so a leader never promotes it in the gap before a restore that
        // then fails.
        if !self.health.stalled() {
            self.health
                .set(Some(format!("restoring the leader's snapshot at index {index}")));
        }
        self.fsm
            .send(FsmRequest::Restore {
                metadata: snapshot.get_metadata().clone(),
            })
            .map_err(|_| NodeError::FsmGone)
    }

    /// Queue a write that no `Ready` waits on (metadata).
    fn persist(&mut self, mut batch: WriteBatch) -> Result<(), NodeError> {
        self.submit(&mut batch, None, Vec::new());
        Ok(())
    }

    /// Hand `batch` (plus any lazily kept hard state and applied index) to
    /// the persister; `messages` leave once it is durable.
    fn submit(&mut self, batch: &mut WriteBatch, ready: Option<u64>, messages: Vec<Message>) {
        if self.hard_state_dirty {
            batch.hard_state = Some(self.hard_state.clone());
        }
        if self.applied_dirty {
            batch.applied_index = Some(*self.applied.borrow());
        }
        self.hard_state_dirty = false;
        self.applied_dirty = false;
        self.next_seq += 1;
        self.in_flight.push_back(InFlight {
            seq: self.next_seq,
            ready,
            first_entry: batch.entries.first().map(|e| e.index),
            messages,
        });
        self.persister.submit(self.next_seq, std::mem::take(batch));
    }

    fn serve_reads(&mut self, states: Vec<raft::ReadState>) {
        for state in states {
            if let Some(read) = self.reads.remove(&state.request_ctx) {
                self.read_counts.served += 1;
                self.read_counts.retried += u64::from(read.retried);
                let _ = read.reply.send(Ok(state.index));
            }
        }
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut waiters = HashMap::new();
        for entry in &entries {
            let proposal = self.take_proposal(entry);
            let conf_change = match entry.get_entry_type() {
                EntryType::EntryNormal => None,
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data).map_err(raft::Error::CodecError)?;
                    if entry.index > self.conf_index {
                        let conf_state = self.raw.apply_conf_change(&change)?;
                        self.on_conf_changed(&change, conf_state, entry.index)?;
                    }
                    Some(change)
                }
                EntryType::EntryConfChangeV2 => {
                    // This host proposes only simple conf changes.
                    tracing::error!(index = entry.index, "ignoring a joint conf change entry");
                    None
                }
            };
            let Some(proposal) = proposal else { continue };
            match (conf_change, proposal.conf_change) {
                (None, false) => {
                    waiters.insert(entry.index, proposal.waiter);
                }
                (Some(change), true) => {
                    let _ = proposal.waiter.send(Ok(Applied {
                        index: entry.index,
                        result: Ok(change.node_id.to_be_bytes().to_vec()),
                    }));
                }
                // raft replaced a conf change it would not accept with an
                // empty entry.
                _ => {
                    let _ = proposal.waiter.send(Err(ProposeError::Retry(
                        "raft dropped the membership change; retry".into(),
                    )));
                }
            }
        }
        self.fsm
            .send(FsmRequest::Apply { entries, waiters })
            .map_err(|_| NodeError::FsmGone)
    }

    /// The proposal waiting on `entry`, if this node proposed it. Proposals
    /// whose index was taken by another leader's entry learn so here.
    fn take_proposal(&mut self, entry: &Entry) -> Option<Proposal> {
        while let Some(first) = self.proposals.first_entry() {
            if *first.key() > entry.index {
                break;
            }
            let (index, proposal) = first.remove_entry();
            if index == entry.index && proposal.term == entry.term {
                return Some(proposal);
            }
            self.transport.link().metrics.proposals_failed.inc();
            let _ = proposal.waiter.send(Err(ProposeError::Overwritten(index)));
        }
        None
    }

    fn on_conf_changed(&mut self, change: &ConfChange, conf_state: ConfState, index: u64) -> Result<(), NodeError> {
        let id = change.node_id;
        match change.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                self.identity.max_id = self.identity.max_id.max(id);
                if let Ok(addr) = String::from_utf8(change.context.to_vec())
                    && !addr.is_empty()
                {
                    self.identity.members.retain(|(member, _)| *member != id);
                    self.identity.members.push((id, addr.clone()));
                    self.identity.members.sort();
                    self.transport.set_peer(id, addr);
                }
                tracing::info!(node = id, index, change = ?change.get_change_type(), "membership changed");
            }
            ConfChangeType::RemoveNode => {
                self.identity.members.retain(|(member, _)| *member != id);
                self.transport.remove_peer(id);
                if id == self.identity.id {
                    tracing::warn!(index, "this node was removed from the cluster; it no longer takes part");
                } else {
                    tracing::info!(node = id, index, "member removed");
                }
            }
        }
        self.conf_index = index;
        self.persist(WriteBatch {
            conf_state: Some((conf_state, index)),
            identity: Some(self.identity.clone()),
            ..Default::default()
        })
    }
}

pub fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}
