//! The raft side of a node: a sans-IO [`core`] that owns the `RawNode`
//! and its bookkeeping, and the [`driver`] task that runs it, doing its IO
//! (the persister, the transport, the apply worker's queue).
//!
//! - `core.rs`: events in (tick, request, message, persisted, applied),
//!   actions out (send, persist, apply, restore, peer change, snapshot);
//! - `membership.rs`: joins, removals, promotions, leadership transfer;
//! - `reads.rs`: ReadIndex requests and their retries;
//! - `driver.rs`: the tokio task;
//! - `tests.rs`: clusters of cores driven by hand, with no IO at all.

mod core;
mod driver;
mod membership;
mod reads;
mod ready;
#[cfg(test)]
mod tests;

pub use driver::Node;

use raft::StateRole;
use raft::prelude::Message;
use tokio::sync::oneshot;

use crate::firewall::Refusal;
use crate::outcome::ApplyWaiter;
pub use crate::outcome::ProposeError;
use crate::storage::StoreError;

/// Raft timing and flow control: `run`'s flags of that heading, the same
/// names in a `--config` file, and `RAFTIFY_*` variables.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Raft")]
#[serde(default)]
pub struct RaftConfig {
    /// Raft clock period in milliseconds.
    #[arg(long, env = "RAFTIFY_TICK_INTERVAL_MS", default_value_t = RaftConfig::DEFAULT.tick_interval_ms)]
    pub tick_interval_ms: u64,
    /// Ticks without a leader before a follower campaigns.
    #[arg(long, env = "RAFTIFY_ELECTION_TICKS", default_value_t = RaftConfig::DEFAULT.election_ticks)]
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    #[arg(long, env = "RAFTIFY_HEARTBEAT_TICKS", default_value_t = RaftConfig::DEFAULT.heartbeat_ticks)]
    pub heartbeat_ticks: usize,
    /// Append messages in flight to one follower before waiting for acks.
    #[arg(long, env = "RAFTIFY_MAX_INFLIGHT_MESSAGES", default_value_t = RaftConfig::DEFAULT.max_inflight_messages)]
    pub max_inflight_messages: usize,
    /// Bytes of entries in one append message.
    #[arg(
        long,
        env = "RAFTIFY_MAX_ENTRIES_BYTES_PER_MESSAGE",
        default_value_t = RaftConfig::DEFAULT.max_entries_bytes_per_message
    )]
    pub max_entries_bytes_per_message: u64,
    /// Proposals this node waits on before it answers "busy".
    #[arg(long, env = "RAFTIFY_MAX_PENDING_PROPOSALS", default_value_t = RaftConfig::DEFAULT.max_pending_proposals)]
    pub max_pending_proposals: usize,
    /// A learner is promoted to voter once it is within this many entries
    /// of the leader's log.
    #[arg(long, env = "RAFTIFY_PROMOTE_LAG_ENTRIES", default_value_t = RaftConfig::DEFAULT.promote_lag_entries)]
    pub promote_lag_entries: u64,
}

impl RaftConfig {
    pub const DEFAULT: RaftConfig = RaftConfig {
        tick_interval_ms: 100,
        election_ticks: 10,
        heartbeat_ticks: 2,
        max_inflight_messages: 256,
        max_entries_bytes_per_message: 1 << 20,
        max_pending_proposals: 100_000,
        promote_lag_entries: 64,
    };
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig::DEFAULT
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

/// Linearizable reads this node answered since it started, and how many of
/// them needed their ReadIndex request sent again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounts {
    pub served: u64,
    pub retried: u64,
}

/// Who leads, as one node sees it: what [`crate::api::NodeHandle::leadership`]
/// watches. It changes only with the role, the term or the leader, never
/// with the commit index, so a watcher wakes for elections, not for writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    /// This node's id.
    pub id: u64,
    /// "leader", "follower", "candidate" or "pre-candidate".
    pub role: &'static str,
    /// The leader this node knows of (0: none).
    pub leader_id: u64,
    pub term: u64,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.leader_id != 0 && self.leader_id == self.id
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
