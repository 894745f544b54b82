//! Proposals and queries: encode the text, check size and space, queue the
//! entry in the raft loop, wait for its result, render it.

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::{Pending, Services};
use crate::codec::{Codec, CodecError};
use crate::dial::{LEADER_ADDR_KEY, NOT_LEADER_KEY, NOT_PROPOSED_KEY};
use crate::envelope;
use crate::fsm::{Answered, FsmRequest};
use crate::node::{NodeRequest, ProposeError};
use crate::proto::{self, HostError, ProposeRequest, ProposeResponse, QueryRequest, QueryResponse};
use crate::sandbox::CallError;

impl Services {
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

    pub(super) async fn encode(&self, text: String) -> Result<Vec<u8>, Status> {
        self.codec_call(text.len(), move |codec| codec.encode(&text))
            .await
            .map_err(|e| Status::invalid_argument(format!("cannot encode the command: {e}")))
    }

    /// A proposal or query (`what`) of `len` bytes, encoded, is within
    /// `max_proposal_bytes`.
    fn check_size(&self, what: &str, len: usize) -> Result<(), Status> {
        if len > self.config.max_proposal_bytes {
            return Err(Status::invalid_argument(format!(
                "the {what} is {len} bytes; the limit is {} (max_proposal_bytes)",
                self.config.max_proposal_bytes
            )));
        }
        Ok(())
    }

    /// While any member's space alarm is on, writes that grow the state
    /// are refused, alike on every node (the alarm is in the log).
    pub(super) fn check_space(&self, bytes: u64) -> Result<(), Status> {
        let space = &self.peer.link.space;
        let own = self.peer.link.self_id;
        // Read in place: this runs on every proposal.
        let alarmed: Vec<u64> = self.space_alarms.borrow().iter().copied().collect();
        let members = if !alarmed.is_empty() {
            alarmed
        } else if space.memory_over() || !space.admit(bytes, &self.space_config) {
            // Not yet in the log: this node's plugin is near its memory
            // cap, or this write would take its store past its quota; its
            // alarm is on the way.
            vec![own]
        } else {
            return Ok(());
        };
        let list = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let short_of_memory: Vec<u64> = members
            .iter()
            .copied()
            .filter(|&member| space.reported(member, own).memory)
            .collect();
        if !short_of_memory.is_empty() {
            let (_, cap) = space.memory();
            return Err(Status::resource_exhausted(format!(
                "no space: the plugin's memory on node {} is past {}% of its cap of {cap} bytes \
                 (max_memory_bytes), or too full to take a snapshot; writes that grow the state are refused, \
                 reads are served. To free \
                 memory: delete data (`propose --frees-space`), then take a snapshot (`snapshot`), which \
                 restores every replica's plugin from its state; or raise max_memory_bytes. The alarm \
                 clears by itself once the plugin's memory is back under {}% of the cap (or `alarm disarm`)",
                list(&short_of_memory),
                crate::space::MEMORY_ALARM_PERCENT,
                crate::space::MEMORY_CLEAR_PERCENT,
            )));
        }
        Err(Status::resource_exhausted(format!(
            "no space: the space alarm is on for node {} (this node's quota is {} bytes, quota_bytes, with {} bytes \
             kept free on its disk, min_free_bytes); writes that grow the state are refused, reads are served. \
             To free space: delete data (`propose --frees-space`), take a snapshot on each node (`snapshot`, \
             which compacts the log), defragment each node while it is stopped (`defrag --data-dir`), or raise \
             --quota-bytes; the alarm clears by itself once usage is back under the limits (or `alarm disarm`)",
            list(&members),
            self.space_config.quota_bytes,
            self.space_config.min_free_bytes
        )))
    }

    /// Validate a proposal and queue it in the raft loop. Returns once the
    /// entry has its place in the queue, so callers that submit in sequence
    /// get their entries into the log in that sequence.
    pub(super) async fn submit(&self, request: ProposeRequest) -> Result<Pending, Status> {
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
        self.check_size("proposal", entry.len())?;
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
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Status::from(ProposeError::Shutdown)),
        }
    }

    /// Wait for a submitted proposal's result.
    pub(super) async fn finish(&self, pending: Pending) -> Result<ProposeResponse, Status> {
        let applied = match tokio::time::timeout(self.timeout(), pending).await {
            Err(_) => {
                return Err(Status::from(ProposeError::Timeout(self.config.request_timeout_ms)));
            }
            Ok(Err(_)) => return Err(Status::from(ProposeError::Shutdown)),
            Ok(Ok(Err(error))) => return Err(Status::from(error)),
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
            Err(_) => Err(Status::from(ProposeError::ReadTimeout(self.config.request_timeout_ms))),
            Ok(Err(_)) => Err(Status::from(ProposeError::Shutdown)),
            Ok(Ok(result)) => result.map_err(Status::from),
        }
    }

    /// A query, read at the consistency it asks for.
    pub(super) async fn answer_query(&self, request: QueryRequest) -> Result<QueryResponse, Status> {
        let bytes = match request.request {
            Some(proto::query_request::Request::Bytes(bytes)) => bytes,
            Some(proto::query_request::Request::Text(text)) => self.encode(text).await?,
            None => {
                return Err(Status::invalid_argument(
                    "the query has no request: set `bytes` or `text`",
                ));
            }
        };
        self.check_size("query", bytes.len())?;
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
            .map_err(|_| Status::from(ProposeError::Shutdown))?;
        let Answered { index, result } = match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => {
                return Err(Status::from(ProposeError::ReadTimeout(self.config.request_timeout_ms)));
            }
            Ok(Err(_)) => return Err(Status::from(ProposeError::Shutdown)),
            Ok(Ok(answered)) => answered,
        };
        let (outcome, rendered) = self.outcome(result).await?;
        Ok(QueryResponse {
            index,
            outcome: Some(outcome.into_query()),
            text: rendered.text,
            render_error: rendered.render_error,
            text_is_ok: rendered.text_is_ok,
        })
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

/// How a proposal's failure reaches a gRPC client: one mapping for every
/// service.
impl From<ProposeError> for Status {
    fn from(error: ProposeError) -> Status {
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
            ProposeError::NotProposed(_) => {
                let mut status = Status::unavailable(message);
                status
                    .metadata_mut()
                    .insert(NOT_PROPOSED_KEY, tonic::metadata::MetadataValue::from_static("1"));
                status
            }
            ProposeError::Invalid(_) => Status::invalid_argument(message),
        }
    }
}

pub(super) fn host_error(status: Status) -> ProposeResponse {
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
