//! The peer transport: how the raft loop's messages reach other nodes.
//!
//! The raft loop sees only [`Transport`]: it names peers by id and address,
//! hands over each `Ready`'s messages without waiting, and hears back which
//! peers could not take them (for `report_unreachable`). Snapshot messages
//! are sent as a stream of chunks, and their outcome comes back as a
//! [`SnapshotSent`] on the channel the transport was built with.
//!
//! Two implementations: [`grpc`], the one every node runs (long-lived
//! streams per peer over tonic), and, for tests, [`router`], which hands
//! batches to nodes in the same process and can drop, delay and cut them.
//! Both send the same `RaftBatch` and snapshot chunks, and both deliver
//! them to the receiving node's Peer service code (`server/peer.rs`), so
//! what a peer sends is checked the same way whichever carried it.

use std::sync::Arc;

use futures::StreamExt as _;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};

use crate::proto::{RaftBatch, SnapshotChunk};
use crate::snapshot::DataRef;
use crate::storage::{SnapshotPiece, SnapshotPieces};

pub(crate) mod grpc;
#[cfg(test)]
pub(crate) mod router;

pub use grpc::fetch_plugin;

/// Where the raft loop's messages go. Calls never block: a message that
/// cannot be queued is dropped, which raft tolerates.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Add a peer, or move it to a new address. Called within a tokio
    /// runtime (an implementation may start tasks).
    fn set_peer(&self, id: u64, addr: String);

    fn remove_peer(&self, id: u64);

    /// Queue messages for their peers. Returns the peers whose queue was
    /// full or unknown, for `report_unreachable`.
    fn send(&self, messages: Vec<Message>) -> Vec<u64>;
}

/// A snapshot transfer finished (or failed): raft hears of it through
/// `report_snapshot`, and sends again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSent {
    pub to: u64,
    pub ok: bool,
}

/// How peers are reached: `run`'s flags of that heading, the same names in
/// a `--config` file, and `RAFTIFY_*` variables.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Peers")]
#[serde(default)]
pub struct TransportConfig {
    /// Batches queued for one peer before new ones are dropped.
    #[arg(long, env = "RAFTIFY_PEER_QUEUE_BATCHES", default_value_t = TransportConfig::DEFAULT.peer_queue_batches)]
    pub peer_queue_batches: usize,
    /// Largest gRPC message sent or accepted, in bytes.
    #[arg(long, env = "RAFTIFY_MAX_MESSAGE_BYTES", default_value_t = TransportConfig::DEFAULT.max_message_bytes)]
    pub max_message_bytes: usize,
    /// First delay before dialling a peer again, in milliseconds; it
    /// doubles on each failure up to --max-backoff-ms.
    #[arg(long, env = "RAFTIFY_MIN_BACKOFF_MS", default_value_t = TransportConfig::DEFAULT.min_backoff_ms)]
    pub min_backoff_ms: u64,
    /// Longest delay before dialling a peer again, in milliseconds.
    #[arg(long, env = "RAFTIFY_MAX_BACKOFF_MS", default_value_t = TransportConfig::DEFAULT.max_backoff_ms)]
    pub max_backoff_ms: u64,
}

impl TransportConfig {
    pub const DEFAULT: TransportConfig = TransportConfig {
        peer_queue_batches: 1024,
        max_message_bytes: 64 << 20,
        min_backoff_ms: 50,
        max_backoff_ms: 2_000,
    };
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig::DEFAULT
    }
}

/// What every peer RPC this node makes shares: how to dial, and who is
/// calling (peers refuse batches from another cluster or another sender).
#[derive(Clone, Debug)]
pub struct Link {
    pub dialer: crate::dial::Dialer,
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

impl Link {
    /// One batch of messages for peer `to`, with what this node reports of
    /// itself in every batch; counted in the metrics.
    pub(crate) fn batch(&self, to: u64, messages: &[Message]) -> RaftBatch {
        let messages: Vec<Vec<u8>> = messages.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
        let bytes: usize = messages.iter().map(Vec::len).sum();
        self.metrics
            .peer_sent_bytes
            .with_label_values(&[to.to_string().as_str()])
            .inc_by(bytes as u64);
        RaftBatch {
            messages,
            cluster_id: self.cluster_id,
            from: self.self_id,
            no_space: self.space.over(),
            no_plugin_memory: self.space.memory_over(),
            plugins: self.plugins.to_proto(),
            cannot_apply: self.health.stalled(),
            epoch_want: self.epochs.want(),
            epoch_digest: self
                .epochs
                .latest_digest()
                .map(|(index, sha256)| crate::proto::EpochDigest {
                    index,
                    sha256: sha256.to_vec(),
                }),
        }
    }
}

/// What a transport needs of the node it sends for.
#[derive(Clone)]
pub(crate) struct Sending {
    pub link: Link,
    pub config: TransportConfig,
    /// Bytes of snapshot data in one chunk (`SnapshotConfig::chunk_bytes`).
    pub snapshot_chunk_bytes: usize,
    /// Where snapshot outcomes are reported (the raft loop).
    pub reports: tokio::sync::mpsc::Sender<SnapshotSent>,
    /// Where snapshots that raft sends by reference are read from.
    pub snapshots: Arc<dyn SnapshotPieces>,
}

/// Log replication goes on the data lane; the rest is small and urgent.
fn is_data(message: &Message) -> bool {
    matches!(
        message.get_msg_type(),
        MessageType::MsgAppend | MessageType::MsgAppendResponse
    )
}

/// A peer's two queues, each drained in order by a task of its own: log
/// replication on `data`, everything else on `control`, so a large append
/// never holds a heartbeat back.
pub(crate) struct Lanes {
    pub data: tokio::sync::mpsc::Sender<Vec<Message>>,
    pub control: tokio::sync::mpsc::Sender<Vec<Message>>,
}

/// Hand one `Ready`'s messages to their peers without waiting: one batch
/// per peer and lane into `lanes_of(peer)`, each snapshot to
/// `send_snapshot`. Returns the peers that took nothing (unknown, or a
/// full queue), for `report_unreachable`.
pub(crate) fn dispatch<'a>(
    messages: Vec<Message>,
    lanes_of: impl Fn(u64) -> Option<&'a Lanes>,
    mut send_snapshot: impl FnMut(Message),
) -> Vec<u64> {
    let mut batches: std::collections::HashMap<(u64, bool), Vec<Message>> = Default::default();
    let mut unreachable = Vec::new();
    for message in messages {
        if lanes_of(message.to).is_none() {
            if !unreachable.contains(&message.to) {
                unreachable.push(message.to);
            }
        } else if message.get_msg_type() == MessageType::MsgSnapshot {
            send_snapshot(message);
        } else {
            batches
                .entry((message.to, is_data(&message)))
                .or_default()
                .push(message);
        }
    }
    for ((to, data), batch) in batches {
        let lanes = lanes_of(to).expect("known above");
        let lane = if data { &lanes.data } else { &lanes.control };
        if lane.try_send(batch).is_err() && !unreachable.contains(&to) {
            unreachable.push(to);
        }
    }
    unreachable
}

/// The chunks of one snapshot message, as `Peer.InstallSnapshot` takes
/// them: first the raft message (its data taken out) with the total size,
/// then the data. Data that refers to the stored snapshot is read from
/// `store` a piece at a time as the stream is polled, so memory stays at
/// about a chunk; if a newer snapshot replaces it meanwhile, the stream
/// ends short, the receiver refuses it, and raft retries with the newer one.
pub(crate) fn snapshot_chunks(
    mut message: Message,
    chunk_bytes: usize,
    cluster_id: u64,
    store: Option<Arc<dyn SnapshotPieces>>,
) -> Result<futures::stream::BoxStream<'static, SnapshotChunk>, String> {
    let index = message.get_snapshot().get_metadata().index;
    let data = std::mem::take(&mut message.mut_snapshot().data);
    let chunk = chunk_bytes.max(1);
    let (total, pieces) = match DataRef::parse(&data) {
        Some(DataRef::Stored { len }) => match store {
            Some(store) => (len, stored_pieces(store, index, chunk)),
            None => return Err("no store to read the snapshot from".to_string()),
        },
        Some(DataRef::File { .. }) => return Err("a received snapshot cannot be sent on".to_string()),
        None => (data.len() as u64, memory_pieces(data, chunk)),
    };
    let header = message.write_to_bytes().map_err(|e| e.to_string())?;
    let first = SnapshotChunk {
        message: header,
        total_bytes: total,
        data: Vec::new(),
        cluster_id,
    };
    Ok(futures::stream::iter(std::iter::once(first)).chain(pieces).boxed())
}

/// Send one snapshot message: `deliver` gets its chunks (see
/// [`snapshot_chunks`]) and carries them to peer `to`; the outcome is
/// logged and reported to the raft loop, which retries a failure.
pub(crate) async fn send_snapshot<F, D>(sending: &Sending, message: Message, deliver: D)
where
    D: FnOnce(u64, futures::stream::BoxStream<'static, SnapshotChunk>) -> F,
    F: std::future::Future<Output = Result<(), String>>,
{
    let to = message.to;
    let index = message.get_snapshot().get_metadata().index;
    let started = std::time::Instant::now();
    let chunks = snapshot_chunks(
        message,
        sending.snapshot_chunk_bytes,
        sending.link.cluster_id,
        Some(sending.snapshots.clone()),
    );
    let result = match chunks {
        Ok(chunks) => deliver(to, chunks).await,
        Err(error) => Err(error),
    };
    match &result {
        Ok(()) => tracing::info!(
            peer = to,
            index,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sent a snapshot"
        ),
        Err(error) => tracing::warn!(peer = to, index, %error, "sending a snapshot failed; raft will retry"),
    }
    let ok = result.is_ok();
    let _ = sending.reports.send(SnapshotSent { to, ok }).await;
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
