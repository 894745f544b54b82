//! The Peer service: the receiving side of the transport. Everything a
//! peer sends is checked here (mutual TLS, cluster id, sender) and in the
//! raft loop's firewall before raft sees it; snapshots are received to a
//! file and checked whole before they are stepped.

use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use super::Services;
use crate::firewall::{Refusal, Refusals};
use crate::node::{NodeRequest, ProposeError};
use crate::proto;
use crate::proto::{RaftBatch, StreamSummary};

/// What the Peer service checks before anything reaches the raft loop.
pub struct PeerGuard {
    /// This node's cluster, id and dialer (to fetch a snapshot's plugin).
    pub link: crate::transport::Link,
    /// Connections are TLS; peers must present a client certificate.
    pub tls: bool,
    /// Client RPCs must present one too.
    pub require_client_cert: bool,
    pub refusals: Arc<Refusals>,
    /// Where snapshots being received are written, chunk by chunk.
    pub incoming_dir: std::path::PathBuf,
    /// One snapshot is received at a time.
    pub snapshot_slot: Arc<tokio::sync::Semaphore>,
}

impl PeerGuard {
    /// A peer RPC must come over mutual TLS (when TLS is on) from this
    /// cluster (when this node has a cluster id).
    pub(super) fn admit<T>(&self, request: &Request<T>, cluster_id: Option<u64>) -> Result<(), Status> {
        if self.tls && !crate::tls::has_client_cert(request) && !super::in_process(request) {
            self.refusals
                .record_rpc(Refusal::NoClientCert, "a peer connection without a client certificate");
            return Err(Status::unauthenticated(
                "peer requests need a client certificate signed by the cluster's CA",
            ));
        }
        if let Some(theirs) = cluster_id {
            self.same_cluster(theirs)?;
        }
        Ok(())
    }

    fn same_cluster(&self, theirs: u64) -> Result<(), Status> {
        let ours = self.link.cluster_id;
        if ours != 0 && theirs != ours {
            self.refusals.record_rpc(
                Refusal::OtherCluster,
                &format!("cluster {theirs:016x}, not this node's {ours:016x}"),
            );
            return Err(Status::permission_denied(format!(
                "this node belongs to cluster {ours:016x}, not {theirs:016x}"
            )));
        }
        Ok(())
    }

    /// Client RPCs: a client certificate only if the node asks for one.
    pub(super) fn admit_client<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.require_client_cert && !crate::tls::has_client_cert(request) && !super::in_process(request) {
            return Err(Status::unauthenticated(
                "this node requires a client certificate signed by its CA (--tls-cert/--tls-key)",
            ));
        }
        Ok(())
    }

    fn bad_snapshot(&self, why: String) -> Status {
        self.refusals.record_rpc(Refusal::BadSnapshot, &why);
        Status::invalid_argument(format!("snapshot refused: {why}"))
    }
}

#[tonic::async_trait]
impl proto::peer_server::Peer for Services {
    async fn stream(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<StreamSummary>, Status> {
        self.peer.admit(&request, None)?;
        let mut batches = request.into_inner();
        let mut received = 0u64;
        let mut stopping = self.stopping.clone();
        loop {
            let batch = tokio::select! {
                batch = batches.message() => batch?,
                // A peer's stream never ends by itself: end it here, so a
                // graceful shutdown need not wait out its grace period.
                _ = stopping.wait_for(|stopping| *stopping) => None,
            };
            let Some(batch) = batch else { break };
            received += self.receive_batch(batch).await?;
        }
        Ok(Response::new(StreamSummary { received }))
    }

    async fn fetch_plugin(
        &self,
        request: Request<proto::FetchPluginRequest>,
    ) -> Result<Response<proto::FetchPluginResponse>, Status> {
        let cluster_id = request.get_ref().cluster_id;
        self.peer.admit(&request, Some(cluster_id))?;
        let sha: [u8; 32] = request
            .into_inner()
            .sha256
            .try_into()
            .map_err(|_| Status::invalid_argument("sha256 must be 32 bytes"))?;
        match self.plugins.blob(&sha).map_err(|e| Status::internal(e.to_string()))? {
            Some(wasm) => Ok(Response::new(proto::FetchPluginResponse { wasm })),
            None => Err(Status::not_found(format!(
                "this node does not store plugin {}",
                hex::encode(sha)
            ))),
        }
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<proto::SnapshotChunk>>,
    ) -> Result<Response<proto::SnapshotAck>, Status> {
        self.peer.admit(&request, None)?;
        self.receive_snapshot(request.into_inner()).await.map(Response::new)
    }
}

impl Services {
    /// One batch from a peer (over a gRPC stream or the test router):
    /// its sender's reports, then its messages, each to the raft loop (whose
    /// firewall checks it again). Returns how many messages went in.
    pub(crate) async fn receive_batch(&self, batch: RaftBatch) -> Result<u64, Status> {
        self.peer.same_cluster(batch.cluster_id)?;
        // Only a member's word counts (the leader reads it for members).
        let space = crate::space::Report {
            over: batch.no_space,
            memory: batch.no_plugin_memory,
        };
        self.peer.link.space.report(batch.from, space);
        self.peer.link.plugins.report(batch.from, &batch.plugins);
        self.peer.link.health.report(batch.from, batch.cannot_apply);
        let digest = batch
            .epoch_digest
            .and_then(|d| Some((d.index, <[u8; 32]>::try_from(d.sha256.as_slice()).ok()?)));
        self.peer.link.epochs.report(batch.from, batch.epoch_want, digest);
        let bytes: usize = batch.messages.iter().map(Vec::len).sum();
        self.peer.link.metrics.received(batch.from, bytes as u64);
        let mut received = 0;
        for bytes in batch.messages {
            let message = Message::parse_from_bytes(&bytes)
                .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
            received += 1;
            // A batch speaks for one sender, except for read requests a
            // follower relays to its leader (raft keeps their origin).
            if message.from != batch.from && message.get_msg_type() != raft::prelude::MessageType::MsgReadIndex {
                self.peer.refusals.record(Refusal::Addressing, &message);
                continue;
            }
            if self.node.send(NodeRequest::Raft(Box::new(message))).await.is_err() {
                return Err(Status::from(ProposeError::Shutdown));
            }
        }
        Ok(received)
    }

    /// Receive a snapshot (over gRPC or the test router): one at a time,
    /// only from a sender the firewall would take it from, written to a
    /// file as it arrives (while it arrives, memory holds one chunk,
    /// whatever size the sender announces; once complete it is read back
    /// whole, as raft steps it), then checked (layout, members, plugin) before raft sees it. A sender
    /// that goes quiet for `SNAPSHOT_CHUNK_WAIT` loses the slot. Anything
    /// wrong is an error to the sender, which raft retries later; nothing
    /// here stops the node.
    pub(crate) async fn receive_snapshot(
        &self,
        mut chunks: impl futures::Stream<Item = Result<proto::SnapshotChunk, Status>> + Send + Unpin,
    ) -> Result<proto::SnapshotAck, Status> {
        use futures::StreamExt as _;
        let _slot = self
            .peer
            .snapshot_slot
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("another snapshot is being received; retry later"))?;
        let first = chunks
            .next()
            .await
            .transpose()?
            .ok_or_else(|| self.peer.bad_snapshot("empty snapshot stream".into()))?;
        self.peer.same_cluster(first.cluster_id)?;
        let mut message = Message::parse_from_bytes(&first.message)
            .map_err(|e| self.peer.bad_snapshot(format!("malformed raft message: {e}")))?;
        if message.get_msg_type() != raft::prelude::MessageType::MsgSnapshot {
            return Err(self
                .peer
                .bad_snapshot("the first chunk is not a raft snapshot message".into()));
        }
        let total = first.total_bytes;
        if total > self.max_snapshot_bytes {
            return Err(self.peer.bad_snapshot(format!(
                "the snapshot is {total} bytes; this node accepts at most {} (max_snapshot_bytes)",
                self.max_snapshot_bytes
            )));
        }
        // Would raft take a snapshot from this sender now? Ask before
        // receiving a byte of it.
        let (reply, answer) = oneshot::channel();
        let check = NodeRequest::CheckSnapshot {
            message: Box::new(message.clone()),
            reply,
        };
        self.node
            .send(check)
            .await
            .map_err(|_| Status::from(ProposeError::Shutdown))?;
        if let Err(reason) = answer.await.map_err(|_| Status::from(ProposeError::Shutdown))? {
            self.peer.refusals.record(reason, &message);
            return Err(Status::failed_precondition(format!(
                "snapshot refused: {}",
                reason.name()
            )));
        }
        let file = IncomingFile::create(&self.peer.incoming_dir)
            .await
            .map_err(|e| Status::internal(format!("cannot store an incoming snapshot: {e}")))?;
        let mut received = 0u64;
        let mut pending = Some(first.data);
        loop {
            let data = match pending.take() {
                Some(data) => data,
                None => match tokio::time::timeout(SNAPSHOT_CHUNK_WAIT, chunks.next()).await {
                    Ok(chunk) => match chunk.transpose()? {
                        Some(chunk) => chunk.data,
                        None => break,
                    },
                    Err(_) => {
                        return Err(self.peer.bad_snapshot(format!(
                            "no data for {} s after {received} of {total} bytes",
                            SNAPSHOT_CHUNK_WAIT.as_secs()
                        )));
                    }
                },
            };
            received = received.saturating_add(data.len() as u64);
            if received > total {
                return Err(self
                    .peer
                    .bad_snapshot(format!("longer than the {total} bytes announced")));
            }
            file.append(&data)
                .await
                .map_err(|e| Status::internal(format!("cannot store an incoming snapshot: {e}")))?;
        }
        if received != total {
            // A transfer cut short: nothing of it is used.
            return Err(self
                .peer
                .bad_snapshot(format!("the stream ended after {received} of {total} bytes")));
        }
        // The file becomes the snapshot's data: raft carries a reference to
        // it, and the install copies it into the store a chunk at a time.
        let metadata = message.get_snapshot().get_metadata();
        let ready = self
            .peer
            .incoming_dir
            .join(crate::snapshot::ready_file_name(metadata.index, metadata.term));
        file.keep_as(&ready)
            .await
            .map_err(|e| Status::internal(format!("cannot store an incoming snapshot: {e}")))?;
        let header = {
            let ready = ready.clone();
            tokio::task::spawn_blocking(move || crate::snapshot::read_file_header(&ready))
                .await
                .map_err(|e| Status::internal(format!("validation task failed: {e}")))?
        };
        let checked = match header {
            Ok(header) => self.check_snapshot_header(&message, &header).await,
            Err(error) => Err(self.peer.bad_snapshot(error.to_string())),
        };
        if let Err(status) = checked {
            let _ = tokio::fs::remove_file(&ready).await;
            return Err(status);
        }
        message.mut_snapshot().data = crate::snapshot::DataRef::File {
            path: ready,
            len: total,
        }
        .to_bytes()
        .into();
        self.node
            .send(NodeRequest::Snapshot(Box::new(message)))
            .await
            .map_err(|_| Status::from(ProposeError::Shutdown))?;
        Ok(proto::SnapshotAck { received_bytes: total })
    }

    /// The snapshot's layout must decode and its plugin must be at hand
    /// (stored, or fetched now from the members it names), so installing
    /// it cannot fail for either reason later.
    async fn check_snapshot_header(
        &self,
        message: &Message,
        header: &crate::snapshot::SnapshotHeader,
    ) -> Result<(), Status> {
        // The addresses must be those of the configuration raft will adopt.
        let conf = message.get_snapshot().get_metadata().get_conf_state();
        let mut conf_ids: Vec<u64> = conf.voters.iter().chain(&conf.learners).copied().collect();
        conf_ids.sort_unstable();
        let mut header_ids: Vec<u64> = header.members.iter().map(|(id, _)| *id).collect();
        header_ids.sort_unstable();
        if header_ids != conf_ids {
            return Err(self.peer.bad_snapshot(format!(
                "its members {header_ids:?} are not its configuration {conf_ids:?}"
            )));
        }
        if let Some((id, addr)) = header
            .members
            .iter()
            .find(|(_, addr)| crate::dial::check_addr(addr).is_err())
        {
            return Err(self
                .peer
                .bad_snapshot(format!("member {id} has a bad address {addr:?}")));
        }
        let sha = header.plugin_sha256;
        if self
            .plugins
            .blob(&sha)
            .map_err(|e| Status::internal(e.to_string()))?
            .is_some()
        {
            return Ok(());
        }
        let own = self.peer.link.self_id;
        let addrs: Vec<String> = header
            .members
            .iter()
            .filter(|(id, _)| *id != own)
            .map(|(_, a)| a.clone())
            .collect();
        let max = self.config.max_plugin_bytes.saturating_add(1 << 20);
        let fetch = crate::transport::fetch_plugin(&self.peer.link, &sha, addrs, max);
        let wasm = tokio::time::timeout(SNAPSHOT_CHUNK_WAIT, fetch)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "no member sent it within {} s",
                    SNAPSHOT_CHUNK_WAIT.as_secs()
                ))
            })
            .map_err(|e| {
                self.peer.bad_snapshot(format!(
                    "it was made by plugin {}, which this node cannot get: {e:#}",
                    hex::encode(sha)
                ))
            })?;
        // It must at least be a plugin: compile it (cached for the restore).
        let sandbox = self.sandbox.clone();
        let (wasm, loaded) = tokio::task::spawn_blocking(move || {
            let loaded = sandbox.load(&wasm).map(|_| ());
            (wasm, loaded)
        })
        .await
        .map_err(|e| Status::internal(format!("validation task failed: {e}")))?;
        loaded.map_err(|e| {
            self.peer
                .bad_snapshot(format!("its plugin {} does not load: {e}", hex::encode(sha)))
        })?;
        tracing::info!(plugin = %hex::encode(sha), bytes = wasm.len(), "fetched the plugin of an incoming snapshot from a member");
        self.plugins
            .put_blob(&sha, &wasm)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// How long a snapshot sender may go without sending the next chunk (or a
/// member without sending the snapshot's plugin) before the transfer is
/// dropped and the slot freed.
const SNAPSHOT_CHUNK_WAIT: Duration = Duration::from_secs(30);

/// A snapshot being received, in a file of its own under the data dir;
/// removed when dropped, whatever happened.
struct IncomingFile {
    path: std::path::PathBuf,
    file: tokio::sync::Mutex<tokio::fs::File>,
}

impl IncomingFile {
    async fn create(dir: &std::path::Path) -> std::io::Result<IncomingFile> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join("snapshot.partial");
        let file = tokio::fs::File::create(&path).await?;
        Ok(IncomingFile {
            path,
            file: tokio::sync::Mutex::new(file),
        })
    }

    async fn append(&self, data: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        self.file.lock().await.write_all(data).await
    }

    /// Flush the file and move it to `path` (where the install finds it);
    /// nothing is left at the partial path.
    async fn keep_as(&self, path: &std::path::Path) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let mut file = self.file.lock().await;
        file.flush().await?;
        file.sync_all().await?;
        tokio::fs::rename(&self.path, path).await
    }
}

impl Drop for IncomingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
