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

use crate::codec::{Codec, CodecError};
use crate::envelope;
use crate::fsm::{Answered, Applied, FsmRequest};
use crate::node::{NodeRequest, ProposeError};
use crate::proto;
use crate::proto::{
    HostError, ProposeRequest, ProposeResponse, QueryRequest, QueryResponse, StatusRequest, StatusResponse,
};
use crate::sandbox::{CallError, Limits};

pub mod http;
mod peer;
mod swap;
pub use peer::PeerGuard;

/// Client-facing limits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientConfig {
    /// Largest entry a client may propose, in bytes (after encoding).
    pub max_proposal_bytes: usize,
    /// How long a proposal or query may wait for its result.
    pub request_timeout_ms: u64,
    /// Proposals one `ProposeStream` keeps in flight before reading more.
    pub stream_window: usize,
    /// The largest plugin component `plugin swap` accepts, in bytes.
    pub max_plugin_bytes: usize,
    /// How long a swap waits for a voter that says nothing of the new
    /// component (voters still compiling it are waited for).
    #[serde(default = "default_swap_ready_timeout_ms")]
    pub swap_ready_timeout_ms: u64,
}

fn default_swap_ready_timeout_ms() -> u64 {
    60_000
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_proposal_bytes: 1 << 20,
            request_timeout_ms: 10_000,
            stream_window: 1024,
            max_plugin_bytes: 48 << 20,
            swap_ready_timeout_ms: default_swap_ready_timeout_ms(),
        }
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
    pub peer: Arc<PeerGuard>,
}

type Pending = oneshot::Receiver<Result<Applied, ProposeError>>;

impl Services {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// Take a snapshot on this node now (at the next epoch entry the
    /// leader logs), returning its index.
    async fn take_snapshot(&self) -> Result<u64, Status> {
        let (reply, answer) = oneshot::channel();
        self.fsm
            .send(FsmRequest::Snapshot { reply })
            .map_err(|_| propose_status(ProposeError::Shutdown))?;
        let index = match tokio::time::timeout(self.timeout(), answer).await {
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
            Ok(Err(_)) => return Err(propose_status(ProposeError::Shutdown)),
            Ok(Ok(result)) => result.map_err(Status::failed_precondition)?,
        };
        Ok(index)
    }

    /// A codec call, inline: its fuel budget keeps it to milliseconds.
    /// Run a codec call on this request's task. A call on a large input may
    /// burn its fuel for a while (interpreted plugins spend thousands of
    /// units per byte), so it first hands the worker's other tasks (the raft
    /// loop among them) to another thread.
    async fn codec_call<T>(
        &self,
        input_len: usize,
        f: impl FnOnce(&Codec) -> Result<T, CodecError>,
    ) -> Result<T, CodecError> {
        const INLINE_MAX_BYTES: usize = 16 << 10;
        let multi_thread =
            tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        if input_len > INLINE_MAX_BYTES && multi_thread {
            tokio::task::block_in_place(|| f(&self.codec))
        } else {
            f(&self.codec)
        }
    }

    async fn encode(&self, text: String) -> Result<Vec<u8>, Status> {
        self.codec_call(text.len(), move |codec| codec.encode(&text))
            .await
            .map_err(|e| Status::invalid_argument(format!("cannot encode the command: {e}")))
    }

    /// Validate a proposal and queue it in the raft loop. Returns once the
    /// entry has its place in the queue, so callers that submit in sequence
    /// get their entries into the log in that sequence.
    /// While any member's space alarm is on, writes that grow the state
    /// are refused, alike on every node (the alarm is in the log).
    fn check_space(&self, bytes: u64) -> Result<(), Status> {
        // Read in place: this runs on every proposal.
        let alarmed: Vec<String> = self.space_alarms.borrow().iter().map(u64::to_string).collect();
        let members: Vec<String> = if !alarmed.is_empty() {
            alarmed
        } else if !self.peer.link.space.admit(bytes, &self.space_config) {
            // Not yet in the log: this write would take this node past its
            // quota, and its alarm is on the way.
            vec![self.peer.link.self_id.to_string()]
        } else {
            return Ok(());
        };
        Err(Status::resource_exhausted(format!(
            "no space: the space alarm is on for node {} (this node's quota is {} bytes, quota_bytes, with {} bytes \
             kept free on its disk, min_free_bytes); writes that grow the state are refused, reads are served. \
             To free space: delete data (`propose --frees-space`), take a snapshot on each node (`snapshot`, \
             which compacts the log), defragment each node while it is stopped (`defrag --data-dir`), or raise \
             --quota-bytes; the alarm clears by itself once usage is back under the limits (or `alarm disarm`)",
            members.join(", "),
            self.space_config.quota_bytes,
            self.space_config.min_free_bytes
        )))
    }

    async fn submit(&self, request: ProposeRequest) -> Result<Pending, Status> {
        let frees_space = request.frees_space;
        let entry = match request.command {
            Some(proto::propose_request::Command::Entry(bytes)) => bytes,
            Some(proto::propose_request::Command::Text(text)) => self.encode(text).await?,
            None => {
                return Err(Status::invalid_argument(
                    "the proposal has no command: set `entry` or `text`",
                ));
            }
        };
        if entry.len() > self.config.max_proposal_bytes {
            return Err(Status::invalid_argument(format!(
                "the proposal is {} bytes; the limit is {} (max_proposal_bytes)",
                entry.len(),
                self.config.max_proposal_bytes
            )));
        }
        if !frees_space {
            self.check_space(entry.len() as u64)?;
        }
        let data = match (request.session_id, request.sequence) {
            (0, 0) => envelope::command(&entry),
            (0, _) => {
                return Err(Status::invalid_argument(
                    "a sequence number needs a session_id (OpenSession)",
                ));
            }
            (_, 0) => return Err(Status::invalid_argument("a session's sequence numbers start at 1")),
            (session, seq) => envelope::session_command(session, seq, &entry),
        };
        let (reply, pending) = oneshot::channel();
        let request = NodeRequest::Propose { data, reply };
        match self.node.try_send(request) {
            Ok(()) => Ok(pending),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Status::resource_exhausted(
                "busy: the node's request queue is full; retry later",
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(propose_status(ProposeError::Shutdown)),
        }
    }

    async fn finish(&self, pending: Pending) -> Result<ProposeResponse, Status> {
        let applied = match tokio::time::timeout(self.timeout(), pending).await {
            Err(_) => {
                return Err(propose_status(ProposeError::Timeout(self.config.request_timeout_ms)));
            }
            Ok(Err(_)) => return Err(propose_status(ProposeError::Shutdown)),
            Ok(Ok(Err(error))) => return Err(propose_status(error)),
            Ok(Ok(Ok(applied))) => applied,
        };
        let (outcome, rendered) = self.outcome(applied.result).await?;
        Ok(ProposeResponse {
            index: applied.index,
            outcome: Some(outcome.into_propose()),
            text: rendered.text,
            render_error: rendered.render_error,
            text_is_ok: rendered.text_is_ok,
        })
    }

    /// The outcome and its rendered text. A failed render loses only the
    /// display: the result stands. A result too large for one of this
    /// node's messages is a clear error rather than a transport failure.
    async fn outcome(&self, result: Result<Vec<u8>, CallError>) -> Result<(Outcome, Rendered), Status> {
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(CallError::Guest(message)) => return Ok((Outcome::PluginError(message), Rendered::default())),
            Err(CallError::Trap(message)) => return Ok((Outcome::Trap(message), Rendered::default())),
        };
        let room = self.max_message_bytes.saturating_sub(RESPONSE_ROOM_BYTES);
        if bytes.len() > room {
            return Err(Status::resource_exhausted(format!(
                "the result is {} bytes; this node's answers carry at most {room} (max_message_bytes less 64 KiB): \
                 raise max_message_bytes, or lower the cluster's max_result_bytes (`raftify-host limits set`)",
                bytes.len()
            )));
        }
        let rendered = if bytes.len() > RENDER_MAX_BYTES {
            // Rendering costs in proportion to the result, on this node's
            // request threads: a large one is shown as its bytes.
            match std::str::from_utf8(&bytes) {
                Ok(_) => Rendered::same_as_ok(),
                Err(_) => Rendered::failed(format!(
                    "not rendered: the result is {} bytes, over the {RENDER_MAX_BYTES} bytes rendered, and not UTF-8",
                    bytes.len()
                )),
            }
        } else {
            let input = bytes.clone();
            match self.codec_call(input.len(), move |codec| codec.render(&input)).await {
                Ok(text) if text.as_bytes() == bytes.as_slice() => Rendered::same_as_ok(),
                Ok(text) => Rendered {
                    text,
                    ..Rendered::default()
                },
                Err(error) => Rendered::failed(error.to_string()),
            }
        };
        Ok((Outcome::Ok(bytes), rendered))
    }

    async fn read_index(&self, deadline: tokio::time::Instant) -> Result<u64, Status> {
        let (reply, answer) = oneshot::channel();
        self.node
            .try_send(NodeRequest::ReadIndex { reply })
            .map_err(|_| Status::resource_exhausted("busy: the node's request queue is full; retry later"))?;
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Err(propose_status(ProposeError::ReadTimeout(
                self.config.request_timeout_ms,
            ))),
            Ok(Err(_)) => Err(propose_status(ProposeError::Shutdown)),
            Ok(Ok(result)) => result.map_err(propose_status),
        }
    }
}

/// Results larger than this are not passed to the plugin's `render`.
const RENDER_MAX_BYTES: usize = 64 << 10;

/// Room left in an answer for everything but the result.
const RESPONSE_ROOM_BYTES: usize = 64 << 10;

/// A result's text, as an answer carries it: never the result twice.
#[derive(Default)]
struct Rendered {
    text: String,
    render_error: String,
    /// The text is the result's bytes as they are (UTF-8), so it is not
    /// sent a second time.
    text_is_ok: bool,
}

impl Rendered {
    fn same_as_ok() -> Rendered {
        Rendered {
            text_is_ok: true,
            ..Rendered::default()
        }
    }

    fn failed(render_error: String) -> Rendered {
        Rendered {
            render_error,
            ..Rendered::default()
        }
    }
}

enum Outcome {
    Ok(Vec<u8>),
    PluginError(String),
    Trap(String),
}

impl Outcome {
    fn into_propose(self) -> proto::propose_response::Outcome {
        use proto::propose_response::Outcome as O;
        match self {
            Outcome::Ok(b) => O::Ok(b),
            Outcome::PluginError(m) => O::PluginError(m),
            Outcome::Trap(m) => O::Trap(m),
        }
    }

    fn into_query(self) -> proto::query_response::Outcome {
        use proto::query_response::Outcome as O;
        match self {
            Outcome::Ok(b) => O::Ok(b),
            Outcome::PluginError(m) => O::PluginError(m),
            Outcome::Trap(m) => O::Trap(m),
        }
    }
}

pub use crate::dial::{LEADER_ADDR_KEY, NOT_LEADER_KEY};

fn propose_status(error: ProposeError) -> Status {
    let message = error.to_string();
    match error {
        ProposeError::NotLeader { leader_addr, .. } => {
            let mut status = Status::failed_precondition(message);
            status
                .metadata_mut()
                .insert(NOT_LEADER_KEY, tonic::metadata::MetadataValue::from_static("1"));
            if let Some(addr) = leader_addr.and_then(|a| a.parse().ok()) {
                status.metadata_mut().insert(LEADER_ADDR_KEY, addr);
            }
            status
        }
        ProposeError::Busy(_) => Status::resource_exhausted(message),
        ProposeError::Dropped(_) | ProposeError::Shutdown => Status::unavailable(message),
        ProposeError::Overwritten(_) => Status::aborted(message),
        ProposeError::Timeout(_) => Status::deadline_exceeded(message),
        ProposeError::ReadTimeout(_) => Status::unavailable(message),
        ProposeError::Retry(_) => Status::unavailable(message),
        ProposeError::Invalid(_) => Status::invalid_argument(message),
    }
}

fn host_error(status: Status) -> ProposeResponse {
    let leader_addr = status
        .metadata()
        .get(LEADER_ADDR_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ProposeResponse {
        index: 0,
        outcome: Some(proto::propose_response::Outcome::HostError(HostError {
            code: status.code() as i32,
            message: status.message().to_string(),
            leader_addr,
        })),
        text: String::new(),
        render_error: String::new(),
        text_is_ok: false,
    }
}

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
            Err(_) => Err(propose_status(ProposeError::Timeout(self.config.request_timeout_ms))),
            Ok(Err(_)) => Err(propose_status(ProposeError::Shutdown)),
            Ok(Ok(result)) => result.map_err(propose_status),
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
            .map_err(|_| propose_status(ProposeError::Shutdown))?;
        answer.await.map_err(|_| propose_status(ProposeError::Shutdown))
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
            .map_err(|_| propose_status(ProposeError::Shutdown))?;
        answer
            .await
            .map_err(|_| propose_status(ProposeError::Shutdown))?
            .map_err(propose_status)?;
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
        let request = request.into_inner();
        let bytes = match request.request {
            Some(proto::query_request::Request::Bytes(bytes)) => bytes,
            Some(proto::query_request::Request::Text(text)) => self.encode(text).await?,
            None => {
                return Err(Status::invalid_argument(
                    "the query has no request: set `bytes` or `text`",
                ));
            }
        };
        if bytes.len() > self.config.max_proposal_bytes {
            return Err(Status::invalid_argument(format!(
                "the query is {} bytes; the limit is {} (max_proposal_bytes)",
                bytes.len(),
                self.config.max_proposal_bytes
            )));
        }
        // One deadline for the whole read: the read index, then applying up to it.
        let deadline = tokio::time::Instant::now() + self.timeout();
        let read_index = match proto::Consistency::try_from(request.consistency) {
            Ok(proto::Consistency::Linearizable) => self.read_index(deadline).await?,
            Ok(proto::Consistency::Stale) => 0,
            Err(_) => return Err(Status::invalid_argument("unknown consistency level")),
        };
        let (reply, answer) = oneshot::channel();
        self.fsm
            .send(FsmRequest::Query {
                request: bytes,
                read_index,
                reply,
            })
            .map_err(|_| propose_status(ProposeError::Shutdown))?;
        let Answered { index, result } = match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => {
                return Err(propose_status(ProposeError::ReadTimeout(
                    self.config.request_timeout_ms,
                )));
            }
            Ok(Err(_)) => return Err(propose_status(ProposeError::Shutdown)),
            Ok(Ok(answered)) => answered,
        };
        let (outcome, rendered) = self.outcome(result).await?;
        Ok(Response::new(QueryResponse {
            index,
            outcome: Some(outcome.into_query()),
            text: rendered.text,
            render_error: rendered.render_error,
            text_is_ok: rendered.text_is_ok,
        }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.peer.admit_client(&_request)?;
        let status = self.node_status().await?;
        let leader_addr = status.leader_addr().unwrap_or_default();
        let plugin = self.codec.plugin();
        let space = self.peer.link.space.usage();
        Ok(Response::new(StatusResponse {
            id: status.id,
            role: status.role,
            leader_id: status.leader_id,
            leader_addr,
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            first_index: status.first_index,
            last_index: status.last_index,
            plugin_sha256: plugin.sha256_hex(),
            plugin_size: plugin.size() as u64,
            members: status
                .members
                .into_iter()
                .map(|(id, addr, voter)| proto::Member { id, addr, voter })
                .collect(),
            trapped_entries: self.trapped_entries.load(std::sync::atomic::Ordering::Relaxed),
            longest_apply_ms: self.longest_apply_ms.load(std::sync::atomic::Ordering::Relaxed),
            apply_error: self.peer.link.health.reason(),
            epoch_index: self.peer.link.epochs.latest(),
            epoch_sha256: self
                .peer
                .link
                .epochs
                .latest_digest()
                .filter(|(index, _)| *index == self.peer.link.epochs.latest())
                .map_or_else(String::new, |(_, sha)| hex::encode(sha)),
            divergences: self
                .peer
                .link
                .epochs
                .divergences()
                .iter()
                .map(ToString::to_string)
                .collect(),
            divergences_total: self.peer.link.epochs.divergences_total(),
            sessions: self.sessions.sessions.load(std::sync::atomic::Ordering::Relaxed),
            session_kept_bytes: self.sessions.kept_bytes.load(std::sync::atomic::Ordering::Relaxed),
            listen: self.listen.clone(),
            snapshot_index: status.snapshot_index,
            reads_served: status.reads.served,
            reads_retried: status.reads.retried,
            space_alarms: self.space_alarms.borrow().iter().copied().collect(),
            store_file_bytes: space.file_bytes,
            store_live_bytes: space.live_bytes,
            quota_bytes: self.space_config.quota_bytes,
            fs_free_bytes: space.fs_free_bytes,
            min_free_bytes: self.space_config.min_free_bytes,
            out_of_space: self.peer.link.space.over(),
            limits: Some(limits_proto(&self.limits())),
            limits_recorded: self.cluster_limits.borrow().is_some(),
            local_limits: Some(limits_proto(&Limits::of(self.sandbox.config()))),
            cluster_id: self.peer.link.cluster_id,
            snapshot_error: self.snapshot_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            refused: self
                .peer
                .refusals
                .counts()
                .into_iter()
                .filter(|(_, count)| *count > 0)
                .map(|(reason, count)| proto::RefusalCount {
                    reason: reason.to_string(),
                    count,
                })
                .collect(),
            progress: status
                .progress
                .into_iter()
                .map(|(id, matched, next_index, state, recent_active)| proto::Progress {
                    id,
                    matched,
                    next_index,
                    state,
                    recent_active,
                })
                .collect(),
        }))
    }
}

fn limits_proto(limits: &Limits) -> proto::SandboxLimits {
    proto::SandboxLimits {
        fuel_per_call: limits.fuel_per_call,
        fuel_per_snapshot: limits.fuel_per_snapshot,
        max_memory_bytes: limits.max_memory_bytes,
        max_result_bytes: limits.max_result_bytes,
    }
}
