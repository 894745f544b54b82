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

use raft::prelude::Message;
use tokio::sync::mpsc;

use super::{Lanes, Link, Sending, Transport, TransportConfig};
use crate::plugin_id::PluginId;
use crate::proto::RaftBatch;
use crate::proto::peer_client::PeerClient;

/// The gRPC transport. Cheap to clone.
#[derive(Clone)]
pub(crate) struct GrpcTransport {
    inner: Arc<Mutex<Inner>>,
    sending: Sending,
}

struct Inner {
    self_id: u64,
    peers: HashMap<u64, Peer>,
}

struct Peer {
    addr: String,
    lanes: Lanes,
}

impl GrpcTransport {
    pub(crate) fn new(sending: Sending) -> GrpcTransport {
        GrpcTransport {
            inner: Arc::new(Mutex::new(Inner {
                self_id: sending.link.self_id,
                peers: HashMap::new(),
            })),
            sending,
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
        // A lane: a queue and the task that streams it to the peer.
        let lane = || {
            let (lane, batches) = mpsc::channel(self.sending.config.peer_queue_batches);
            tokio::spawn(peer_task(
                id,
                addr.clone(),
                batches,
                self.sending.config.clone(),
                self.sending.link.clone(),
            ));
            lane
        };
        let lanes = Lanes {
            data: lane(),
            control: lane(),
        };
        // Replacing the entry drops the old queues, which ends the old tasks.
        inner.peers.insert(id, Peer { addr, lanes });
    }

    fn remove_peer(&self, id: u64) {
        self.lock().peers.remove(&id);
    }

    fn send(&self, messages: Vec<Message>) -> Vec<u64> {
        let inner = self.lock();
        super::dispatch(
            messages,
            |to| inner.peers.get(&to).map(|peer| &peer.lanes),
            |message| {
                let (addr, sending) = (inner.peers[&message.to].addr.clone(), self.sending.clone());
                tokio::spawn(async move {
                    super::send_snapshot(&sending, message, |_, chunks| install_snapshot(&addr, &sending, chunks)).await
                });
            },
        )
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

/// Stream one snapshot's chunks to the peer at `addr` over
/// `Peer.InstallSnapshot`.
async fn install_snapshot(
    addr: &str,
    sending: &Sending,
    mut chunks: futures::stream::BoxStream<'static, crate::proto::SnapshotChunk>,
) -> Result<(), String> {
    let channel = sending.link.dialer.connect(addr, Duration::from_secs(2)).await?;
    let max = sending.config.max_message_bytes;
    let mut client = PeerClient::new(channel)
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);
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
