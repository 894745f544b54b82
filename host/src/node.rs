//! The raft loop: one task owns the `RawNode` and drives it.
//!
//! Each turn: wait for a tick, a request or an applied-index report; drain
//! every other queued request (so one `Ready` covers as much as possible);
//! then handle the `Ready`:
//!
//! 1. send the leader's messages (raft allows them before persisting);
//! 2. hand committed entries to the apply worker (conf changes are applied
//!    here first, since they change the `RawNode`);
//! 3. persist new entries and the hard state in one durable write;
//! 4. send the messages that had to wait for persistence;
//! 5. `advance_append`, then the same for the `LightReady`.
//!
//! Applying is asynchronous: the worker reports its applied index back and
//! the loop calls `advance_apply_to`.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::fsm::{ApplyWaiter, FsmRequest};
use crate::storage::{LogStore, StoreError, WriteBatch};
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
    #[error(
        "the proposal was lost: a new leader replaced the entry at index {0} before it committed"
    )]
    Overwritten(u64),
    #[error("no result within {0} ms; the proposal may or may not have been committed")]
    Timeout(u64),
    #[error("the node is shutting down")]
    Shutdown,
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
}

/// Requests into the raft loop.
pub enum NodeRequest {
    Propose {
        data: Vec<u8>,
        reply: ApplyWaiter,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, ProposeError>>,
    },
    Raft(Box<Message>),
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
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

struct PendingRead {
    reply: oneshot::Sender<Result<u64, ProposeError>>,
    since: Instant,
}

pub struct Node<S: LogStore> {
    raw: RawNode<S>,
    store: S,
    config: RaftConfig,
    transport: Transport,
    fsm: std_mpsc::Sender<FsmRequest>,
    /// Proposals this node made as leader, by log index: (term, waiter).
    proposals: BTreeMap<u64, (u64, ApplyWaiter)>,
    reads: HashMap<Vec<u8>, PendingRead>,
    next_read_id: u64,
    applied: watch::Receiver<u64>,
    /// The hard state last written, to persist commit-index advances.
    hard_state: HardState,
    hard_state_dirty: bool,
    applied_dirty: bool,
    members: BTreeMap<u64, String>,
}

impl<S: LogStore> Node<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        store: S,
        config: RaftConfig,
        members: BTreeMap<u64, String>,
        transport: Transport,
        fsm: std_mpsc::Sender<FsmRequest>,
        applied: watch::Receiver<u64>,
        logger: slog::Logger,
    ) -> Result<Node<S>, NodeError> {
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            max_inflight_msgs: config.max_inflight_messages,
            max_size_per_msg: config.max_entries_bytes_per_message,
            // The state machine is in memory: after a restart it starts
            // empty and raft re-delivers the whole committed log.
            applied: 0,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let hard_state = store.initial_state()?.hard_state;
        let mut raw = RawNode::new(&raft_config, store.clone(), &logger)?;
        let voters = raw
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .collect::<Vec<_>>();
        if voters == [id] {
            // A one-voter cluster need not wait an election timeout.
            raw.campaign()?;
        }
        Ok(Node {
            raw,
            store,
            config,
            transport,
            fsm,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            next_read_id: 0,
            applied,
            hard_state,
            hard_state_dirty: false,
            applied_dirty: false,
            members,
        })
    }

    /// Run until `requests` closes (shutdown) or a fatal error.
    pub async fn run(mut self, mut requests: mpsc::Receiver<NodeRequest>) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.config.tick_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick()?,
                request = requests.recv() => {
                    let Some(request) = request else { return Ok(()) };
                    self.handle(request);
                    // Drain whatever else is queued: one Ready for all of it.
                    while let Ok(request) = requests.try_recv() {
                        self.handle(request);
                    }
                }
                changed = self.applied.changed() => {
                    if changed.is_err() {
                        return Err(NodeError::FsmGone);
                    }
                    let applied = *self.applied.borrow_and_update();
                    self.raw.advance_apply_to(applied);
                    self.applied_dirty = true;
                }
            }
            if self.raw.has_ready() {
                self.on_ready()?;
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), NodeError> {
        self.raw.tick();
        let timeout = Duration::from_millis(
            self.config.tick_interval_ms * self.config.election_ticks as u64 * 4,
        );
        self.reads.retain(|_, read| {
            if read.since.elapsed() > timeout || read.reply.is_closed() {
                let _ = std::mem::replace(&mut read.reply, oneshot::channel().0)
                    .send(Err(ProposeError::Timeout(timeout.as_millis() as u64)));
                return false;
            }
            true
        });
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
            NodeRequest::ReadIndex { reply } => self.read_index(reply),
            NodeRequest::Raft(message) => {
                if let Err(error) = self.raw.step(*message) {
                    tracing::debug!(%error, "dropped a raft message");
                }
            }
            NodeRequest::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn not_leader(&self) -> ProposeError {
        let leader_id = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader_id,
            leader_addr: self.members.get(&leader_id).cloned(),
        }
    }

    fn propose(&mut self, data: Vec<u8>, reply: ApplyWaiter) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.proposals.len() >= self.config.max_pending_proposals {
            let _ = reply.send(Err(ProposeError::Busy(self.proposals.len())));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        if let Err(error) = self.raw.propose(Vec::new(), data) {
            let _ = reply.send(Err(ProposeError::Dropped(error.to_string())));
            return;
        }
        let index = self.raw.raft.raft_log.last_index();
        debug_assert_eq!(index, before + 1, "a proposal appends exactly one entry");
        self.proposals.insert(index, (self.raw.raft.term, reply));
    }

    fn read_index(&mut self, reply: oneshot::Sender<Result<u64, ProposeError>>) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        self.next_read_id += 1;
        let ctx = self.next_read_id.to_be_bytes().to_vec();
        self.raw.read_index(ctx.clone());
        self.reads.insert(
            ctx,
            PendingRead {
                reply,
                since: Instant::now(),
            },
        );
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
            .map(|(id, voter)| {
                (
                    id,
                    self.members.get(&id).cloned().unwrap_or_default(),
                    voter,
                )
            })
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
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        let mut ready = self.raw.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            // Nothing ever sends a snapshot: the log is never compacted.
            tracing::error!(
                "received a raft snapshot, which this version does not produce; ignoring it"
            );
        }
        self.serve_reads(ready.take_read_states());
        let committed = ready.take_committed_entries();
        self.apply_committed(committed)?;
        let mut batch = WriteBatch {
            entries: ready.take_entries(),
            ..Default::default()
        };
        if let Some(hard_state) = ready.hs() {
            self.hard_state = hard_state.clone();
            self.hard_state_dirty = true;
        }
        self.persist_with(&mut batch)?;
        self.send(ready.take_persisted_messages());
        let mut light = self.raw.advance_append(ready);
        if let Some(commit) = light.commit_index() {
            self.hard_state.commit = commit;
            self.hard_state_dirty = true;
        }
        self.send(light.take_messages());
        self.apply_committed(light.take_committed_entries())?;
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for peer in self.transport.send(messages) {
            self.raw.report_unreachable(peer);
        }
    }

    fn persist(&mut self, mut batch: WriteBatch) -> Result<(), NodeError> {
        self.persist_with(&mut batch)
    }

    fn persist_with(&mut self, batch: &mut WriteBatch) -> Result<(), NodeError> {
        if self.hard_state_dirty {
            batch.hard_state = Some(self.hard_state.clone());
        }
        if self.applied_dirty {
            batch.applied_index = Some(*self.applied.borrow());
        }
        if batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(batch);
        let store = &self.store;
        // An fsync blocks; tell the runtime so other tasks move elsewhere.
        tokio::task::block_in_place(|| store.write(batch))?;
        self.hard_state_dirty = false;
        self.applied_dirty = false;
        Ok(())
    }

    fn serve_reads(&mut self, states: Vec<raft::ReadState>) {
        for state in states {
            if let Some(read) = self.reads.remove(&state.request_ctx) {
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
            match entry.get_entry_type() {
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(raft::Error::CodecError)?;
                    let conf_state = self.raw.apply_conf_change(&change)?;
                    self.persist_conf_state(conf_state)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(raft::Error::CodecError)?;
                    let conf_state = self.raw.apply_conf_change(&change)?;
                    self.persist_conf_state(conf_state)?;
                }
                EntryType::EntryNormal => {}
            }
            // Answer proposals whose index was taken by another leader's entry.
            while let Some(entry_proposal) = self.proposals.first_entry() {
                if *entry_proposal.key() > entry.index {
                    break;
                }
                let (index, (term, waiter)) = entry_proposal.remove_entry();
                if index == entry.index && term == entry.term {
                    waiters.insert(index, waiter);
                } else {
                    let _ = waiter.send(Err(ProposeError::Overwritten(index)));
                }
            }
        }
        self.fsm
            .send(FsmRequest::Apply { entries, waiters })
            .map_err(|_| NodeError::FsmGone)
    }

    fn persist_conf_state(&mut self, conf_state: ConfState) -> Result<(), NodeError> {
        self.persist(WriteBatch {
            conf_state: Some(conf_state),
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
