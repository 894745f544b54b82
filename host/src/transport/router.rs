//! An in-process network for test clusters. Nodes in one process register
//! with a [`Router`] by id; their transports send the same batches and
//! snapshot chunks the gRPC transport sends, handed straight to the
//! receiving node's Peer service code (`Services::receive_batch`,
//! `Services::receive_snapshot`), so every check a peer's bytes get over
//! gRPC they get here too. The test holds the network: it can cut a node
//! off from every other, drop one batch in N (seeded, reproducible) and
//! delay every batch.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use raft::prelude::Message;
use tokio::sync::mpsc;

use super::{Lanes, Link, Sending, Transport};
use crate::server::Services;

/// The network between the nodes registered with it.
pub(crate) struct Router {
    state: Mutex<State>,
}

struct State {
    /// The receiving side of each registered node.
    nodes: HashMap<u64, Services>,
    /// Nodes cut off from every other node.
    cut: BTreeSet<u64>,
    /// Drop one batch in this many (0: none), by `dice`.
    drop_one_in: u64,
    /// xorshift64* state: the same seed drops the same batches.
    dice: u64,
    /// How long each batch takes to arrive.
    delay: Duration,
    /// Batches and snapshots that did not arrive (cut, dropped, no node).
    lost: u64,
    /// Snapshots the receiver took.
    snapshots: u64,
}

/// A node's registration; dropping it takes the node off the network.
pub(crate) struct Registered {
    router: Arc<Router>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.router.lock().nodes.remove(&self.id);
    }
}

impl Router {
    /// A network that delivers everything at once until told otherwise;
    /// `seed` decides which batches [`Router::drop_one_in`] drops.
    pub(crate) fn new(seed: u64) -> Arc<Router> {
        Arc::new(Router {
            state: Mutex::new(State {
                nodes: HashMap::new(),
                cut: BTreeSet::new(),
                drop_one_in: 0,
                dice: seed | 1,
                delay: Duration::ZERO,
                lost: 0,
                snapshots: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deliver what peers send `id` to `services` until the registration
    /// drops.
    pub(crate) fn register(self: &Arc<Self>, id: u64, services: Services) -> Registered {
        self.lock().nodes.insert(id, services);
        Registered {
            router: self.clone(),
            id,
        }
    }

    /// Cut `id` off from every other node, both ways.
    pub(crate) fn cut_off(&self, id: u64) {
        self.lock().cut.insert(id);
    }

    /// Reconnect every node that was cut off.
    pub(crate) fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Drop one batch in `n` from now on (0: none).
    pub(crate) fn drop_one_in(&self, n: u64) {
        self.lock().drop_one_in = n;
    }

    /// Delay every batch by `delay` from now on.
    pub(crate) fn delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// How many batches and snapshots did not arrive so far.
    pub(crate) fn lost(&self) -> u64 {
        self.lock().lost
    }

    /// How many snapshots a receiver took so far.
    pub(crate) fn snapshots_delivered(&self) -> u64 {
        self.lock().snapshots
    }

    /// The transport for the node `sending` describes.
    pub(crate) fn transport(self: &Arc<Self>, sending: Sending) -> RoutedTransport {
        RoutedTransport {
            router: self.clone(),
            sending,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Where something `from` sends `to` goes now, and after how long:
    /// nowhere if either is cut off, the dice drop it, or `to` is not
    /// running.
    fn route(&self, from: u64, to: u64) -> Option<(Services, Duration)> {
        let mut state = self.lock();
        let dropped = state.drop_one_in > 0 && {
            let mut x = state.dice;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            state.dice = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d).is_multiple_of(state.drop_one_in)
        };
        let route = match state.nodes.get(&to) {
            Some(services) if !dropped && !state.cut.contains(&from) && !state.cut.contains(&to) => {
                Some((services.clone(), state.delay))
            }
            _ => None,
        };
        if route.is_none() {
            state.lost += 1;
        }
        route
    }
}

/// One node's side of the router: per peer a data lane and a control lane,
/// each a task that delivers its batches in order, as the gRPC transport's
/// streams do.
pub(crate) struct RoutedTransport {
    router: Arc<Router>,
    sending: Sending,
    lanes: Mutex<HashMap<u64, Lanes>>,
}

impl RoutedTransport {
    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lanes>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lane(&self, to: u64) -> mpsc::Sender<Vec<Message>> {
        let (lane, batches) = mpsc::channel(self.sending.config.peer_queue_batches);
        tokio::spawn(deliver(self.router.clone(), self.sending.link.clone(), to, batches));
        lane
    }
}

impl Transport for RoutedTransport {
    fn set_peer(&self, id: u64, _addr: String) {
        if id == self.sending.link.self_id || self.lanes().contains_key(&id) {
            return;
        }
        let lanes = Lanes {
            data: self.lane(id),
            control: self.lane(id),
        };
        self.lanes().insert(id, lanes);
    }

    fn remove_peer(&self, id: u64) {
        self.lanes().remove(&id);
    }

    fn send(&self, messages: Vec<Message>) -> Vec<u64> {
        let lanes = self.lanes();
        super::dispatch(
            messages,
            |to| lanes.get(&to),
            |message| {
                let (router, sending) = (self.router.clone(), self.sending.clone());
                tokio::spawn(async move {
                    let from = sending.link.self_id;
                    super::send_snapshot(&sending, message, |to, chunks| {
                        install_snapshot(&router, from, to, chunks)
                    })
                    .await
                });
            },
        )
    }
}

/// One lane: each batch, in order, to `to` through the router, as a gRPC
/// stream would carry it. Ends when the lane's sender drops.
async fn deliver(router: Arc<Router>, link: Link, to: u64, mut batches: mpsc::Receiver<Vec<Message>>) {
    while let Some(batch) = batches.recv().await {
        let Some((receiver, delay)) = router.route(link.self_id, to) else {
            continue;
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Err(status) = receiver.receive_batch(link.batch(to, &batch)).await {
            tracing::debug!(peer = to, %status, "a routed batch was refused");
        }
    }
}

/// One snapshot's chunks streamed into the receiver's snapshot reception.
async fn install_snapshot(
    router: &Router,
    from: u64,
    to: u64,
    chunks: futures::stream::BoxStream<'static, crate::proto::SnapshotChunk>,
) -> Result<(), String> {
    let (receiver, delay) = router
        .route(from, to)
        .ok_or_else(|| "the network did not deliver it".to_string())?;
    tokio::time::sleep(delay).await;
    receiver
        .receive_snapshot(chunks.map(Ok))
        .await
        .map_err(|status| status.message().to_string())?;
    router.lock().snapshots += 1;
    Ok(())
}
