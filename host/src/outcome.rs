//! What a proposal or a query comes back as: the apply result, or why the
//! host could not get one. Shared by the raft side, the apply worker and
//! the services, below all of them.

use tokio::sync::oneshot;

use crate::sandbox::CallError;

/// The outcome of applying one proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub result: Result<Vec<u8>, CallError>,
}

/// The outcome of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The applied index the query read at.
    pub index: u64,
    pub result: Result<Vec<u8>, CallError>,
}

/// Where the outcome of a proposal goes: the apply result, or why the host
/// could not get it committed.
pub type ApplyWaiter = oneshot::Sender<Result<Applied, ProposeError>>;

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
    /// Not proposed, and not now: another membership change is in flight,
    /// raft dropped this one, or leadership is moving off the node to be
    /// removed. Sending it again is safe.
    #[error("{0}")]
    NotProposed(String),
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
