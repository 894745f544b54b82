//! The peer transport: raft messages to other nodes over gRPC.
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

use futures::StreamExt as _;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;

use crate::dial::Dialer;
use crate::plugin_id::PluginId;
use crate::proto::peer_client::PeerClient;
use crate::proto::{RaftBatch, SnapshotChunk};
use crate::snapshot::DataRef;
use crate::storage::{SnapshotPiece, SnapshotPieces};

/// A snapshot transfer finished (or failed): raft hears of it through
/// `report_snapshot`, and sends again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSent {
    pub to: u64,
    pub ok: bool,
}

/// Transport limits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportConfig {
    /// Batches queued for one peer before new ones are dropped.
    pub peer_queue_batches: usize,
    /// Largest gRPC message sent or accepted, in bytes.
    pub max_message_bytes: usize,
    /// First reconnect delay; doubles up to `max_backoff_ms`.
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Size of one chunk of snapshot data.
    pub snapshot_chunk_bytes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            peer_queue_batches: 1024,
            max_message_bytes: 64 << 20,
            min_backoff_ms: 50,
            max_backoff_ms: 2_000,
            snapshot_chunk_bytes: 1 << 20,
        }
    }
}

/// Handle the raft loop uses to send. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Mutex<Inner>>,
    config: TransportConfig,
    link: Link,
}

/// What every peer RPC this node makes shares: how to dial, and who is
/// calling (peers refuse batches from another cluster or another sender).
#[derive(Clone, Debug)]
pub struct Link {
    pub dialer: Dialer,
    pub cluster_id: u64,
    pub self_id: u64,
    /// This node's space (its batches tell the leader when it is out), and
    /// what peers' batches said of theirs.
    pub space: Arc<crate::space::SpaceState>,
    /// The components this node prepares for a swap, and what peers' batches
    /// said of theirs (see `readiness`).
    pub plugins: Arc<crate::readiness::PluginReadiness>,
    /// Whether this node can apply, and what peers' batches said of theirs.
    pub health: Arc<crate::health::ApplyHealth>,
    /// This node's snapshot want and epoch digests, and peers' (see
    /// `epochs`).
    pub epochs: Arc<crate::epochs::Epochs>,
    /// What this node measures as it happens, for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

struct Inner {
    self_id: u64,
    peers: HashMap<u64, Peer>,
    /// Where snapshot outcomes are reported (the raft loop).
    reports: Option<mpsc::Sender<SnapshotSent>>,
    /// Where snapshots that raft sends by reference are read from.
    snapshots: Option<Arc<dyn SnapshotPieces>>,
}

struct Peer {
    addr: String,
    data: mpsc::Sender<Vec<Message>>,
    control: mpsc::Sender<Vec<Message>>,
}

/// Log replication goes on the data lane; the rest is small and urgent.
fn is_data(message: &Message) -> bool {
    matches!(
        message.get_msg_type(),
        MessageType::MsgAppend | MessageType::MsgAppendResponse
    )
}

impl Transport {
    pub fn new(link: Link, config: TransportConfig) -> Transport {
        Transport {
            inner: Arc::new(Mutex::new(Inner {
                self_id: link.self_id,
                peers: HashMap::new(),
                reports: None,
                snapshots: None,
            })),
            config,
            link,
        }
    }

    /// What every peer RPC this node makes shares, and the reports its
    /// batches carry.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Where to report snapshot transfers.
    pub fn report_to(&self, node: mpsc::Sender<SnapshotSent>) {
        self.lock().reports = Some(node);
    }

    /// Where to read stored snapshots from (raft's snapshot messages name
    /// the stored one rather than carry it).
    pub fn serve_snapshots_from(&self, store: Arc<dyn SnapshotPieces>) {
        self.lock().snapshots = Some(store);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a peer, or move it to a new address. Must be called within a
    /// tokio runtime (it starts the peer's task).
    pub fn set_peer(&self, id: u64, addr: String) {
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

    pub fn remove_peer(&self, id: u64) {
        self.lock().peers.remove(&id);
    }

    /// Queue messages for their peers without blocking. Returns the peers
    /// whose queue was full or unknown, for `report_unreachable`.
    pub fn send(&self, messages: Vec<Message>) -> Vec<u64> {
        if messages.is_empty() {
            return Vec::new();
        }
        let mut by_peer: HashMap<(u64, bool), Vec<Message>> = HashMap::new();
        let inner = self.lock();
        let mut unreachable = Vec::new();
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                match (inner.peers.get(&message.to), &inner.reports) {
                    (Some(peer), Some(reports)) => {
                        tokio::spawn(send_snapshot(
                            peer.addr.clone(),
                            message,
                            self.config.clone(),
                            self.link.clone(),
                            reports.clone(),
                            inner.snapshots.clone(),
                        ));
                    }
                    _ => unreachable.push(message.to),
                }
                continue;
            }
            by_peer
                .entry((message.to, is_data(&message)))
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
            let messages: Vec<Vec<u8>> = batch.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
            let bytes: usize = messages.iter().map(Vec::len).sum();
            link.metrics
                .peer_sent_bytes
                .with_label_values(&[id.to_string().as_str()])
                .inc_by(bytes as u64);
            let batch = RaftBatch {
                messages,
                cluster_id: link.cluster_id,
                from: link.self_id,
                no_space: link.space.over(),
                plugins: link.plugins.to_proto(),
                cannot_apply: link.health.stalled(),
                epoch_want: link.epochs.want(),
                epoch_digest: link
                    .epochs
                    .latest_digest()
                    .map(|(index, sha256)| crate::proto::EpochDigest {
                        index,
                        sha256: sha256.to_vec(),
                    }),
            };
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

/// Stream one snapshot to a peer and report the outcome to the raft loop.
/// Data that refers to the stored snapshot is read from the store a piece
/// at a time as the stream is polled, so memory stays at about a chunk;
/// if a newer snapshot replaces it meanwhile, the stream ends short, the
/// receiver refuses it, and raft retries with the newer one.
async fn send_snapshot(
    addr: String,
    mut message: Message,
    config: TransportConfig,
    link: Link,
    reports: mpsc::Sender<SnapshotSent>,
    store: Option<Arc<dyn SnapshotPieces>>,
) {
    let to = message.to;
    let index = message.get_snapshot().get_metadata().index;
    let data = std::mem::take(&mut message.mut_snapshot().data);
    let started = std::time::Instant::now();
    let chunk = config.snapshot_chunk_bytes.max(1);
    let source = match DataRef::parse(&data) {
        Some(DataRef::Stored { len }) => match store {
            Some(store) => Ok((len, stored_pieces(store, index, chunk))),
            None => Err("no store to read the snapshot from".to_string()),
        },
        Some(DataRef::File { .. }) => Err("a received snapshot cannot be sent on".to_string()),
        None => Ok((data.len() as u64, memory_pieces(data, chunk))),
    };
    let result = async move {
        let (total, pieces) = source?;
        let header = message.write_to_bytes().map_err(|e| e.to_string())?;
        let channel = link.dialer.connect(&addr, Duration::from_secs(2)).await?;
        let mut client = PeerClient::new(channel)
            .max_encoding_message_size(config.max_message_bytes)
            .max_decoding_message_size(config.max_message_bytes);
        let first = SnapshotChunk {
            message: header,
            total_bytes: total,
            data: Vec::new(),
            cluster_id: link.cluster_id,
        };
        // A producer task feeds the request through a short channel (a
        // concrete stream type, and at most two chunks in flight).
        let (feed, stream) = mpsc::channel(2);
        let producer = tokio::spawn(async move {
            let mut pieces = futures::stream::iter(std::iter::once(first)).chain(pieces);
            while let Some(chunk) = pieces.next().await {
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
            .map_err(|status| status.message().to_string())
    }
    .await;
    let ok = result.is_ok();
    match result {
        Ok(_) => tracing::info!(
            peer = to,
            index,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sent a snapshot"
        ),
        Err(error) => tracing::warn!(peer = to, index, %error, "sending a snapshot failed; raft will retry"),
    }
    let _ = reports.send(SnapshotSent { to, ok }).await;
}

/// Aborts a task when dropped (a transfer that ended stops its producer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Snapshot data held in memory, a chunk copied out at a time as the stream
/// is polled.
fn memory_pieces(data: bytes::Bytes, chunk: usize) -> futures::stream::BoxStream<'static, SnapshotChunk> {
    let total = data.len();
    let pieces = (0..total)
        .step_by(chunk)
        .map(move |at| chunk_of(data.slice(at..(at + chunk).min(total)).to_vec()));
    futures::stream::iter(pieces).boxed()
}

fn chunk_of(data: Vec<u8>) -> SnapshotChunk {
    SnapshotChunk {
        message: Vec::new(),
        total_bytes: 0,
        data,
        cluster_id: 0,
    }
}

/// The stored snapshot at `index`, read a piece at a time (off the async
/// threads) and cut into pieces of at most `chunk` bytes. Ends early if
/// the snapshot is superseded or cannot be read.
fn stored_pieces(
    store: Arc<dyn SnapshotPieces>,
    index: u64,
    chunk: usize,
) -> futures::stream::BoxStream<'static, SnapshotChunk> {
    let start = (Some(0u32), std::collections::VecDeque::<Vec<u8>>::new());
    futures::stream::unfold(start, move |(mut next, mut parts)| {
        let store = store.clone();
        async move {
            loop {
                if let Some(part) = parts.pop_front() {
                    return Some((chunk_of(part), (next, parts)));
                }
                let piece = next?;
                let reader = store.clone();
                let read = tokio::task::spawn_blocking(move || reader.piece(index, piece)).await;
                match read {
                    Ok(Ok(SnapshotPiece::Data(data))) => {
                        next = piece.checked_add(1);
                        if data.len() <= chunk {
                            parts.push_back(data);
                        } else {
                            parts.extend(data.chunks(chunk).map(<[u8]>::to_vec));
                        }
                    }
                    Ok(Ok(SnapshotPiece::End)) => return None,
                    Ok(Ok(SnapshotPiece::Superseded)) => {
                        tracing::info!(index, "a newer snapshot replaced the one being sent");
                        return None;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(index, %error, "cannot read the snapshot being sent");
                        return None;
                    }
                    Err(_) => return None,
                }
            }
        }
    })
    .boxed()
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
