//! `run --metrics-listen HOST:PORT`: plain HTTP/1.1 for machines that do
//! not speak gRPC: Prometheus metrics and health probes.
//!
//! - `/metrics`: the node's state in the Prometheus text format, read when
//!   scraped, and what it measured as it happened (`crate::metrics`:
//!   fsync, snapshot-write, apply, fuel and peer round-trip histograms,
//!   peer bytes, traps by kind, swaps, snapshots); `prometheus` crate, names
//!   as etcd's under `raftify_`;
//! - `/livez`: 200 while the node's raft loop answers;
//! - `/readyz`: 200 once the node knows a leader, has applied what was
//!   committed when it started, and can apply; 503 with the reasons in JSON
//!   otherwise (as etcd's `readyz` means).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use super::Services;
use crate::node::NodeStatus;

/// How long a probe waits for the raft loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The most one request's head may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve until `services.stopping` says so. `started_commit` is the commit
/// index the node knew when it started (ready means applied up to it).
pub async fn serve(listener: TcpListener, services: Services, started_commit: u64) {
    let mut stopping = services.stopping.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stopping| *stopping) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let services = services.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let services = services.clone();
                async move { Ok::<_, Infallible>(answer(&services, started_commit, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer<B>(services: &Services, started_commit: u64, request: Request<B>) -> Response<Full<Bytes>> {
    let status = tokio::time::timeout(PROBE_TIMEOUT, services.node_status())
        .await
        .ok()
        .and_then(Result::ok);
    match request.uri().path() {
        "/livez" => match status {
            Some(_) => reply(StatusCode::OK, "application/json", r#"{"live":true}"#.to_string()),
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({"live": false, "why": ["the raft loop does not answer"]}).to_string(),
            ),
        },
        "/readyz" => {
            let why = not_ready(services, started_commit, status.as_ref());
            let code = if why.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({"ready": why.is_empty(), "why": why});
            reply(code, "application/json", body.to_string())
        }
        "/metrics" => match metrics(services, status.as_ref()) {
            Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(error) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", error.to_string()),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /metrics, /livez and /readyz are served here\n".to_string(),
        ),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Why the node is not ready (empty: it is).
fn not_ready(services: &Services, started_commit: u64, status: Option<&NodeStatus>) -> Vec<String> {
    let Some(status) = status else {
        return vec!["the raft loop does not answer".to_string()];
    };
    let mut why = Vec::new();
    if status.leader_id == 0 {
        why.push("no leader is known (an election is on, or no quorum is reachable)".to_string());
    }
    if status.applied_index < started_commit {
        why.push(format!(
            "applied {} of the {} entries committed when it started",
            status.applied_index, started_commit
        ));
    }
    let stalled = services.peer.link.health.reason();
    if !stalled.is_empty() {
        why.push(stalled);
    }
    why
}

/// The metrics, read now. Each scrape builds its own registry: every value
/// is the node's current reading, so nothing is kept between scrapes.
fn metrics(services: &Services, status: Option<&NodeStatus>) -> Result<String, prometheus::Error> {
    let registry = Registry::new_custom(Some("raftify".to_string()), None)?;
    let gauge = |name: &str, help: &str, value: i64| -> Result<(), prometheus::Error> {
        let metric = prometheus::IntGauge::new(name, help)?;
        metric.set(value);
        registry.register(Box::new(metric))
    };
    let counter = |name: &str, help: &str, value: u64| -> Result<(), prometheus::Error> {
        let metric = prometheus::IntCounter::new(name, help)?;
        metric.inc_by(value);
        registry.register(Box::new(metric))
    };
    let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    if let Some(status) = status {
        gauge(
            "server_has_leader",
            "Whether the node knows a leader (1) or not (0).",
            i64::from(status.leader_id != 0),
        )?;
        gauge(
            "server_is_leader",
            "Whether the node is the leader.",
            i64::from(status.role == "leader"),
        )?;
        gauge("server_term", "The raft term.", as_i64(status.term))?;
        gauge(
            "server_commit_index",
            "The raft commit index.",
            as_i64(status.commit_index),
        )?;
        gauge(
            "server_applied_index",
            "The index applied to the plugin.",
            as_i64(status.applied_index),
        )?;
        // etcd's names for the same two readings: every entry committed or
        // applied was a proposal of some node.
        counter(
            "server_proposals_committed_total",
            "Entries committed (the raft commit index).",
            status.commit_index,
        )?;
        counter(
            "server_proposals_applied_total",
            "Entries applied (the applied index).",
            status.applied_index,
        )?;
        gauge(
            "server_proposals_pending",
            "Proposals this node waits to see committed.",
            as_i64(status.pending_proposals),
        )?;
        gauge(
            "server_snapshot_index",
            "The latest stored snapshot's index.",
            as_i64(status.snapshot_index),
        )?;
        gauge(
            "server_log_entries",
            "Entries in the log behind the snapshot.",
            as_i64(status.last_index.saturating_sub(status.first_index).saturating_add(1)),
        )?;
        let voters = status.members.iter().filter(|(_, _, voter)| *voter).count();
        gauge("server_voters", "Voting members.", as_i64(voters as u64))?;
        gauge(
            "server_learners",
            "Learners (not yet voting).",
            as_i64((status.members.len() - voters) as u64),
        )?;
        counter(
            "server_leader_changes_seen_total",
            "New leaders this node saw, the first one included.",
            status.leader_changes,
        )?;
        counter(
            "server_reads_served_total",
            "Linearizable reads answered.",
            status.reads.served,
        )?;
        counter(
            "server_reads_retried_total",
            "Linearizable reads whose ReadIndex was sent again.",
            status.reads.retried,
        )?;
    }
    counter(
        "plugin_trapped_entries_total",
        "Entries whose apply trapped (they had no effect).",
        services.trapped_entries.load(Ordering::Relaxed),
    )?;
    let longest = prometheus::Gauge::new(
        "apply_longest_batch_seconds",
        "The longest one batch of committed entries took to apply.",
    )?;
    longest.set(services.longest_apply_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    registry.register(Box::new(longest))?;
    counter(
        "epoch_divergences_total",
        "Replicas found with another plugin state than this node's at the same epoch.",
        services.peer.link.epochs.divergences_total(),
    )?;
    gauge(
        "epoch_latest_index",
        "The latest instance epoch this node applied.",
        as_i64(services.peer.link.epochs.latest()),
    )?;
    gauge(
        "apply_stalled",
        "Whether the node cannot apply (its restore failed; see status).",
        i64::from(services.peer.link.health.stalled()),
    )?;
    let space = services.peer.link.space.usage();
    gauge(
        "disk_store_file_bytes",
        "The store's file size.",
        as_i64(space.file_bytes),
    )?;
    gauge(
        "disk_store_live_bytes",
        "Bytes in use in the store (what the quota counts).",
        as_i64(space.live_bytes),
    )?;
    gauge(
        "disk_quota_bytes",
        "The store's quota.",
        as_i64(services.space_config.quota_bytes),
    )?;
    gauge(
        "disk_fs_free_bytes",
        "Free bytes on the data dir's filesystem.",
        as_i64(space.fs_free_bytes),
    )?;
    gauge(
        "server_space_alarms",
        "Members whose space alarm is on.",
        as_i64(services.space_alarms.borrow().len() as u64),
    )?;
    let (memory_bytes, memory_cap) = services.peer.link.space.memory();
    gauge(
        "plugin_memory_bytes",
        "The plugin instance's linear memory (past 90% of the cap, the space alarm goes on).",
        as_i64(memory_bytes),
    )?;
    gauge(
        "plugin_memory_cap_bytes",
        "The plugin's memory cap (max_memory_bytes, the cluster's).",
        as_i64(memory_cap),
    )?;
    let refused = prometheus::IntCounterVec::new(
        Opts::new("network_peer_messages_refused_total", "Peer input refused, by reason."),
        &["reason"],
    )?;
    for (reason, count) in services.peer.refusals.counts() {
        refused.with_label_values(&[reason]).inc_by(count);
    }
    registry.register(Box::new(refused))?;
    let plugin = IntGaugeVec::new(
        Opts::new("plugin_info", "The active plugin (its SHA-256 as a label)."),
        &["sha256"],
    )?;
    plugin
        .with_label_values(&[services.codec.plugin().sha256_hex().as_str()])
        .set(1);
    registry.register(Box::new(plugin))?;
    services.peer.link.metrics.register(&registry)?;
    let mut text = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}
