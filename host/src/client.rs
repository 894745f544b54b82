//! A client for the gRPC API, used by the CLI and the tests. It follows
//! "not the leader" answers to the leader the node names.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::dial::{Dialer, TokenInterceptor};
use crate::dial::{LEADER_ADDR_KEY, NOT_LEADER_KEY};
use crate::proto::client_client::ClientClient;
use crate::proto::{
    Consistency, ProposeRequest, ProposeResponse, QueryRequest, QueryResponse, StatusRequest, StatusResponse,
    propose_request, query_request,
};

/// How many times a request follows a leader hint before giving up.
const MAX_REDIRECTS: usize = 3;

/// How long a request waits for a cluster that knows no leader (an
/// election takes one to two election timeouts).
const NO_LEADER_WAIT: Duration = Duration::from_secs(5);

/// "Not the leader" from a node that knows no leader either.
fn is_no_leader(status: &tonic::Status) -> bool {
    status.metadata().get(NOT_LEADER_KEY).is_some() && status.metadata().get(LEADER_ADDR_KEY).is_none()
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{}", .0.message())]
    Rpc(tonic::Status),
    #[error("no answer from {addr} within {timeout_ms} ms")]
    Timeout { addr: String, timeout_ms: u64 },
    /// Writing what the node sent failed here.
    #[error("cannot write the answer: {0}")]
    Write(std::io::Error),
}

impl ClientError {
    /// Whether trying again later may succeed: the node is unreachable,
    /// busy, without a leader, or in the middle of a membership change.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout { .. } => true,
            ClientError::Write(_) => false,
            ClientError::Rpc(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
            ),
        }
    }
}

/// Whether a sequenced proposal that failed so is sent again. Sending it
/// again is always safe (the cluster applies a sequence once); this keeps
/// only the answers that are definite: a request that can never succeed,
/// credentials refused, or the cluster out of space.
fn worth_retrying_in_session(error: &ClientError) -> bool {
    use tonic::Code;
    match error {
        ClientError::Connect { .. } | ClientError::Timeout { .. } => true,
        ClientError::Write(_) => false,
        ClientError::Rpc(status) => match status.code() {
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::NotFound => false,
            Code::FailedPrecondition => status.metadata().get(NOT_LEADER_KEY).is_some(),
            Code::ResourceExhausted => !status.message().starts_with("no space"),
            _ => true,
        },
    }
}

/// Whether `response` says the cluster does not know session `id`.
fn is_forgotten_session(response: &ProposeResponse, id: u64) -> bool {
    matches!(&response.outcome, Some(crate::proto::propose_response::Outcome::PluginError(message))
        if crate::sessions::is_forgotten(message, id))
}

/// A client session (see [`Client::open_session`]): its id and the next
/// sequence number.
#[derive(Debug, Clone)]
pub struct Session {
    id: u64,
    next: u64,
    members: Vec<String>,
    retries: u64,
}

impl Session {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The members' addresses when it was opened.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Attempts made again after an answer that left the outcome unknown.
    pub fn retries(&self) -> u64 {
        self.retries
    }
}

/// The generated gRPC client, with the token interceptor.
pub type RawClient = ClientClient<InterceptedService<Channel, TokenInterceptor>>;

/// A client of one cluster, through one node (it follows the leader).
///
/// [`Client::propose_text`] and [`Client::propose_freeing`] propose
/// exactly once by default: in a session of this client's, opened on first
/// use, retrying an unknown outcome with the same sequence number (see
/// [`Client::propose_in`]) for up to [`Client::retry_for`] (the client's
/// timeout unless set). [`Client::without_sessions`] makes each a single
/// attempt, as [`Client::propose`] always is. A clone starts without a
/// session: two clients never share sequence numbers.
pub struct Client {
    addr: String,
    inner: RawClient,
    timeout: Duration,
    max_message_bytes: usize,
    dialer: Dialer,
    /// Whether `propose_text` runs in `session`.
    in_sessions: bool,
    retry_for: Duration,
    /// The session `propose_text` proposes in: opened on first use, and
    /// again if the cluster forgot it.
    session: Option<Session>,
}

impl Clone for Client {
    fn clone(&self) -> Client {
        Client {
            addr: self.addr.clone(),
            inner: self.inner.clone(),
            timeout: self.timeout,
            max_message_bytes: self.max_message_bytes,
            dialer: self.dialer.clone(),
            in_sessions: self.in_sessions,
            retry_for: self.retry_for,
            session: None,
        }
    }
}

impl Client {
    /// A plaintext client without a token.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        Client::connect_with(addr, timeout, &Dialer::default()).await
    }

    /// A client that dials (and follows the leader) through `dialer`: TLS
    /// and a token, if it has them.
    pub async fn connect_with(addr: &str, timeout: Duration, dialer: &Dialer) -> Result<Client, ClientError> {
        let max_message_bytes = 64 << 20;
        let inner = connect(dialer, addr, timeout, max_message_bytes).await?;
        Ok(Client {
            addr: addr.to_string(),
            inner,
            timeout,
            max_message_bytes,
            dialer: dialer.clone(),
            in_sessions: true,
            retry_for: timeout,
            session: None,
        })
    }

    /// Another client like this one (without its session), for `addr`.
    pub async fn connect_to(&self, addr: &str) -> Result<Client, ClientError> {
        let mut other = Client::connect_with(addr, self.timeout, &self.dialer).await?;
        other.in_sessions = self.in_sessions;
        other.retry_for = self.retry_for;
        Ok(other)
    }

    /// This client with `propose_text` and `propose_freeing` made single
    /// attempts outside any session: an answer that leaves the outcome
    /// unknown is the caller's to resolve.
    pub fn without_sessions(mut self) -> Client {
        self.in_sessions = false;
        self.session = None;
        self
    }

    /// How long `propose_text` and `propose_freeing` go on retrying an
    /// unknown outcome in the client's session (each attempt bounded by
    /// the client's timeout).
    pub fn retry_for(mut self, retry_for: Duration) -> Client {
        self.retry_for = retry_for;
        self
    }

    /// The session `propose_text` proposes in, once it opened one.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The raw gRPC client, for streaming calls.
    pub fn raw(&self) -> RawClient {
        self.inner.clone()
    }

    /// Switch to the leader named in a "not the leader" status, if any.
    async fn follow(&mut self, status: &tonic::Status) -> Result<bool, ClientError> {
        if status.code() != tonic::Code::FailedPrecondition {
            return Ok(false);
        }
        let Some(leader) = status.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()) else {
            return Ok(false);
        };
        if leader == self.addr {
            return Ok(false);
        }
        let leader = leader.to_string();
        self.inner = connect(&self.dialer, &leader, self.timeout, self.max_message_bytes).await?;
        self.addr = leader;
        Ok(true)
    }

    pub async fn propose_text(&mut self, text: &str) -> Result<ProposeResponse, ClientError> {
        self.propose_text_as(text, false).await
    }

    /// A command that shrinks the state (a delete): admitted while the
    /// space alarm refuses other writes.
    pub async fn propose_freeing(&mut self, text: &str) -> Result<ProposeResponse, ClientError> {
        self.propose_text_as(text, true).await
    }

    async fn propose_text_as(&mut self, text: &str, frees_space: bool) -> Result<ProposeResponse, ClientError> {
        if !self.in_sessions {
            return self
                .propose(ProposeRequest {
                    command: Some(propose_request::Command::Text(text.to_string())),
                    frees_space,
                    ..Default::default()
                })
                .await;
        }
        let mut reopened = false;
        loop {
            let mut session = match self.session.take() {
                Some(session) => session,
                None => self.open_session().await?,
            };
            let retries = session.retries;
            let response = self.propose_in(&mut session, text, frees_space, self.retry_for).await;
            let forgotten = matches!(&response, Ok(r) if is_forgotten_session(r, session.id));
            if !forgotten {
                self.session = Some(session);
                return response;
            }
            // The cluster forgot the session (it expired, or a full table
            // dropped it). Answered so at the first attempt, the command
            // was not applied: it goes again in a new session. After a
            // retry it may have been, and the caller is told so.
            if reopened || session.retries != retries {
                return response;
            }
            reopened = true;
        }
    }

    /// Open a session for exactly-once proposals (on the leader); it
    /// remembers the members, to find the next leader through if this one
    /// goes away.
    pub async fn open_session(&mut self) -> Result<Session, ClientError> {
        let opened = self
            .unary(|mut inner| async move { inner.open_session(crate::proto::OpenSessionRequest {}).await })
            .await?;
        let members = self.status().await?.members.into_iter().map(|m| m.addr).collect();
        Ok(Session {
            id: opened.session_id,
            next: 1,
            members,
            retries: 0,
        })
    }

    /// Propose `text` in `session`, exactly once: an answer that leaves
    /// the outcome unknown (a timeout, a lost leader or connection, a busy
    /// node) is retried with the same sequence number, through the other
    /// members if need be, until a definite answer or `retry_for` has
    /// passed (each attempt bounded by the client's timeout). Retrying
    /// cannot apply the command twice: the cluster answers a sequence it
    /// applied with that apply's result.
    pub async fn propose_in(
        &mut self,
        session: &mut Session,
        text: &str,
        frees_space: bool,
        retry_for: Duration,
    ) -> Result<ProposeResponse, ClientError> {
        let seq = session.next;
        session.next += 1;
        let request = ProposeRequest {
            command: Some(propose_request::Command::Text(text.to_string())),
            frees_space,
            session_id: session.id,
            sequence: seq,
        };
        let deadline = tokio::time::Instant::now() + retry_for;
        let mut backoff = Duration::from_millis(20);
        let mut next_member = 0usize;
        loop {
            let error = match self.propose(request.clone()).await {
                Ok(response) => match &response.outcome {
                    // A stream's host error; not sent on unary calls.
                    Some(crate::proto::propose_response::Outcome::HostError(_)) => {
                        ClientError::Rpc(tonic::Status::unavailable(response.rendered().into_owned()))
                    }
                    _ => return Ok(response),
                },
                Err(error) => error,
            };
            if !worth_retrying_in_session(&error) || tokio::time::Instant::now() + backoff >= deadline {
                return Err(error);
            }
            session.retries += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            // This node may be gone (or cut off): the next attempt goes
            // through another member, which points at the leader.
            if !session.members.is_empty() {
                let addr = session.members[next_member % session.members.len()].clone();
                next_member += 1;
                if let Ok(inner) = connect(&self.dialer, &addr, self.timeout, self.max_message_bytes).await {
                    self.inner = inner;
                    self.addr = addr;
                }
            }
        }
    }

    /// Bound a unary call by the client's timeout. (Streams are not bounded:
    /// a long `propose --file` may take as long as it needs.)
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<Result<T, tonic::Status>, ClientError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result.map(tonic::Response::into_inner).map_err(|s| self.explain(s))),
            Err(_) => Err(ClientError::Timeout {
                addr: self.addr.clone(),
                timeout_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    pub async fn propose(&mut self, request: ProposeRequest) -> Result<ProposeResponse, ClientError> {
        self.unary(move |mut inner| {
            let request = request.clone();
            async move { inner.propose(request).await }
        })
        .await
    }

    pub async fn query_text(&mut self, text: &str, consistency: Consistency) -> Result<QueryResponse, ClientError> {
        self.query(QueryRequest {
            request: Some(query_request::Request::Text(text.to_string())),
            consistency: consistency as i32,
        })
        .await
    }

    pub async fn query(&mut self, request: QueryRequest) -> Result<QueryResponse, ClientError> {
        self.unary(move |mut inner| {
            let request = request.clone();
            async move { inner.query(request).await }
        })
        .await
    }

    pub async fn join(&mut self, addr: &str, requested_id: u64) -> Result<crate::proto::JoinResponse, ClientError> {
        let request = crate::proto::JoinRequest {
            addr: addr.to_string(),
            requested_id,
        };
        self.unary(move |mut inner| {
            let request = request.clone();
            async move { inner.join(request).await }
        })
        .await
    }

    pub async fn remove_member(&mut self, id: u64) -> Result<crate::proto::MembersResponse, ClientError> {
        self.unary(move |mut inner| async move { inner.remove_member(crate::proto::RemoveMemberRequest { id }).await })
            .await
    }

    /// Turn every space alarm off (answered by the leader).
    pub async fn disarm_alarms(&mut self) -> Result<crate::proto::DisarmAlarmsResponse, ClientError> {
        self.unary(|mut inner| async move { inner.disarm_alarms(crate::proto::DisarmAlarmsRequest {}).await })
            .await
    }

    /// Change the cluster's sandbox limits (answered by the leader).
    pub async fn set_limits(
        &mut self,
        request: crate::proto::SetLimitsRequest,
    ) -> Result<crate::proto::SetLimitsResponse, ClientError> {
        self.unary(move |mut inner| async move { inner.set_limits(request).await })
            .await
    }

    pub async fn transfer_leader(&mut self, id: u64) -> Result<crate::proto::TransferLeaderResponse, ClientError> {
        self.unary(
            move |mut inner| async move { inner.transfer_leader(crate::proto::TransferLeaderRequest { id }).await },
        )
        .await
    }

    /// Take a snapshot on this node (not the leader: every node snapshots
    /// itself).
    pub async fn snapshot(&mut self) -> Result<crate::proto::SnapshotResponse, ClientError> {
        let mut inner = self.inner.clone();
        self.bounded(inner.snapshot(crate::proto::SnapshotRequest {}))
            .await?
            .map_err(ClientError::Rpc)
    }

    /// Back up this node's state (see [`crate::backup`]): `on_piece` gets
    /// the backup file's bytes in order, the first call with the whole
    /// file's size, and stops the transfer by failing. The node first takes
    /// a snapshot, at the next epoch the leader logs; the client's timeout
    /// bounds that and then each wait for a piece. Returns the bytes
    /// received.
    pub async fn save_snapshot(
        &mut self,
        mut on_piece: impl FnMut(&[u8], u64) -> std::io::Result<()>,
    ) -> Result<u64, ClientError> {
        let mut inner = self.inner.clone();
        let mut chunks = self
            .bounded(inner.save_snapshot(crate::proto::SaveSnapshotRequest {}))
            .await?
            .map_err(ClientError::Rpc)?;
        let mut received = 0u64;
        loop {
            let chunk = match tokio::time::timeout(self.timeout, chunks.message()).await {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        addr: self.addr.clone(),
                        timeout_ms: self.timeout.as_millis() as u64,
                    });
                }
                Ok(chunk) => chunk.map_err(|status| ClientError::Rpc(self.explain(status)))?,
            };
            let Some(chunk) = chunk else { return Ok(received) };
            on_piece(&chunk.data, chunk.total_bytes).map_err(ClientError::Write)?;
            received += chunk.data.len() as u64;
        }
    }

    /// Propose a plugin swap (on the leader, wherever this client points).
    pub async fn swap_plugin(&mut self, wasm: Vec<u8>) -> Result<crate::proto::SwapPluginResponse, ClientError> {
        let done = self.swap_plugin_with_progress(wasm, |_| {}).await?;
        Ok(crate::proto::SwapPluginResponse {
            index: done.index,
            sha256: done.sha256,
            message: done.message,
        })
    }

    /// Swap the cluster's plugin, hearing how it goes: `on_progress` sees
    /// each update, the last being the activation. The swap may take as
    /// long as the voters take to compile the component; the client's
    /// timeout bounds only the wait between two updates (the leader sends
    /// one a second).
    pub async fn swap_plugin_with_progress(
        &mut self,
        wasm: Vec<u8>,
        mut on_progress: impl FnMut(&crate::proto::SwapProgress),
    ) -> Result<crate::proto::SwapProgress, ClientError> {
        let mut redirects = 0;
        'again: loop {
            let request = crate::proto::SwapPluginRequest { wasm: wasm.clone() };
            let mut inner = self.inner.clone();
            let mut updates = match self.bounded(inner.swap_plugin_stream(request)).await? {
                Ok(updates) => updates,
                Err(status) if redirects < MAX_REDIRECTS && self.follow(&status).await? => {
                    redirects += 1;
                    continue;
                }
                Err(status) => return Err(ClientError::Rpc(status)),
            };
            loop {
                let update = match tokio::time::timeout(self.timeout, updates.message()).await {
                    Err(_) => {
                        return Err(ClientError::Timeout {
                            addr: self.addr.clone(),
                            timeout_ms: self.timeout.as_millis() as u64,
                        });
                    }
                    Ok(update) => update.map_err(|status| self.explain(status)),
                };
                match update {
                    Ok(Some(update)) => {
                        on_progress(&update);
                        if update.stage == "activated" {
                            return Ok(update);
                        }
                    }
                    Ok(None) => {
                        return Err(ClientError::Rpc(tonic::Status::unavailable(
                            "the swap's progress ended before it was activated",
                        )));
                    }
                    Err(status) if redirects < MAX_REDIRECTS && self.follow(&status).await? => {
                        redirects += 1;
                        continue 'again;
                    }
                    Err(status) => return Err(ClientError::Rpc(status)),
                }
            }
        }
    }

    pub async fn list_plugins(&mut self) -> Result<crate::proto::ListPluginsResponse, ClientError> {
        let mut inner = self.inner.clone();
        self.bounded(inner.list_plugins(crate::proto::ListPluginsRequest {}))
            .await?
            .map_err(ClientError::Rpc)
    }

    /// A hint for a plaintext client whose connection a TLS node closed.
    fn explain(&self, status: tonic::Status) -> tonic::Status {
        let dropped = [
            "operation was canceled",
            "connection closed",
            "h2 protocol error",
            "connection reset",
        ];
        let transport = status.code() != tonic::Code::Ok && dropped.iter().any(|d| status.message().contains(d));
        if transport && !self.dialer.is_tls() {
            tonic::Status::unavailable(format!(
                "{} closed the connection: {} (is it serving TLS? then pass --tls-ca)",
                self.addr,
                status.message()
            ))
        } else {
            status
        }
    }

    /// A unary call that follows leader hints, bounded by the timeout.
    async fn unary<T, F, Fut>(&mut self, call: F) -> Result<T, ClientError>
    where
        F: Fn(RawClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // While an election is on, nodes know no leader: wait it out (a
        // refused request was not proposed, so sending it again is safe).
        let election_deadline = tokio::time::Instant::now() + self.timeout.min(NO_LEADER_WAIT);
        let mut redirects = 0;
        loop {
            match self.bounded(call(self.inner.clone())).await? {
                Ok(response) => return Ok(response),
                Err(status) if redirects < MAX_REDIRECTS && self.follow(&status).await? => redirects += 1,
                Err(status) if is_no_leader(&status) && tokio::time::Instant::now() < election_deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => return Err(ClientError::Rpc(status)),
            }
        }
    }

    pub async fn status(&mut self) -> Result<StatusResponse, ClientError> {
        let mut inner = self.inner.clone();
        self.bounded(inner.status(StatusRequest {}))
            .await?
            .map_err(ClientError::Rpc)
    }
}

async fn connect(
    dialer: &Dialer,
    addr: &str,
    timeout: Duration,
    max_message_bytes: usize,
) -> Result<RawClient, ClientError> {
    let channel = dialer
        .connect(addr, timeout.min(Duration::from_secs(5)))
        .await
        .map_err(|reason| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        })?;
    Ok(ClientClient::with_interceptor(channel, dialer.interceptor())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}
