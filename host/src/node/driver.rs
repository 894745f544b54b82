//! The driver: one task runs the [`Core`] and does its IO.
//!
//! Each turn: wait for a tick, a request, a persistence report or an
//! applied-index report; drain every other queued request (so one `Ready`
//! covers as much as possible); then handle the `Ready` and carry out the
//! core's actions in order:
//!
//! 1. the leader's messages leave first (raft allows them before
//!    persisting, so the leader's own write runs in parallel with
//!    replication);
//! 2. committed entries go to the apply worker (the core has applied conf
//!    changes to raft already);
//! 3. new entries, staged so raft can read them back at once, go with the
//!    hard state to the persister thread; messages that need them durable
//!    wait in the core until the persister reports them so.
//!
//! The loop never waits for an fsync: while one runs, it keeps stepping
//! messages and proposals, and the persister writes everything that queued
//! up meanwhile in its next transaction (group commit). The one exception
//! is a leader's snapshot, which replaces the log after every earlier write.
//!
//! Applying is asynchronous too: the worker reports its applied index back
//! and the core calls `advance_apply_to`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use raft::prelude::{MessageType, Snapshot};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::core::{Action, Core, CoreParts, Installing, Reply};
use super::{NodeError, NodeRequest, RaftConfig};
use crate::firewall::{Channel, Refusals};
use crate::fsm::FsmRequest;
use crate::limits::LimitsWatch;
use crate::outcome::ApplyWaiter;
use crate::space::SpaceWatch;
use crate::storage::persister::{Completion, Persister};
use crate::storage::{LogStore, NodeIdentity, StoreError};
use crate::transport::{Link, SnapshotSent, Transport};

/// Who waits on a read index.
pub(crate) type ReadWaiter = oneshot::Sender<super::core::ReadIndexed>;

impl<T> Reply<T> for oneshot::Sender<T> {
    fn send(self, value: T) {
        // The caller may have given up; then no one is told.
        let _ = oneshot::Sender::send(self, value);
    }

    fn is_closed(&self) -> bool {
        oneshot::Sender::is_closed(self)
    }
}

pub struct Node<S: LogStore> {
    core: Core<S, ApplyWaiter, ReadWaiter>,
    store: S,
    tick_interval: Duration,
    persister: Persister,
    persisted: std_mpsc::Receiver<Completion>,
    persisted_wake: Arc<Notify>,
    transport: Arc<dyn Transport>,
    fsm: std_mpsc::Sender<FsmRequest>,
    applied: watch::Receiver<u64>,
    /// Space readings, and the leader's alarm proposals.
    space: SpaceWatch,
    /// The leader's proposal of the sandbox limits, when none are recorded.
    limits: LimitsWatch,
    /// When the latest heartbeat to each peer left, until it is answered
    /// (the round-trip metric; heartbeats go only to members).
    heartbeats_out: HashMap<u64, Instant>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Who leads, published after each turn that changed it.
    leadership: watch::Sender<super::Leadership>,
    published: super::Leadership,
}

impl<S: LogStore> Node<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: NodeIdentity,
        store: S,
        config: RaftConfig,
        transport: Arc<dyn Transport>,
        link: &Link,
        fsm: std_mpsc::Sender<FsmRequest>,
        applied: watch::Receiver<u64>,
        refusals: Arc<Refusals>,
        health: Arc<crate::health::ApplyHealth>,
        space: SpaceWatch,
        limits: LimitsWatch,
        logger: slog::Logger,
    ) -> Result<Node<S>, NodeError> {
        let tick_interval = Duration::from_millis(config.tick_interval_ms);
        let core = Core::new(CoreParts {
            identity,
            store: store.clone(),
            config,
            applied: *applied.borrow(),
            read_nonce: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()).rotate_left(32),
            refusals,
            health,
            epochs: link.epochs.clone(),
            proposals_failed: link.metrics.proposals_failed.clone(),
            logger,
        })?;
        let (done, persisted) = std_mpsc::channel();
        let persisted_wake = Arc::new(Notify::new());
        let wake = persisted_wake.clone();
        // Out of space, writes wait (and the alarm goes up) rather than
        // stop the node.
        let (space_state, min_free, reader) = (space.state(), space.config().min_free_bytes, store.clone());
        let out_of_space = move |error: &StoreError| {
            let free = reader
                .space()
                .ok()
                .filter(|usage| usage.fs_total_bytes > 0)
                .map(|usage| usage.fs_free_bytes);
            let out = error.is_out_of_space(free, min_free);
            if out {
                space_state.mark_out_of_space();
            }
            out
        };
        let fsync = link.metrics.wal_fsync.clone();
        let written = move |took: Duration| fsync.observe(took.as_secs_f64());
        let persister =
            Persister::start_waiting_for_space(store.clone(), done, move || wake.notify_one(), out_of_space, written)
                .map_err(|e| NodeError::Store(StoreError::Io(e)))?;
        let published = core.leadership();
        let leadership = watch::Sender::new(published);
        Ok(Node {
            leadership,
            published,
            core,
            store,
            tick_interval,
            persister,
            persisted,
            persisted_wake,
            transport,
            fsm,
            applied,
            space,
            limits,
            heartbeats_out: HashMap::new(),
            metrics: link.metrics.clone(),
        })
    }

    /// Who leads, as this node sees it, from now on.
    pub fn leadership(&self) -> watch::Receiver<super::Leadership> {
        self.leadership.subscribe()
    }

    /// Run until a `Shutdown` request, `requests` closing, or a fatal error.
    /// `snapshots_sent` are the transport's reports of snapshot transfers.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<NodeRequest>,
        mut snapshots_sent: mpsc::Receiver<SnapshotSent>,
    ) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                request = requests.recv() => {
                    let Some(mut request) = request else { return Ok(()) };
                    // Drain whatever else is queued: one Ready for all of it.
                    loop {
                        if matches!(request, NodeRequest::Shutdown) {
                            return Ok(());
                        }
                        self.handle(request);
                        match requests.try_recv() {
                            Ok(next) => request = next,
                            Err(_) => break,
                        }
                    }
                }
                Some(SnapshotSent { to, ok }) = snapshots_sent.recv() => self.core.snapshot_sent(to, ok),
                _ = self.persisted_wake.notified() => {
                    while let Ok(completion) = self.persisted.try_recv() {
                        self.core.persisted(completion?);
                    }
                }
                changed = self.applied.changed() => {
                    if changed.is_err() {
                        return Err(NodeError::FsmGone);
                    }
                    let applied = *self.applied.borrow_and_update();
                    self.core.applied(applied)?;
                }
            }
            self.execute()?;
            if self.core.has_ready() {
                self.on_ready()?;
            }
            // Compared here first: the watch's lock is taken only when an
            // election changed something, not on every turn of the loop.
            let now = self.core.leadership();
            if now != self.published {
                self.published = now;
                self.leadership.send_replace(now);
            }
        }
    }

    fn on_tick(&mut self) {
        self.core.tick(Instant::now());
        let (leader, members) = (self.core.is_leader(), self.core.members());
        for entry in self.space.tick(&self.store, leader, &members) {
            self.core.propose_host(entry);
        }
        if let Some(entry) = self.limits.tick(self.core.position()) {
            self.core.propose_host(entry);
        }
        self.core.persist_lazily();
    }

    fn handle(&mut self, request: NodeRequest) {
        match request {
            NodeRequest::Propose { data, reply } => self.core.propose(data, reply),
            NodeRequest::Join {
                addr,
                requested_id,
                reply,
            } => self.core.join(addr, requested_id, reply),
            NodeRequest::RemoveMember { id, reply } => self.core.remove_member(id, reply),
            NodeRequest::TransferLeader { id, reply } => {
                let _ = reply.send(self.core.transfer_leader(id));
            }
            NodeRequest::ReadIndex { reply } => self.core.read_index(reply, Instant::now()),
            NodeRequest::Raft(message) => self.step(*message, Channel::Stream),
            NodeRequest::Snapshot(message) => self.step(*message, Channel::InstallSnapshot),
            NodeRequest::CheckSnapshot { message, reply } => {
                let _ = reply.send(self.core.check_snapshot(&message));
            }
            // `run` stops before handing this over.
            NodeRequest::Shutdown => {}
            NodeRequest::StepDown { reply } => {
                let _ = reply.send(self.core.step_down());
            }
            NodeRequest::DisarmAlarms { reply } => {
                if !self.core.is_leader() {
                    let _ = reply.send(Err(self.core.not_leader()));
                    return;
                }
                let entries = self.space.disarm();
                let count = entries.len();
                entries.into_iter().for_each(|entry| self.core.propose_host(entry));
                let _ = reply.send(Ok(count));
            }
            NodeRequest::Status { reply } => {
                let _ = reply.send(self.core.status());
            }
        }
    }

    /// Step a peer's message; time a heartbeat's round trip.
    fn step(&mut self, message: raft::prelude::Message, channel: Channel) {
        let (kind, from) = (message.get_msg_type(), message.from);
        if self.core.step(message, channel)
            && kind == MessageType::MsgHeartbeatResponse
            && let Some(sent) = self.heartbeats_out.remove(&from)
        {
            self.metrics
                .peer_round_trip
                .with_label_values(&[from.to_string().as_str()])
                .observe(sent.elapsed().as_secs_f64());
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if self.core.snapshot_pending() {
            self.flush()?;
        }
        let installing = self.core.ready()?;
        self.execute()?;
        if let Some(installing) = installing {
            let members = self.install(installing)?;
            self.core.installed(members)?;
            self.execute()?;
            self.flush()?;
            self.core.finish_install()?;
            self.execute()?;
        }
        Ok(())
    }

    /// Carry out the core's actions, in order.
    fn execute(&mut self) -> Result<(), NodeError> {
        for action in self.core.take_actions() {
            match action {
                Action::Send(messages) => self.send(messages),
                Action::Persist { seq, batch } => self.persister.submit(seq, batch),
                Action::Apply { entries, waiters } => self
                    .fsm
                    .send(FsmRequest::Apply { entries, waiters })
                    .map_err(|_| NodeError::FsmGone)?,
                Action::Restore(metadata) => self
                    .fsm
                    .send(FsmRequest::Restore { metadata })
                    .map_err(|_| NodeError::FsmGone)?,
                Action::WantSnapshot => {
                    let (reply, _) = oneshot::channel();
                    self.fsm
                        .send(FsmRequest::Snapshot { reply })
                        .map_err(|_| NodeError::FsmGone)?;
                }
                Action::SetPeer { id, addr } => self.transport.set_peer(id, addr),
                Action::RemovePeer(id) => self.transport.remove_peer(id),
            }
        }
        Ok(())
    }

    /// Wait until every submitted write is durable.
    fn flush(&mut self) -> Result<(), NodeError> {
        while self.core.has_in_flight() {
            let persisted = &self.persisted;
            let completion = tokio::task::block_in_place(|| persisted.recv())
                .unwrap_or_else(|_| Err(StoreError::Invalid("the persister thread stopped".into())));
            self.core.persisted(completion?);
            self.execute()?;
        }
        Ok(())
    }

    fn send(&mut self, messages: Vec<raft::prelude::Message>) {
        // A heartbeat's round trip, from the latest one sent (heartbeats
        // come a tick apart, far more than a round trip; after a partition
        // the wait is not counted as one).
        for message in &messages {
            if message.get_msg_type() == MessageType::MsgHeartbeat {
                self.heartbeats_out.insert(message.to, Instant::now());
            }
        }
        for peer in self.transport.send(messages) {
            self.core.report_unreachable(peer);
        }
    }

    /// Write a leader's snapshot to the store, replacing the log. Answers
    /// the members its header names.
    fn install(&mut self, installing: Installing) -> Result<Vec<(u64, String)>, NodeError> {
        let Installing { snapshot, hard_state } = installing;
        let index = snapshot.get_metadata().index;
        let corrupt = |e: crate::snapshot::SnapshotError| {
            NodeError::Store(StoreError::Corrupt(format!("snapshot at {index}: {e}")))
        };
        // A received snapshot's data is the file the peer service wrote
        // (raft carried a reference to it); one made in process is inline.
        let file = match crate::snapshot::DataRef::parse(&snapshot.data) {
            Some(crate::snapshot::DataRef::File { path, .. }) => Some(path),
            Some(crate::snapshot::DataRef::Stored { .. }) => {
                return Err(NodeError::Store(StoreError::Corrupt(format!(
                    "snapshot at {index}: a reference to another node's store"
                ))));
            }
            None => None,
        };
        let header = match &file {
            Some(path) => tokio::task::block_in_place(|| crate::snapshot::read_file_header(path)).map_err(corrupt)?,
            None => crate::snapshot::decode(&snapshot.data).map_err(corrupt)?.0,
        };
        let store = &self.store;
        let bytes = tokio::task::block_in_place(|| install_into(store, &snapshot, file.as_deref(), &hard_state))?;
        tracing::info!(index, bytes, "installed a snapshot from the leader");
        Ok(header.members)
    }
}

/// Replace `store`'s log with `snapshot` (its data in `file`, if it came
/// over the network). Answers the snapshot's size.
fn install_into<S: LogStore>(
    store: &S,
    snapshot: &Snapshot,
    file: Option<&std::path::Path>,
    hard_state: &raft::prelude::HardState,
) -> Result<u64, StoreError> {
    match file {
        Some(path) => {
            store.install_snapshot_file(path, snapshot.get_metadata(), hard_state)?;
            let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
            if let Some(dir) = path.parent() {
                crate::snapshot::remove_ready_files(dir, snapshot.get_metadata().index);
            }
            Ok(bytes)
        }
        None => {
            store.install_snapshot(snapshot, hard_state)?;
            Ok(snapshot.data.len() as u64)
        }
    }
}
