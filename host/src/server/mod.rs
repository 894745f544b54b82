//! gRPC services: the client API here, the peer transport's receiving side in `peer.rs`.
//!
//! Untrusted input stops here: a request that is too large, malformed or
//! not encodable becomes a gRPC error with a clear message, never a panic.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::codec::Codec;
use crate::envelope;
use crate::fsm::{Applied, FsmRequest};
use crate::node::{NodeRequest, ProposeError};
use crate::proto;
use crate::proto::{ProposeRequest, ProposeResponse, QueryRequest, QueryResponse, StatusRequest, StatusResponse};
use crate::sandbox::Limits;

pub mod http;
mod peer;
mod propose;
mod status;
mod swap;
pub use peer::PeerGuard;
use propose::host_error;
use status::limits_proto;

/// What clients may ask and how long they may wait: `run`'s flags of that
/// heading, the same names in a `--config` file, and `RAFTIFY_*` variables.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Clients")]
#[serde(default)]
pub struct ClientConfig {
    /// Largest entry a client may propose, in bytes (after encoding).
    #[arg(long, env = "RAFTIFY_MAX_PROPOSAL_BYTES", default_value_t = ClientConfig::DEFAULT.max_proposal_bytes)]
    pub max_proposal_bytes: usize,
    /// How long a proposal or query may wait for its result, in milliseconds.
    #[arg(long, env = "RAFTIFY_REQUEST_TIMEOUT_MS", default_value_t = ClientConfig::DEFAULT.request_timeout_ms)]
    pub request_timeout_ms: u64,
    /// Proposals one `ProposeStream` keeps in flight before reading more.
    #[arg(long, env = "RAFTIFY_STREAM_WINDOW", default_value_t = ClientConfig::DEFAULT.stream_window)]
    pub stream_window: usize,
    /// The largest plugin component `plugin swap` accepts, in bytes.
    #[arg(long, env = "RAFTIFY_MAX_PLUGIN_BYTES", default_value_t = ClientConfig::DEFAULT.max_plugin_bytes)]
    pub max_plugin_bytes: usize,
    /// How long a plugin swap waits for a voter that says nothing of the
    /// new component before it fails, naming it, in milliseconds (voters
    /// still compiling it are waited for).
    #[arg(long, env = "RAFTIFY_SWAP_READY_TIMEOUT_MS", default_value_t = ClientConfig::DEFAULT.swap_ready_timeout_ms)]
    pub swap_ready_timeout_ms: u64,
}

impl ClientConfig {
    pub const DEFAULT: ClientConfig = ClientConfig {
        max_proposal_bytes: 1 << 20,
        request_timeout_ms: 10_000,
        stream_window: 1024,
        max_plugin_bytes: 48 << 20,
        swap_ready_timeout_ms: 60_000,
    };
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig::DEFAULT
    }
}

/// Marks a request made in this process, through [`crate::api::NodeHandle`]
/// (a remote request cannot carry it: extensions never cross the wire). It
/// needs no client certificate; tokens are checked by a layer in front of
/// the services, which in-process calls do not pass.
#[derive(Debug, Clone, Copy)]
pub struct InProcess;

fn in_process<T>(request: &Request<T>) -> bool {
    request.extensions().get::<InProcess>().is_some()
}

/// Shared by both services.
#[derive(Clone)]
pub struct Services {
    pub node: mpsc::Sender<NodeRequest>,
    pub fsm: std_mpsc::Sender<FsmRequest>,
    pub codec: Arc<Codec>,
    pub config: ClientConfig,
    pub listen: String,
    pub trapped_entries: Arc<std::sync::atomic::AtomicU64>,
    /// Why snapshots keep failing ("" while they succeed).
    pub snapshot_error: Arc<std::sync::Mutex<String>>,
    /// The longest one batch of committed entries took to apply, in ms.
    pub longest_apply_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The largest snapshot accepted from a leader.
    pub max_snapshot_bytes: u64,
    /// The largest gRPC message this node sends or accepts.
    pub max_message_bytes: usize,
    /// This node's space limits, and the members whose space alarm is on.
    pub space_config: crate::space::SpaceConfig,
    pub space_alarms: watch::Receiver<std::collections::BTreeSet<u64>>,
    /// The sandbox limits the cluster recorded (`None`: none yet).
    pub cluster_limits: watch::Receiver<Option<Limits>>,
    /// Validates components before a swap is proposed.
    pub sandbox: crate::sandbox::Sandbox,
    pub plugins: Arc<dyn crate::storage::PluginRegistry>,
    /// The stored snapshot, for backups.
    pub snapshots: Arc<dyn crate::storage::SnapshotSource>,
    /// How many client sessions are open, as the apply worker last said.
    pub sessions: Arc<crate::fsm::SessionUsage>,
    /// Turns true when the node starts shutting down.
    pub stopping: watch::Receiver<bool>,
    /// Who leads, as the raft loop last published it.
    pub leadership: watch::Receiver<crate::node::Leadership>,
    /// The highest index the apply worker applied.
    pub applied: watch::Receiver<u64>,
    pub peer: Arc<PeerGuard>,
}

type Pending = oneshot::Receiver<Result<Applied, ProposeError>>;

impl Services {
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// Take a snapshot on this node now (at the next epoch entry the
    /// leader logs), returning its index. The epoch must reach this node
    /// within the request timeout; once it has, the snapshot is being made,
    /// and a large state takes as long as it takes (the caller's own
    /// deadline bounds the wait, up to [`SNAPSHOT_WAIT`]).
    async fn take_snapshot(&self) -> Result<u64, Status> {
        let asked_at = *self.applied.borrow();
        let (reply, mut answer) = oneshot::channel();
        self.fsm
            .send(FsmRequest::Snapshot { reply })
            .map_err(|_| Status::from(ProposeError::Shutdown))?;
        let answered = match tokio::time::timeout(self.timeout(), &mut answer).await {
            Ok(answered) => answered,
            Err(_) if self.peer.link.epochs.latest() >= asked_at.max(1) => {
                tokio::time::timeout(SNAPSHOT_WAIT, answer).await.map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "the snapshot began at an epoch and was not stored within {} s",
                        SNAPSHOT_WAIT.as_secs()
                    ))
                })?
            }
            Err(_) => {
                // Snapshots are taken at an epoch the leader logs: none
                // reached this node in time.
                let space = self.peer.link.space.over();
                return Err(Status::unavailable(format!(
                    "no snapshot within {} ms: snapshots are taken at an epoch entry the leader logs, and none was applied here{}",
                    self.config.request_timeout_ms,
                    if space {
                        " (this node is out of space, and may not be able to log one)"
                    } else {
                        " (is a quorum up?)"
                    }
                )));
            }
        };
        match answered {
            Err(_) => Err(Status::from(ProposeError::Shutdown)),
            Ok(result) => result.map_err(Status::failed_precondition),
        }
    }
}

/// The longest a snapshot already begun is waited for.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3600);

impl Services {
    /// Send a request to the raft loop and wait (bounded) for its answer.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, ProposeError>>) -> NodeRequest,
    ) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.node
            .try_send(request(reply))
            .map_err(|_| Status::resource_exhausted("busy: the node's request queue is full; retry later"))?;
        match tokio::time::timeout(self.timeout(), answer).await {
            Err(_) => Err(Status::from(ProposeError::Timeout(self.config.request_timeout_ms))),
            Ok(Err(_)) => Err(Status::from(ProposeError::Shutdown)),
            Ok(Ok(result)) => result.map_err(Status::from),
        }
    }

    /// The sandbox limits plugin calls run under here: the cluster's once
    /// recorded, else this node's flags.
    fn limits(&self) -> Limits {
        self.cluster_limits
            .borrow()
            .unwrap_or_else(|| Limits::of(self.sandbox.config()))
    }

    async fn node_status(&self) -> Result<crate::node::NodeStatus, Status> {
        let (reply, answer) = oneshot::channel();
        self.node
            .send(NodeRequest::Status { reply })
            .await
            .map_err(|_| Status::from(ProposeError::Shutdown))?;
        answer.await.map_err(|_| Status::from(ProposeError::Shutdown))
    }

    async fn members(&self) -> Result<Vec<proto::Member>, Status> {
        Ok(self
            .node_status()
            .await?
            .members
            .into_iter()
            .map(|(id, addr, voter)| proto::Member { id, addr, voter })
            .collect())
    }
}

#[tonic::async_trait]
impl proto::client_server::Client for Services {
    async fn join(&self, request: Request<proto::JoinRequest>) -> Result<Response<proto::JoinResponse>, Status> {
        // A joiner becomes a peer: over TLS it must show a certificate of
        // the cluster's CA, as peers do (so must `member add`).
        if self.peer.tls {
            self.peer.admit(&request, None)?;
        }
        self.peer.admit_client(&request)?;
        let request = request.into_inner();
        if crate::dial::check_addr(&request.addr).is_err() {
            return Err(Status::invalid_argument(format!("{:?} is not HOST:PORT", request.addr)));
        }
        let applied = self
            .ask(|reply| NodeRequest::Join {
                addr: request.addr,
                requested_id: request.requested_id,
                reply,
            })
            .await?;
        let id = applied
            .result
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| Status::internal("the join committed without an id"))?;
        let first_plugin_sha256 = self
            .plugins
            .history()
            .map_err(|e| Status::internal(e.to_string()))?
            .first()
            .map(|(_, sha)| sha.to_vec())
            .unwrap_or_default();
        Ok(Response::new(proto::JoinResponse {
            id,
            members: self.members().await?,
            first_plugin_sha256,
            cluster_id: self.peer.link.cluster_id,
        }))
    }

    async fn swap_plugin(
        &self,
        request: Request<proto::SwapPluginRequest>,
    ) -> Result<Response<proto::SwapPluginResponse>, Status> {
        self.peer.admit_client(&request)?;
        let done = self.swap(request.into_inner().wasm, None).await?;
        Ok(Response::new(proto::SwapPluginResponse {
            index: done.index,
            sha256: done.sha256,
            message: done.message,
        }))
    }

    type SwapPluginStreamStream = Pin<Box<dyn Stream<Item = Result<proto::SwapProgress, Status>> + Send>>;

    async fn swap_plugin_stream(
        &self,
        request: Request<proto::SwapPluginRequest>,
    ) -> Result<Response<Self::SwapPluginStreamStream>, Status> {
        self.peer.admit_client(&request)?;
        let wasm = request.into_inner().wasm;
        let (progress, updates) = mpsc::channel(16);
        let services = self.clone();
        tokio::spawn(async move {
            if let Err(status) = services.swap(wasm, Some(progress.clone())).await {
                let _ = progress.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            updates,
        ))))
    }

    async fn list_plugins(
        &self,
        _request: Request<proto::ListPluginsRequest>,
    ) -> Result<Response<proto::ListPluginsResponse>, Status> {
        self.peer.admit_client(&_request)?;
        let history = self.plugins.history().map_err(|e| Status::internal(e.to_string()))?;
        let current = self.codec.plugin().sha256();
        let mut plugins = Vec::with_capacity(history.len());
        for (index, sha) in history {
            let size = self
                .plugins
                .blob(&sha)
                .map_err(|e| Status::internal(e.to_string()))?
                .map_or(0, |b| b.len() as u64);
            plugins.push(proto::PluginRecord {
                sha256: hex::encode(sha),
                size,
                active_from_index: index,
                current: false,
            });
        }
        if let Some(last) = plugins.iter_mut().rev().find(|p| p.sha256 == hex::encode(current)) {
            last.current = true;
        }
        Ok(Response::new(proto::ListPluginsResponse { plugins }))
    }

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::SnapshotResponse>, Status> {
        self.peer.admit_client(&request)?;
        let index = self.take_snapshot().await?;
        let first_index = self.node_status().await?.first_index;
        Ok(Response::new(proto::SnapshotResponse { index, first_index }))
    }

    async fn open_session(
        &self,
        request: Request<proto::OpenSessionRequest>,
    ) -> Result<Response<proto::OpenSessionResponse>, Status> {
        self.peer.admit_client(&request)?;
        let data = envelope::host(&envelope::HostEntry::OpenSession);
        let applied = self.ask(|reply| NodeRequest::Propose { data, reply }).await?;
        let session_id = applied
            .result
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| Status::internal("the session opened without an id"))?;
        Ok(Response::new(proto::OpenSessionResponse { session_id }))
    }

    type SaveSnapshotStream = Pin<Box<dyn Stream<Item = Result<proto::BackupChunk, Status>> + Send>>;

    async fn save_snapshot(
        &self,
        request: Request<proto::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        self.peer.admit_client(&request)?;
        self.take_snapshot().await?;
        let (chunks, stream) = mpsc::channel(4);
        let (snapshots, plugins) = (self.snapshots.clone(), self.plugins.clone());
        let taken_by = (self.peer.link.cluster_id, self.peer.link.self_id);
        // Pieces well under the message limit, whatever it is set to.
        let piece_bytes = (self.max_message_bytes / 2).clamp(1, 1 << 20);
        tokio::task::spawn_blocking(move || {
            let mut send = |data: Vec<u8>, total_bytes: u64| {
                chunks
                    .blocking_send(Ok(proto::BackupChunk { data, total_bytes }))
                    .is_ok()
            };
            if let Err(error) = crate::backup::stream(&*snapshots, &*plugins, taken_by, piece_bytes, &mut send) {
                tracing::warn!("a backup failed: {error:#}");
                let _ = chunks.blocking_send(Err(Status::unavailable(format!("the backup failed: {error:#}"))));
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            stream,
        ))))
    }
    async fn disarm_alarms(
        &self,
        request: Request<proto::DisarmAlarmsRequest>,
    ) -> Result<Response<proto::DisarmAlarmsResponse>, Status> {
        self.peer.admit_client(&request)?;
        let members: Vec<u64> = self.space_alarms.borrow().iter().copied().collect();
        let (reply, answer) = oneshot::channel();
        self.node
            .send(NodeRequest::DisarmAlarms { reply })
            .await
            .map_err(|_| Status::from(ProposeError::Shutdown))?;
        answer
            .await
            .map_err(|_| Status::from(ProposeError::Shutdown))?
            .map_err(Status::from)?;
        Ok(Response::new(proto::DisarmAlarmsResponse { members }))
    }

    async fn set_limits(
        &self,
        request: Request<proto::SetLimitsRequest>,
    ) -> Result<Response<proto::SetLimitsResponse>, Status> {
        self.peer.admit_client(&request)?;
        let change = request.into_inner();
        let current = self.limits();
        let limits = Limits {
            fuel_per_call: change.fuel_per_call.unwrap_or(current.fuel_per_call),
            fuel_per_snapshot: change.fuel_per_snapshot.unwrap_or(current.fuel_per_snapshot),
            max_memory_bytes: change.max_memory_bytes.unwrap_or(current.max_memory_bytes),
            max_result_bytes: change.max_result_bytes.unwrap_or(current.max_result_bytes),
        };
        limits
            .check()
            .map_err(|why| Status::invalid_argument(format!("limits refused: {why}")))?;
        // A result must fit in one message, by this node's transport limit.
        let room = (self.max_message_bytes as u64).saturating_sub(64 << 10);
        if limits.max_result_bytes > room {
            return Err(Status::invalid_argument(format!(
                "limits refused: max_result_bytes ({}) must leave 64 KiB of room under this node's max_message_bytes ({})",
                limits.max_result_bytes, self.max_message_bytes
            )));
        }
        let data = envelope::host(&envelope::HostEntry::Limits(limits));
        let applied = self.ask(|reply| NodeRequest::Propose { data, reply }).await?;
        Ok(Response::new(proto::SetLimitsResponse {
            index: applied.index,
            limits: Some(limits_proto(&limits)),
        }))
    }

    async fn remove_member(
        &self,
        request: Request<proto::RemoveMemberRequest>,
    ) -> Result<Response<proto::MembersResponse>, Status> {
        self.peer.admit_client(&request)?;
        let id = request.into_inner().id;
        self.ask(|reply| NodeRequest::RemoveMember { id, reply }).await?;
        Ok(Response::new(proto::MembersResponse {
            members: self.members().await?,
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderResponse>, Status> {
        self.peer.admit_client(&request)?;
        let id = request.into_inner().id;
        self.ask(|reply| NodeRequest::TransferLeader { id, reply }).await?;
        // Leadership moves within an election timeout or not at all.
        let deadline = tokio::time::Instant::now() + self.timeout();
        loop {
            let status = self.node_status().await?;
            if status.leader_id == id {
                return Ok(Response::new(proto::TransferLeaderResponse { leader_id: id }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "leadership did not move to node {id} within {} ms (the leader is node {})",
                    self.config.request_timeout_ms, status.leader_id
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn propose(&self, request: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        self.peer.admit_client(&request)?;
        let pending = self.submit(request.into_inner()).await?;
        self.finish(pending).await.map(Response::new)
    }

    type ProposeStreamStream = Pin<Box<dyn Stream<Item = Result<ProposeResponse, Status>> + Send>>;

    async fn propose_stream(
        &self,
        request: Request<Streaming<ProposeRequest>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        self.peer.admit_client(&request)?;
        let submitter = self.clone();
        let finisher = self.clone();
        let window = self.config.stream_window.max(1);
        let responses = request
            .into_inner()
            // `then` submits one at a time, in order: entries enter the log
            // in the order the client sent them.
            .then(move |request| {
                let services = submitter.clone();
                async move {
                    match request {
                        Ok(request) => services.submit(request).await,
                        Err(status) => Err(status),
                    }
                }
            })
            // `buffered` waits for many results at once but yields them in order.
            .map(move |submitted| {
                let services = finisher.clone();
                async move {
                    let response = match submitted {
                        Ok(pending) => services.finish(pending).await,
                        Err(status) => Err(status),
                    };
                    Ok(response.unwrap_or_else(host_error))
                }
            })
            .buffered(window);
        Ok(Response::new(Box::pin(responses)))
    }

    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        self.peer.admit_client(&request)?;
        self.answer_query(request.into_inner()).await.map(Response::new)
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.peer.admit_client(&request)?;
        let status = self.node_status().await?;
        Ok(Response::new(self.status_response(status)))
    }
}
