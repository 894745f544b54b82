//! What the node measures as it happens, for `/metrics` (`server/http.rs`):
//! histograms and counters a scrape could not read from the node's state.
//! One `Metrics` per node, shared through the transport's `Link`; each
//! scrape registers these (they are handles onto the same values) next to
//! the readings it takes.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Peers a node labels its received bytes with, at most (others: `other`):
/// a batch names its sender, and a stranger may name any.
const MAX_PEER_LABELS: usize = 64;

/// Seconds, from half a millisecond to about 8 s (etcd's disk buckets).
fn disk_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 15).expect("valid buckets")
}

/// Seconds, from 10 µs to about 20 s: a plugin call, or a snapshot.
fn call_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.00001, 4.0, 12).expect("valid buckets")
}

#[derive(Debug)]
pub struct Metrics {
    /// One persister write: the log entries and hard state of the Readies
    /// it merged, in one LMDB transaction with its fsync.
    pub wal_fsync: Histogram,
    /// One snapshot chunk (or the switch to a snapshot) written to LMDB.
    pub backend_commit: Histogram,
    /// One plugin `apply`, and the fuel it used.
    pub apply_duration: Histogram,
    pub apply_fuel: Histogram,
    /// Entries whose apply trapped, by kind (fuel, memory, stack, panic,
    /// result, other).
    pub traps: IntCounterVec,
    pub swaps: IntCounter,
    /// Snapshots stored, how long each took (from its begin), and the size
    /// of the latest one's plugin state.
    pub snapshots: IntCounter,
    pub snapshot_duration: Histogram,
    pub snapshot_bytes: IntGauge,
    /// Proposals this node accepted into its raft loop and could not get
    /// committed (dropped by raft, a lost leadership, a timeout).
    pub proposals_failed: IntCounter,
    /// Raft message bytes sent to and received from each peer, and the
    /// round trip of a heartbeat to each (the leader's).
    pub peer_sent_bytes: IntCounterVec,
    pub peer_received_bytes: IntCounterVec,
    pub peer_round_trip: HistogramVec,
    received_labels: Mutex<HashSet<u64>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("a valid histogram")
        };
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("a valid counter");
        Metrics {
            wal_fsync: histogram(
                "disk_wal_fsync_duration_seconds",
                "One write of log entries and hard state to LMDB, with its fsync.",
                disk_buckets(),
            ),
            backend_commit: histogram(
                "disk_backend_commit_duration_seconds",
                "One snapshot chunk (or the switch to a snapshot) committed to LMDB.",
                disk_buckets(),
            ),
            apply_duration: histogram(
                "plugin_apply_duration_seconds",
                "One plugin apply call.",
                call_buckets(),
            ),
            apply_fuel: histogram(
                "plugin_apply_fuel",
                "Fuel one plugin apply call used.",
                prometheus::exponential_buckets(1_000.0, 10.0, 8).expect("valid buckets"),
            ),
            traps: IntCounterVec::new(
                Opts::new("plugin_traps_total", "Entries whose apply trapped, by kind."),
                &["kind"],
            )
            .expect("a valid counter"),
            swaps: counter("plugin_swaps_total", "Plugin hot swaps applied."),
            snapshots: counter("snapshot_saved_total", "Snapshots stored."),
            snapshot_duration: histogram(
                "snapshot_save_duration_seconds",
                "From a snapshot's begin until it was stored.",
                call_buckets(),
            ),
            snapshot_bytes: IntGauge::new(
                "snapshot_state_bytes",
                "The plugin state in the latest snapshot stored.",
            )
            .expect("a valid gauge"),
            proposals_failed: counter(
                "server_proposals_failed_total",
                "Proposals accepted by this node that could not be committed.",
            ),
            peer_sent_bytes: IntCounterVec::new(
                Opts::new("network_peer_sent_bytes_total", "Raft message bytes sent to a peer."),
                &["to"],
            )
            .expect("a valid counter"),
            peer_received_bytes: IntCounterVec::new(
                Opts::new(
                    "network_peer_received_bytes_total",
                    "Raft message bytes received from a peer.",
                ),
                &["from"],
            )
            .expect("a valid counter"),
            peer_round_trip: HistogramVec::new(
                HistogramOpts::new(
                    "network_peer_round_trip_time_seconds",
                    "From a heartbeat to a peer until its answer came back.",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
                &["to"],
            )
            .expect("a valid histogram"),
            received_labels: Mutex::default(),
        }
    }
}

impl Metrics {
    /// A trap's kind, from its message.
    pub fn trapped(&self, message: &str) {
        // The sandbox's own wording (`Instance::describe_trap`).
        let kind = if message.starts_with("out of fuel") {
            "fuel"
        } else if message.starts_with("out of memory") {
            "memory"
        } else if message.starts_with("stack overflow") || message.starts_with("out-of-bounds memory access") {
            "stack"
        } else if message.contains("panicked") {
            "panic"
        } else if message.starts_with("the result is too large") {
            "result"
        } else {
            "other"
        };
        self.traps.with_label_values(&[kind]).inc();
    }

    /// `bytes` of raft messages came from `from` (bounded labels).
    pub fn received(&self, from: u64, bytes: u64) {
        let mut labels = self.received_labels.lock().unwrap_or_else(|e| e.into_inner());
        let label = if labels.contains(&from) || labels.len() < MAX_PEER_LABELS {
            labels.insert(from);
            from.to_string()
        } else {
            "other".to_string()
        };
        drop(labels);
        self.peer_received_bytes
            .with_label_values(&[label.as_str()])
            .inc_by(bytes);
    }

    /// Add these to a scrape's registry.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.wal_fsync.clone()))?;
        registry.register(Box::new(self.backend_commit.clone()))?;
        registry.register(Box::new(self.apply_duration.clone()))?;
        registry.register(Box::new(self.apply_fuel.clone()))?;
        registry.register(Box::new(self.traps.clone()))?;
        registry.register(Box::new(self.swaps.clone()))?;
        registry.register(Box::new(self.snapshots.clone()))?;
        registry.register(Box::new(self.snapshot_duration.clone()))?;
        registry.register(Box::new(self.snapshot_bytes.clone()))?;
        registry.register(Box::new(self.proposals_failed.clone()))?;
        registry.register(Box::new(self.peer_sent_bytes.clone()))?;
        registry.register(Box::new(self.peer_received_bytes.clone()))?;
        registry.register(Box::new(self.peer_round_trip.clone()))
    }
}
