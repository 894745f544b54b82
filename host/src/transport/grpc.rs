//! Raft messages to other nodes over gRPC.
//!
//! Two lanes per peer, each a task owning one long-lived client stream
//! (`Peer.Stream`), so messages in a lane arrive in the order raft produced
//! them: the data lane carries log replication (`MsgAppend` and its
//! responses), the control lane everything else (heartbeats, votes, read
//! index). A large append (a plugin swap carries a whole component) then
//! never holds heartbeats back long enough to cost the leader its term, as
//! etcd separates its append stream from its message stream. The raft loop
//! hands each peer its messages of one `Ready` as one batch through a bounded
//! queue and never waits: a full queue (dead or slow peer) drops the batch,
//! which raft tolerates, and reports the peer unreachable. A broken stream is
//! reconnected with capped exponential backoff.
//!
//! Snapshots (`MsgSnapshot`) go another way: a task per snapshot streams the
//! data in `chunk_bytes` pieces over `Peer.InstallSnapshot`, so states far
//! larger than one gRPC message transfer, and reports the outcome to the raft
//! loop (`report_snapshot`), which retries a failed one later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;

use super::{Link, SnapshotSent, Transport, TransportConfig};
use crate::plugin_id::PluginId;
use crate::proto::RaftBatch;
use crate::proto::peer_client::PeerClient;
use crate::storage::SnapshotPieces;

/// The gRPC transport. Cheap to clone.
#[derive(Clone)]
pub(crate) struct GrpcTransport {
    inner: Arc<Mutex<Inner>>,
    config: TransportConfig,
    link: Link,
    /// Where snapshot outcomes are reported (the raft loop).
    reports: mpsc::Sender<SnapshotSent>,
    /// Where snapshots that raft sends by reference are read from.
    snapshots: Arc<dyn SnapshotPieces>,
}

struct Inner {
    self_id: u64,
    peers: HashMap<u64, Peer>,
}

struct Peer {
    addr: String,
    data: mpsc::Sender<Vec<Message>>,
    control: mpsc::Sender<Vec<Message>>,
}

impl GrpcTransport {
    /// Snapshot outcomes go to `reports`; snapshots that raft sends by
    /// reference are read from `snapshots`.
    pub(crate) fn new(
        link: Link,
        config: TransportConfig,
        reports: mpsc::Sender<SnapshotSent>,
        snapshots: Arc<dyn SnapshotPieces>,
    ) -> GrpcTransport {
        GrpcTransport {
            inner: Arc::new(Mutex::new(Inner {
                self_id: link.self_id,
                peers: HashMap::new(),
            })),
            config,
            link,
            reports,
            snapshots,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for GrpcTransport {
    fn set_peer(&self, id: u64, addr: String) {
        let mut inner = self.lock();
        if id == inner.self_id || inner.peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let (data, data_batches) = mpsc::channel(self.config.peer_queue_batches);
        let (control, control_batches) = mpsc::channel(self.config.peer_queue_batches);
        tokio::spawn(peer_task(
            id,
            addr.clone(),
            data_batches,
            self.config.clone(),
            self.link.clone(),
        ));
        tokio::spawn(peer_task(
            id,
            addr.clone(),
            control_batches,
            self.config.clone(),
            self.link.clone(),
        ));
        // Replacing the entry drops the old queues, which ends the old tasks.
        inner.peers.insert(id, Peer { addr, data, control });
    }

    fn remove_peer(&self, id: u64) {
        self.lock().peers.remove(&id);
    }

    fn send(&self, messages: Vec<Message>) -> Vec<u64> {
        if messages.is_empty() {
            return Vec::new();
        }
        let mut by_peer: HashMap<(u64, bool), Vec<Message>> = HashMap::new();
        let inner = self.lock();
        let mut unreachable = Vec::new();
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                match inner.peers.get(&message.to) {
                    Some(peer) => {
                        tokio::spawn(send_snapshot(
                            peer.addr.clone(),
                            message,
                            self.config.clone(),
                            self.link.clone(),
                            self.reports.clone(),
                            self.snapshots.clone(),
                        ));
                    }
                    None => unreachable.push(message.to),
                }
                continue;
            }
            by_peer
                .entry((message.to, super::is_data(&message)))
                .or_default()
                .push(message);
        }
        for ((to, data), batch) in by_peer {
            let queued = inner.peers.get(&to).is_some_and(|peer| {
                let lane = if data { &peer.data } else { &peer.control };
                lane.try_send(batch).is_ok()
            });
            if !queued && !unreachable.contains(&to) {
                unreachable.push(to);
            }
        }
        unreachable
    }
}

async fn peer_task(
    id: u64,
    addr: String,
    mut batches: mpsc::Receiver<Vec<Message>>,
    config: TransportConfig,
    link: Link,
) {
    let mut backoff = Duration::from_millis(config.min_backoff_ms);
    let max_backoff = Duration::from_millis(config.max_backoff_ms);
    'connect: loop {
        let client = match link.dialer.endpoint(&addr, Duration::from_secs(1)) {
            Ok(endpoint) => endpoint.connect().await,
            Err(error) => {
                tracing::error!(peer = id, %addr, %error, "bad peer address; not sending to it");
                return;
            }
        };
        let channel = match client {
            Ok(channel) => channel,
            Err(error) => {
                let error = crate::dial::innermost(&error);
                tracing::debug!(peer = id, %addr, %error, "cannot connect to peer; retrying");
                // Drop what queued up meanwhile: raft resends what matters,
                // and stale heartbeats only confuse a recovering peer.
                if sleep_or_closed(&mut batches, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(max_backoff);
                continue 'connect;
            }
        };
        let mut client = PeerClient::new(channel)
            .max_encoding_message_size(config.max_message_bytes)
            .max_decoding_message_size(config.max_message_bytes);
        let (stream_tx, stream_rx) = mpsc::channel::<RaftBatch>(64);
        let call = tokio::spawn(async move {
            client
                .stream(tokio_stream::wrappers::ReceiverStream::new(stream_rx))
                .await
        });
        tracing::debug!(peer = id, %addr, "connected to peer");
        backoff = Duration::from_millis(config.min_backoff_ms);
        loop {
            let Some(batch) = batches.recv().await else {
                return;
            };
            let batch = link.batch(id, &batch);
            if stream_tx.send(batch).await.is_err() {
                let result = call.await;
                tracing::debug!(peer = id, %addr, ?result, "peer stream ended; reconnecting");
                continue 'connect;
            }
        }
    }
}

/// Sleep for `delay` while discarding queued batches. True if the queue closed.
async fn sleep_or_closed(batches: &mut mpsc::Receiver<Vec<Message>>, delay: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            batch = batches.recv() => if batch.is_none() { return true },
        }
    }
}

/// Stream one snapshot to a peer over `Peer.InstallSnapshot` and report the
/// outcome to the raft loop.
async fn send_snapshot(
    addr: String,
    message: Message,
    config: TransportConfig,
    link: Link,
    reports: mpsc::Sender<SnapshotSent>,
    store: Arc<dyn SnapshotPieces>,
) {
    let to = message.to;
    let index = message.get_snapshot().get_metadata().index;
    let started = std::time::Instant::now();
    let chunks = super::snapshot_chunks(message, config.snapshot_chunk_bytes, link.cluster_id, Some(store));
    let result = async move {
        let mut chunks = chunks?;
        let channel = link.dialer.connect(&addr, Duration::from_secs(2)).await?;
        let mut client = PeerClient::new(channel)
            .max_encoding_message_size(config.max_message_bytes)
            .max_decoding_message_size(config.max_message_bytes);
        // A producer task feeds the request through a short channel (a
        // concrete stream type, and at most two chunks in flight).
        let (feed, stream) = mpsc::channel(2);
        let producer = tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(chunk) = chunks.next().await {
                if feed.send(chunk).await.is_err() {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(stream);
        let _producer = AbortOnDrop(producer);
        client
            .install_snapshot(stream)
            .await
            .map(|_| ())
            .map_err(|status| status.message().to_string())
    }
    .await;
    super::report_snapshot(&reports, to, index, started, result).await;
}

/// Aborts a task when dropped (a transfer that ended stops its producer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The apply worker's source of components this node lacks:
/// `Peer.FetchPlugin` on the members. The worker runs on a thread of its
/// own, never on the runtime, so it waits for the fetch on the runtime's
/// handle.
pub(crate) struct PeerPlugins {
    pub runtime: tokio::runtime::Handle,
    pub link: Link,
    pub max_message_bytes: usize,
}

impl crate::plugin_id::PluginSource for PeerPlugins {
    fn fetch(&self, id: PluginId, addrs: &[String]) -> anyhow::Result<Vec<u8>> {
        self.runtime
            .block_on(fetch_plugin(&self.link, &id.0, addrs.to_vec(), self.max_message_bytes))
    }
}

/// Fetch a plugin component by hash from the first member at `addrs` that
/// has it, checking the bytes against the hash.
pub async fn fetch_plugin(
    link: &Link,
    sha256: &[u8; 32],
    addrs: impl IntoIterator<Item = String>,
    max_message_bytes: usize,
) -> anyhow::Result<Vec<u8>> {
    let mut last_error = anyhow::anyhow!("no member to fetch it from");
    for addr in addrs {
        let attempt = async {
            let channel = link
                .dialer
                .connect(&addr, Duration::from_secs(2))
                .await
                .map_err(anyhow::Error::msg)?;
            let mut client = PeerClient::new(channel).max_decoding_message_size(max_message_bytes);
            let response = client
                .fetch_plugin(crate::proto::FetchPluginRequest {
                    sha256: sha256.to_vec(),
                    cluster_id: link.cluster_id,
                })
                .await
                .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
            anyhow::Ok(response.into_inner().wasm)
        };
        match attempt.await {
            Ok(wasm) if PluginId(*sha256).matches(&wasm) => return Ok(wasm),
            Ok(_) => last_error = anyhow::anyhow!("{addr} sent bytes that do not match the hash"),
            Err(error) => last_error = error.context(format!("from {addr}")),
        }
    }
    Err(last_error)
}
