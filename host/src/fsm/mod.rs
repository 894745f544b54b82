//! The apply worker: owns the live plugin instance on a thread of its own, so
//! a slow or runaway `apply` never stalls the raft loop (heartbeats, votes,
//! replication go on while the plugin burns its fuel).
//!
//! It receives committed entries in log order, applies the plugin commands
//! among them, answers the proposers waiting on this node, serves queries
//! once the applied index reaches their read index, and reports the applied
//! index back to the raft loop.
//!
//! Snapshots: every `snapshot.every_entries` applied entries (or on demand)
//! the worker takes the plugin's `snapshot()`; storing it with its raft
//! metadata and compacting the log behind it happen on a thread of their
//! own for the periodic ones (a large state takes a while to write), so
//! applying goes on meanwhile. One save at a time; anything that reads the
//! stored snapshot (a rebuild, a restore, the next snapshot) waits for it.
//! A snapshot received from the leader is restored into a fresh instance.
//!
//! Trap recovery: a trap poisons the instance. The worker records the trap
//! durably (so replay skips that entry instead of trapping again), then
//! builds a fresh instance from the latest snapshot and replays the log up
//! to the entry before the trap, skipping every recorded trap. Every replica traps on the same entry
//! (execution is deterministic), so every replica ends in the same state.

mod apply;
mod epoch;
mod recovery;
mod restore;
mod snapshots;
mod stall;
mod swap;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use raft::prelude::{ConfState, Entry};
use tokio::sync::{oneshot, watch};

use crate::epochs::Epochs;
use crate::health::ApplyHealth;
use crate::metrics::Metrics;
use crate::plugin_id::PluginId;
use crate::readiness::{PluginReadiness, Preparer};
use crate::sandbox::{Instance, Limits, LoadError, Plugin, Sandbox};
use crate::sessions::Sessions;
use crate::snapshot::SnapshotConfig;
use crate::space::SpaceState;
use crate::storage::LogStore;

pub use crate::outcome::{Answered, Applied, ApplyWaiter};

pub enum FsmRequest {
    /// Committed entries in log order, and the waiters for those this node
    /// proposed (by index).
    Apply {
        entries: Vec<Entry>,
        waiters: HashMap<u64, ApplyWaiter>,
    },
    /// Run a query once the applied index is at least `read_index`.
    Query {
        request: Vec<u8>,
        read_index: u64,
        reply: oneshot::Sender<Answered>,
    },
    /// Take a snapshot now; the reply gets its index.
    Snapshot {
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Replace the state with the snapshot the raft loop installed (the
    /// store holds it, or a newer one installed since).
    Restore { metadata: raft::prelude::SnapshotMetadata },
    /// Stop after everything queued before this request.
    Shutdown,
}

/// Where the worker fetches a component this node lacks (see
/// `Fsm::fetch_plugin`).
pub(crate) type Plugins = Box<dyn crate::plugin_id::PluginSource>;

/// How far a batch of replay reads from the store at once.
const REPLAY_BATCH_BYTES: u64 = 4 << 20;

pub struct Fsm<S: LogStore> {
    store: S,
    sandbox: Sandbox,
    /// The plugin the log starts with (index 0 of the plugin history).
    first_plugin: Plugin,
    /// The plugin `instance` runs: the one active at `applied`.
    plugin: Plugin,
    /// Tells the codec and status which plugin is active.
    active_tx: watch::Sender<Plugin>,
    /// Components this node lacks, from the members.
    plugins: Plugins,
    instance: Instance,
    applied: u64,
    /// Entries whose apply trapped, with the message the proposer got.
    traps: BTreeMap<u64, String>,
    /// Queries waiting for the applied index to reach their read index.
    pending_queries: Vec<(u64, Vec<u8>, oneshot::Sender<Answered>)>,
    applied_tx: watch::Sender<u64>,
    trap_count: Arc<AtomicU64>,
    config: SnapshotConfig,
    /// The index of the latest stored snapshot (0: none), and the size of
    /// the plugin state in it.
    snapshot_index: u64,
    snapshot_bytes: u64,
    /// Bytes of entries applied since the latest snapshot began.
    log_bytes_since_snapshot: u64,
    /// Periodic snapshots that failed in a row, and the applied index
    /// before which the next is not tried: a plugin whose snapshot() always
    /// fails is retried after 64, 128, 256... entries (up to
    /// `every_entries`), not after every batch, each failure costing a
    /// rebuild when it trapped.
    snapshot_failures: u32,
    snapshot_retry_at: u64,
    snapshot_attempts: u64,
    /// Why the last snapshot failed, while it keeps failing (for `status`).
    snapshot_error: Arc<std::sync::Mutex<String>>,
    /// The last snapshot ran out of memory (a plugin whose SDK copies its
    /// whole state to snapshot it cannot at half its cap): the space alarm
    /// stays on until one succeeds.
    snapshot_short_of_memory: bool,
    /// The configuration and addresses as of `applied`, for snapshots.
    conf_state: ConfState,
    members: BTreeMap<u64, String>,
    /// Chunks of components whose swap entry has not been applied yet.
    staged: HashMap<[u8; 32], BTreeMap<u64, Vec<u8>>>,
    /// The snapshot being taken, if any (see `snapshots`).
    taking: Option<snapshots::Taking>,
    /// Who waits for a snapshot, and from which index on.
    snapshot_waiters: Vec<snapshots::SnapshotWaiter>,
    /// Members whose space alarm is on as of `applied`, and where the rest
    /// of the node reads it.
    alarms: BTreeSet<u64>,
    alarms_tx: watch::Sender<BTreeSet<u64>>,
    /// The sandbox limits the cluster recorded as of `applied` (`None`
    /// before its first `HostEntry::Limits`: this node's flags then), and
    /// where the rest of the node reads them.
    cluster_limits: Option<Limits>,
    limits_tx: watch::Sender<Option<Limits>>,
    /// Components being compiled off this thread for their swap, and their
    /// bytes, assembled when their `PreparePlugin` entry applied.
    preparer: Preparer,
    readiness: Arc<PluginReadiness>,
    prepared_wasm: HashMap<[u8; 32], Arc<Vec<u8>>>,
    /// The longest one batch of committed entries took to apply, in ms.
    longest_apply_ms: Arc<AtomicU64>,
    /// Set while a restore failed and is retried (see `stall`), and where
    /// the node reads it.
    stalled: Option<stall::Stall>,
    health: Arc<ApplyHealth>,
    /// The epoch in progress: the instance that takes over once restored
    /// from its snapshot and caught up (see `epoch`).
    successor: Option<epoch::Successor>,
    /// Wants, the latest epoch and digests, shared with the node.
    epochs: Arc<Epochs>,
    /// Epochs begin at `HostEntry::Epoch` entries (unit tests may have
    /// them begin wherever a snapshot is wanted).
    epochs_from_log: bool,
    /// Set while the stored log is applied again (a rebuild, a stall's
    /// recovery): an epoch crossed then hands over at once.
    replaying: bool,
    /// What `/metrics` shows of applying, traps, swaps and snapshots.
    metrics: Arc<Metrics>,
    /// Where the instance's memory is published after every request: the
    /// space alarm goes on near the memory cap (see `crate::space`).
    space: Arc<SpaceState>,
    /// Client sessions as of `applied` (see `sessions`), and their count
    /// and kept bytes for `status`.
    sessions: Sessions,
    session_usage: Arc<SessionUsage>,
    /// Session commands answered without the plugin while an epoch is in
    /// progress: its catch-up skips them (see `epoch`).
    answered: Arc<std::sync::Mutex<BTreeSet<u64>>>,
}

/// How many sessions are open and the bytes of results they keep.
#[derive(Debug, Default)]
pub struct SessionUsage {
    pub sessions: AtomicU64,
    pub kept_bytes: AtomicU64,
}

/// What the rest of the node reads of the apply worker.
pub struct FsmWatches {
    /// Entries whose apply trapped.
    pub trapped_entries: Arc<AtomicU64>,
    /// Why snapshots keep failing (empty while they succeed).
    pub snapshot_error: Arc<std::sync::Mutex<String>>,
    pub space_alarms: watch::Receiver<BTreeSet<u64>>,
    pub cluster_limits: watch::Receiver<Option<Limits>>,
    /// The longest one batch of committed entries took to apply, in ms
    /// (a swap's handover counts; a preparer's compile does not).
    pub longest_apply_ms: Arc<AtomicU64>,
    pub sessions: Arc<SessionUsage>,
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum FsmError {
    #[error("storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("raft storage: {0}")]
    Raft(#[from] raft::Error),
    #[error("plugin: {0}")]
    Load(#[from] crate::sandbox::LoadError),
    #[error("a committed entry is malformed at index {index}: {reason}")]
    Malformed { index: u64, reason: String },
    #[error("cannot restore the snapshot at index {index}: {reason}")]
    Restore { index: u64, reason: String },
    #[error("plugin {0} is needed but neither stored here nor available from any member")]
    MissingPlugin(String),
}

impl<S: LogStore> Fsm<S> {
    /// A worker holding the state of the latest stored snapshot (or the
    /// initial state); raft then re-delivers the committed log after it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: S,
        sandbox: Sandbox,
        first_plugin: Plugin,
        config: SnapshotConfig,
        applied_tx: watch::Sender<u64>,
        active_tx: watch::Sender<Plugin>,
        plugins: Plugins,
    ) -> Result<Fsm<S>, FsmError> {
        let instance = first_plugin.instantiate()?;
        let traps: BTreeMap<u64, String> = store.traps(0, u64::MAX)?.into_iter().collect();
        let trap_count = Arc::new(AtomicU64::new(traps.len() as u64));
        let mut fsm = Fsm {
            trap_count,
            store,
            sandbox: sandbox.clone(),
            plugin: first_plugin.clone(),
            first_plugin,
            active_tx,
            plugins,
            instance,
            applied: 0,
            traps,
            pending_queries: Vec::new(),
            applied_tx,
            config,
            snapshot_index: 0,
            snapshot_bytes: 0,
            log_bytes_since_snapshot: 0,
            snapshot_failures: 0,
            snapshot_retry_at: 0,
            snapshot_attempts: 0,
            snapshot_error: Arc::default(),
            snapshot_short_of_memory: false,
            conf_state: ConfState::default(),
            members: BTreeMap::new(),
            staged: HashMap::new(),
            taking: None,
            snapshot_waiters: Vec::new(),
            alarms: BTreeSet::new(),
            alarms_tx: watch::channel(BTreeSet::new()).0,
            cluster_limits: None,
            limits_tx: watch::channel(None).0,
            preparer: Preparer::new(sandbox.clone(), Arc::default()),
            readiness: Arc::default(),
            prepared_wasm: HashMap::new(),
            longest_apply_ms: Arc::default(),
            stalled: None,
            health: Arc::default(),
            successor: None,
            epochs: Arc::default(),
            epochs_from_log: true,
            replaying: false,
            metrics: Arc::default(),
            space: Arc::default(),
            sessions: Sessions::default(),
            session_usage: Arc::default(),
            answered: Arc::default(),
        };
        match fsm.restore_stored() {
            // Status and the raft loop read the applied index from here; raft
            // resumes after the snapshot, so nothing else would report it.
            Ok(true) => {
                fsm.applied_tx.send_replace(fsm.applied);
            }
            Ok(false) => {}
            // Up, and saying why it cannot apply, rather than down.
            Err(error) if stall::survivable(&error) => {
                let upto = fsm.store.snapshot_metadata()?.index;
                fsm.stall(error, upto);
            }
            Err(error) => return Err(error),
        }
        fsm.publish_active_plugin();
        Ok(fsm)
    }

    /// Members whose space alarm is on, as of what this worker applied.
    pub fn space_alarms(&self) -> watch::Receiver<BTreeSet<u64>> {
        self.alarms_tx.subscribe()
    }

    fn publish_session_usage(&self) {
        let (sessions, bytes) = self.sessions.usage();
        self.session_usage.sessions.store(sessions, Ordering::Relaxed);
        self.session_usage.kept_bytes.store(bytes, Ordering::Relaxed);
    }

    fn publish_alarms(&self) {
        self.alarms_tx.send_replace(self.alarms.clone());
    }

    pub fn watches(&self) -> FsmWatches {
        FsmWatches {
            trapped_entries: self.trap_counter(),
            snapshot_error: self.snapshot_error(),
            space_alarms: self.space_alarms(),
            cluster_limits: self.cluster_limits(),
            longest_apply_ms: self.longest_apply_ms.clone(),
            sessions: self.session_usage.clone(),
        }
    }

    /// Report whether this worker can apply through `health`.
    pub fn report_health_to(&mut self, health: Arc<ApplyHealth>) {
        health.set(self.health.stalled().then(|| self.health.reason()));
        self.health = health;
    }

    /// Report wants and epoch digests through `epochs` (the node's batches
    /// carry them; the leader proposes epochs).
    pub fn report_epochs_to(&mut self, epochs: Arc<Epochs>) {
        // What the start-up restore recorded.
        epochs.applied_epoch(self.epochs.latest());
        if let Some(digest) = self.epochs.latest_digest() {
            epochs.record(digest);
        }
        self.epochs = epochs;
    }

    /// Record applies, traps, swaps and snapshots in `metrics`.
    pub fn report_metrics_to(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }

    /// Publish the instance's memory through `space` (the node's batches
    /// tell the leader when it nears the cap).
    pub fn report_memory_to(&mut self, space: Arc<SpaceState>) {
        self.space = space;
        self.publish_memory();
    }

    fn publish_memory(&self) {
        let cap = self.limits().max_memory_bytes;
        self.space
            .set_memory(self.instance.memory_bytes(), cap, self.snapshot_short_of_memory);
    }

    /// Begin epochs wherever a snapshot is wanted, without the log's
    /// `Epoch` entries (unit tests of the snapshot machinery).
    #[cfg(test)]
    pub(crate) fn with_local_epochs(mut self) -> Self {
        self.epochs_from_log = false;
        self
    }

    /// Report swap preparation through `readiness` (the node's batches
    /// carry it to the leader).
    pub fn report_readiness_to(&mut self, readiness: Arc<PluginReadiness>) {
        self.preparer = Preparer::new(self.sandbox.clone(), readiness.clone());
        self.readiness = readiness;
    }

    /// The sandbox limits the cluster recorded, as of what this worker
    /// applied (`None`: none yet).
    pub fn cluster_limits(&self) -> watch::Receiver<Option<Limits>> {
        self.limits_tx.subscribe()
    }

    /// The limits plugin calls run under: the cluster's once recorded.
    fn limits(&self) -> Limits {
        self.cluster_limits.unwrap_or_else(|| Limits::of(self.sandbox.config()))
    }

    /// A fresh instance of `plugin` under the cluster's limits.
    fn instantiate(&self, plugin: &Plugin) -> Result<Instance, LoadError> {
        let mut instance = plugin.instantiate()?;
        instance.set_limits(self.limits());
        Ok(instance)
    }

    /// Adopt the limits the log or a snapshot recorded (`at`: where).
    fn set_cluster_limits(&mut self, limits: Option<Limits>, at: u64) {
        if self.cluster_limits == limits {
            return;
        }
        self.cluster_limits = limits;
        let effective = self.limits();
        self.instance.set_limits(effective);
        self.limits_tx.send_replace(limits);
        let local = Limits::of(self.sandbox.config());
        if let Some(limits) = limits {
            if limits != local {
                tracing::warn!(
                    index = at,
                    cluster = ?limits,
                    flags = ?local,
                    "the cluster's sandbox limits differ from this node's flags; using the cluster's"
                );
            } else {
                tracing::info!(index = at, ?limits, "sandbox limits recorded by the cluster");
            }
        }
    }

    fn publish_active_plugin(&self) {
        if self.active_tx.borrow().sha256() != self.plugin.sha256() {
            self.active_tx.send_replace(self.plugin.clone());
        }
    }

    /// The plugin with this hash: from the store, or fetched from a member.
    fn plugin_by_sha(&mut self, sha256: &[u8; 32]) -> Result<Plugin, FsmError> {
        if self.plugin.sha256() == *sha256 {
            return Ok(self.plugin.clone());
        }
        let wasm = match self.store.plugin_blob(sha256)? {
            Some(wasm) => wasm,
            None => {
                tracing::info!(plugin = %hex::encode(sha256), "fetching a plugin this node lacks from the members");
                let wasm = self
                    .fetch_plugin(PluginId(*sha256))
                    .ok_or_else(|| FsmError::MissingPlugin(hex::encode(sha256)))?;
                self.store.put_plugin_blob(sha256, &wasm)?;
                wasm
            }
        };
        Ok(self.sandbox.load(&wasm)?)
    }

    /// Component `id` from one of the members, checked against the id;
    /// `None` (and why, logged) if none sent it.
    fn fetch_plugin(&self, id: PluginId) -> Option<Vec<u8>> {
        let addrs: Vec<String> = self.members.values().cloned().collect();
        match self.plugins.fetch(id, &addrs) {
            Ok(wasm) if id.matches(&wasm) => Some(wasm),
            Ok(_) => {
                tracing::warn!(plugin = %id, "a member sent bytes that are not this plugin");
                None
            }
            Err(error) => {
                tracing::warn!(plugin = %id, error = format!("{error:#}"), "cannot fetch plugin");
                None
            }
        }
    }

    /// Serve requests until the channel closes or a fatal error. While a
    /// snapshot is being taken, idle moments move it along.
    pub fn run(mut self, requests: mpsc::Receiver<FsmRequest>) -> Result<(), FsmError> {
        loop {
            if let Some(wait) = self.stall_wait() {
                match requests.recv_timeout(wait) {
                    Ok(FsmRequest::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Ok(request) => self.handle(request)?,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
                self.retry_stalled()?;
                continue;
            }
            let request = match requests.try_recv() {
                Ok(request) => request,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) if self.taking.is_some() || self.successor.is_some() => {
                    let moved = self.pump_snapshot(snapshots::PUMP_BUDGET, false)?;
                    let moved = self.pump_successor(false)? || moved;
                    self.want_epoch()?;
                    if !moved {
                        // Waiting on the writer: look again shortly.
                        match requests.recv_timeout(std::time::Duration::from_millis(2)) {
                            Ok(request) => request,
                            Err(mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        continue;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => match requests.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            if matches!(request, FsmRequest::Shutdown) {
                break;
            }
            self.handle(request)?;
        }
        // A snapshot half read is dropped (the next start takes another);
        // one being stored is waited for.
        self.abandon_snapshot()
    }

    pub fn handle(&mut self, request: FsmRequest) -> Result<(), FsmError> {
        self.handle_request(request)?;
        self.publish_active_plugin();
        self.publish_memory();
        Ok(())
    }

    fn handle_request(&mut self, request: FsmRequest) -> Result<(), FsmError> {
        if self.stalled.is_some() {
            self.handle_stalled(request);
            return Ok(());
        }
        match request {
            FsmRequest::Apply { entries, mut waiters } => {
                let started = std::time::Instant::now();
                let last = entries.last().map_or(0, |e| e.index);
                for entry in entries {
                    let index = entry.index;
                    if index <= self.applied {
                        // Covered by a snapshot restored since raft sent it.
                        continue;
                    }
                    if index != self.applied + 1 {
                        return Err(FsmError::Malformed {
                            index,
                            reason: format!("committed entries skip from {} to {index}", self.applied),
                        });
                    }
                    let result = match self.apply_entry(&entry) {
                        Ok(result) => result,
                        // A rebuild whose restore failed: stall, and tell
                        // whoever waits on the rest.
                        Err(error) if stall::survivable(&error) => {
                            self.stall(error, last);
                            self.handle_stalled(FsmRequest::Apply {
                                entries: Vec::new(),
                                waiters,
                            });
                            return Ok(());
                        }
                        Err(error) => return Err(error),
                    };
                    if let Some(waiter) = waiters.remove(&index) {
                        let result = result.unwrap_or(Ok(Vec::new()));
                        // The proposer may have given up (timeout); that is fine.
                        let _ = waiter.send(Ok(Applied { index, result }));
                    }
                }
                self.applied_tx.send_replace(self.applied);
                let took = started.elapsed();
                self.longest_apply_ms
                    .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
                self.serve_pending_queries()?;
                self.pump_snapshot(snapshots::PUMP_BUDGET, false)?;
                self.pump_successor(false)?;
                self.want_epoch()?;
            }
            FsmRequest::Snapshot { reply } => self.want_snapshot(reply)?,
            // `run` stops before handing this over.
            FsmRequest::Shutdown => {}
            FsmRequest::Restore { metadata } => {
                match self.restore_installed(&metadata) {
                    // The raft loop said "restoring" when it installed it.
                    Ok(()) => self.health.set(None),
                    Err(error) if stall::survivable(&error) => {
                        self.stall(error, metadata.index);
                        return Ok(());
                    }
                    Err(error) => return Err(error),
                }
                self.applied_tx.send_replace(self.applied);
                self.serve_pending_queries()?;
            }
            FsmRequest::Query {
                request,
                read_index,
                reply,
            } => {
                if read_index <= self.applied {
                    let answer = self.query(&request)?;
                    let _ = reply.send(answer);
                } else {
                    self.pending_queries.push((read_index, request, reply));
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Why snapshots are failing ("" while they succeed), shared with
    /// `status`.
    pub fn snapshot_error(&self) -> Arc<std::sync::Mutex<String>> {
        self.snapshot_error.clone()
    }

    /// The number of entries whose apply trapped, kept current.
    pub fn trap_counter(&self) -> Arc<AtomicU64> {
        self.trap_count.clone()
    }
}

#[cfg(test)]
mod tests;
