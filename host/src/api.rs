//! Embedding a node in a Rust program, as raftify's users do: [`Node::start`]
//! runs a node in this process (the same node `raftify-host run` runs: its
//! raft loop, apply worker and the gRPC server its peers and remote clients
//! use), and a cloneable [`NodeHandle`] proposes and reads locally, changes
//! the membership, snapshots, swaps the plugin and reads the status.
//!
//! Calls through the handle go through the same checks as the gRPC API
//! (sizes, the space alarm, the plugin's codec) without leaving the
//! process; they need no token or client certificate: the program that
//! embeds the node is trusted.
//!
//! Writes and membership changes are the leader's: on another node they
//! fail with [`ErrorKind::NotLeader`], and [`Error::leader_addr`] says
//! where the leader is. Reads are served by any node.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tonic::Request;

use crate::config::NodeConfig;
use crate::dial::{LEADER_ADDR_KEY, NOT_LEADER_KEY, NOT_PROPOSED_KEY};
use crate::proto::client_server::Client as _;
use crate::proto::{self, propose_request, propose_response, query_request, query_response};
use crate::server::Services;

pub use crate::node::Leadership;
pub use crate::proto::StatusResponse as NodeStatus;

/// A node running in this process. Dropping it stops the node (without
/// waiting); [`Node::stop`] stops it and waits.
pub struct Node {
    handle: NodeHandle,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    /// Start a node as `raftify-host run` would with `config` (see
    /// [`NodeConfig::new`]), listening on `config.listen`. Returns once the
    /// node serves: its store is open, its plugin loaded and its state
    /// restored.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        Node::start_on(config, listener).await
    }

    /// [`Node::start`] on a listener already bound to `config.listen` (bind
    /// several to port 0 first to learn the addresses of a new cluster's
    /// `peers`).
    pub async fn start_on(config: NodeConfig, listener: tokio::net::TcpListener) -> anyhow::Result<Node> {
        Node::start_with(config, listener, crate::daemon::PeerNetwork::Grpc).await
    }

    /// [`Node::start_on`], reaching its peers through `router` (in-process
    /// test clusters; clients still reach it on `listener`).
    #[cfg(test)]
    pub(crate) async fn start_routed(
        config: NodeConfig,
        listener: tokio::net::TcpListener,
        router: std::sync::Arc<crate::transport::router::Router>,
    ) -> anyhow::Result<Node> {
        Node::start_with(config, listener, crate::daemon::PeerNetwork::Routed(router)).await
    }

    async fn start_with(
        config: NodeConfig,
        listener: tokio::net::TcpListener,
        network: crate::daemon::PeerNetwork,
    ) -> anyhow::Result<Node> {
        config.validate()?;
        let addr = config.listen.clone();
        let (started_tx, started_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped `Node` stops the node as well.
            let _ = stop_rx.await;
        };
        let mut task = tokio::spawn(crate::daemon::serve(
            config,
            listener,
            shutdown,
            Some(started_tx),
            network,
        ));
        let services = tokio::select! {
            started = started_rx => started.ok(),
            finished = &mut task => {
                return Err(match finished {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => anyhow::anyhow!("the node stopped while starting"),
                    Err(_) => anyhow::anyhow!("the node panicked while starting"),
                });
            }
        };
        let Some(services) = services else {
            return Err(match task.await {
                Ok(Err(error)) => error,
                _ => anyhow::anyhow!("the node stopped while starting"),
            });
        };
        Ok(Node {
            handle: NodeHandle { services },
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// A handle to call the node with (cheap to clone, usable from any task).
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// The address the node serves peers and remote clients on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stop the node as SIGTERM stops `raftify-host run` (a leader hands
    /// leadership over first) and wait until it has stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|_| anyhow::anyhow!("the node panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Calls into a node in this process.
#[derive(Clone)]
pub struct NodeHandle {
    services: Services,
}

/// What a command came to once applied on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The log index of the entry (for a query: the index it was answered at).
    pub index: u64,
    /// The plugin's result bytes, or its error (replicated like a result).
    pub result: Result<Vec<u8>, PluginFailure>,
    /// The result as text, through the plugin's codec.
    pub text: String,
}

/// How a plugin call failed: the same on every replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginFailure {
    /// The plugin returned an error.
    #[error("{0}")]
    Error(String),
    /// The plugin trapped (panic, fuel, memory); its instance was rebuilt.
    #[error("the plugin trapped: {0}")]
    Trap(String),
}

/// A client session for exactly-once proposals ([`NodeHandle::open_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// The session's id: the index of the entry that opened it.
    pub id: u64,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began (ReadIndex).
    Linearizable,
    /// This node's state as it is, however far behind.
    Stale,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    leader_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Only the leader does this; nothing was proposed.
    NotLeader,
    /// Too much at once, or no space; retry later.
    Busy,
    /// Not now (no quorum, shutting down, a membership change in progress):
    /// retrying later may work.
    Unavailable,
    /// No result in time: a write may or may not have been committed.
    Timeout,
    /// The request can never succeed as given.
    Invalid,
    /// Refused in this state (a snapshot that failed, a swap refused).
    Refused,
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether a write may or may not have taken effect: send it again in
    /// its session (the same sequence) to learn which, safely.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout | ErrorKind::Unavailable | ErrorKind::Internal
        )
    }

    /// With [`ErrorKind::NotLeader`]: the leader's address, if known.
    pub fn leader_addr(&self) -> Option<&str> {
        self.leader_addr.as_deref()
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Error {
        use tonic::Code;
        let not_leader = status.metadata().get(NOT_LEADER_KEY).is_some();
        let kind = match status.code() {
            Code::FailedPrecondition if not_leader => ErrorKind::NotLeader,
            Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated => ErrorKind::Refused,
            Code::ResourceExhausted => ErrorKind::Busy,
            Code::Unavailable | Code::Aborted => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        };
        let leader_addr = status
            .metadata()
            .get(LEADER_ADDR_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Error {
            kind,
            message: status.message().to_string(),
            leader_addr,
        }
    }
}

/// An in-process request: it passes the client-certificate check a remote
/// one must (see `PeerGuard::admit_client`).
fn local<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(crate::server::InProcess);
    request
}

impl NodeHandle {
    /// The services behind the handle (tests that call the peer side).
    #[cfg(test)]
    pub(crate) fn services(&self) -> &Services {
        &self.services
    }

    /// Replicate a command, given as text for the plugin's codec (for the
    /// kv plugin: `set k v`), and wait until it is applied here.
    pub async fn propose(&self, text: &str) -> Result<Applied, Error> {
        self.propose_command(propose_request::Command::Text(text.to_string()))
            .await
    }

    /// Replicate a command given as the entry's bytes (already encoded).
    pub async fn propose_entry(&self, entry: Vec<u8>) -> Result<Applied, Error> {
        self.propose_command(propose_request::Command::Entry(entry)).await
    }

    /// Open a client session (on the leader), for exactly-once proposals
    /// with [`NodeHandle::propose_in`].
    pub async fn open_session(&self) -> Result<Session, Error> {
        let opened = self
            .services
            .open_session(local(proto::OpenSessionRequest {}))
            .await?
            .into_inner();
        Ok(Session { id: opened.session_id })
    }

    /// Propose `text` as number `sequence` (1, 2, 3, ...) of `session`.
    /// Every replica applies it at most once: sent again, through this
    /// handle or another node's, after an error that left the outcome
    /// unknown ([`Error::outcome_unknown`]), it returns the first apply's
    /// result. A session keeps its last 128 results: keep no more in
    /// flight.
    pub async fn propose_in(&self, session: Session, sequence: u64, text: &str) -> Result<Applied, Error> {
        self.send_proposal(proto::ProposeRequest {
            command: Some(propose_request::Command::Text(text.to_string())),
            session_id: session.id,
            sequence,
            ..Default::default()
        })
        .await
    }

    async fn propose_command(&self, command: propose_request::Command) -> Result<Applied, Error> {
        self.send_proposal(proto::ProposeRequest {
            command: Some(command),
            ..Default::default()
        })
        .await
    }

    async fn send_proposal(&self, request: proto::ProposeRequest) -> Result<Applied, Error> {
        let response = self.services.propose(local(request)).await?.into_inner();
        let result = match response.outcome {
            Some(propose_response::Outcome::Ok(bytes)) => Ok(bytes),
            Some(propose_response::Outcome::PluginError(message)) => Err(PluginFailure::Error(message)),
            Some(propose_response::Outcome::Trap(message)) => Err(PluginFailure::Trap(message)),
            Some(propose_response::Outcome::HostError(error)) => {
                return Err(tonic::Status::new(error.code.into(), error.message).into());
            }
            None => return Err(tonic::Status::internal("an answer without an outcome").into()),
        };
        Ok(Applied::new(response.index, result, response.text, response.text_is_ok))
    }

    /// Read from the state machine, with a query given as text for the
    /// plugin's codec (for the kv plugin: `get k`).
    pub async fn query(&self, text: &str, consistency: Consistency) -> Result<Applied, Error> {
        let request = proto::QueryRequest {
            request: Some(query_request::Request::Text(text.to_string())),
            consistency: match consistency {
                Consistency::Linearizable => proto::Consistency::Linearizable,
                Consistency::Stale => proto::Consistency::Stale,
            } as i32,
        };
        let response = self.services.query(local(request)).await?.into_inner();
        let result = match response.outcome {
            Some(query_response::Outcome::Ok(bytes)) => Ok(bytes),
            Some(query_response::Outcome::PluginError(message)) => Err(PluginFailure::Error(message)),
            Some(query_response::Outcome::Trap(message)) => Err(PluginFailure::Trap(message)),
            None => return Err(tonic::Status::internal("an answer without an outcome").into()),
        };
        Ok(Applied::new(response.index, result, response.text, response.text_is_ok))
    }

    /// Register a node at `addr` as a learner (promoted to voter once it
    /// has caught up) and return its id; then start it with
    /// `join = Some(any member)` and that id. `requested_id` 0: the next
    /// unused id.
    /// Raft takes one membership change at a time: this waits out one
    /// still in flight (up to the request timeout), as `remove_member` does.
    pub async fn add_member(&self, addr: &str, requested_id: u64) -> Result<u64, Error> {
        let request = proto::JoinRequest {
            addr: addr.to_string(),
            requested_id,
        };
        let joined = self
            .until_proposed(|| self.services.join(local(request.clone())))
            .await?;
        Ok(joined.into_inner().id)
    }

    /// Remove a member (the leader too: it hands leadership over first,
    /// and this waits for that). A membership change still in flight is
    /// waited out, up to the request timeout.
    pub async fn remove_member(&self, id: u64) -> Result<(), Error> {
        self.until_proposed(|| self.services.remove_member(local(proto::RemoveMemberRequest { id })))
            .await?;
        Ok(())
    }

    /// Send a membership request again while the node answers that it was
    /// not proposed (not now: another change in flight, leadership moving),
    /// until the request timeout. Any other answer, an unknown outcome
    /// included, is the caller's.
    async fn until_proposed<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.services.timeout();
        loop {
            match call().await {
                Err(status)
                    if status.metadata().get(NOT_PROPOSED_KEY).is_some() && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answer => return answer.map_err(Error::from),
            }
        }
    }

    /// Move leadership to voter `id`; returns once it has moved.
    pub async fn transfer_leader(&self, id: u64) -> Result<(), Error> {
        self.services
            .transfer_leader(local(proto::TransferLeaderRequest { id }))
            .await?;
        Ok(())
    }

    /// Take a snapshot on this node now and compact its log; returns the
    /// snapshot's index.
    pub async fn snapshot(&self) -> Result<u64, Error> {
        Ok(self
            .services
            .snapshot(local(proto::SnapshotRequest {}))
            .await?
            .into_inner()
            .index)
    }

    /// Hot-swap the cluster's plugin through the log; returns the index it
    /// became active at and its SHA-256 (hex).
    pub async fn swap_plugin(&self, wasm: Vec<u8>) -> Result<(u64, String), Error> {
        let swapped = self
            .services
            .swap_plugin(local(proto::SwapPluginRequest { wasm }))
            .await?
            .into_inner();
        Ok((swapped.index, swapped.sha256))
    }

    /// The node's state: role, leader, indexes, members, plugin, space,
    /// epochs, limits.
    pub async fn status(&self) -> Result<NodeStatus, Error> {
        Ok(self.services.status(local(proto::StatusRequest {})).await?.into_inner())
    }

    /// Who leads, as this node sees it: a watch that changes with the role,
    /// the term or the leader (elections, not writes), with no request to
    /// the node.
    pub fn leadership(&self) -> Watch<Leadership> {
        Watch(self.services.leadership.clone())
    }

    /// The highest log index this node has applied, as it grows: wait on it
    /// (`wait_for(|&i| i >= index)`) instead of polling `status`.
    pub fn applied_index(&self) -> Watch<u64> {
        Watch(self.services.applied.clone())
    }

    /// Wait until this node knows a leader (or `within` passes); returns
    /// the leader's id.
    pub async fn wait_for_leader(&self, within: Duration) -> Result<u64, Error> {
        let mut leadership = self.leadership();
        match tokio::time::timeout(within, leadership.wait_for(|l| l.leader_id != 0)).await {
            Ok(known) => Ok(known?.leader_id),
            Err(_) => {
                Err(tonic::Status::unavailable(format!("no leader known within {} ms", within.as_millis())).into())
            }
        }
    }
}

/// A value the node publishes as it changes. It hands out copies, never a
/// borrow of the value (as a bare `tokio::sync::watch::Receiver` would), so
/// no caller can hold up the raft loop or the apply worker that publishes.
#[derive(Debug, Clone)]
pub struct Watch<T>(watch::Receiver<T>);

impl<T: Clone> Watch<T> {
    /// The latest value.
    pub fn get(&self) -> T {
        self.0.borrow().clone()
    }

    /// Wait for a value newer than the last one this watch returned.
    pub async fn changed(&mut self) -> Result<T, Error> {
        self.0.changed().await.map_err(|_| stopped())?;
        Ok(self.0.borrow_and_update().clone())
    }

    /// Wait until the value satisfies `ok` (at once if it already does).
    pub async fn wait_for(&mut self, ok: impl FnMut(&T) -> bool) -> Result<T, Error> {
        match self.0.wait_for(ok).await {
            Ok(value) => Ok(value.clone()),
            Err(_) => Err(stopped()),
        }
    }
}

fn stopped() -> Error {
    tonic::Status::from(crate::node::ProposeError::Shutdown).into()
}

impl Applied {
    /// From an answer's parts: its text is the result's bytes themselves
    /// when the node said they are their own text.
    fn new(index: u64, result: Result<Vec<u8>, PluginFailure>, text: String, text_is_ok: bool) -> Applied {
        let text = match &result {
            Ok(bytes) if text_is_ok => String::from_utf8_lossy(bytes).into_owned(),
            Ok(_) => text,
            Err(failure) => failure.to_string(),
        };
        Applied { index, result, text }
    }
}
