//! Starting a node: open the store, settle the node's identity and plugin,
//! start the apply worker, the raft loop and the gRPC server, and stop them
//! all on shutdown.

use std::future::Future;

use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::{AuthLayer, TokenTable};
use crate::codec::Codec;
use crate::config::NodeConfig;
use crate::dial::Dialer;
use crate::firewall::Refusals;
use crate::fsm::{Fsm, FsmRequest};
use crate::limits::LimitsWatch;
use crate::logging;
use crate::node::{Node, NodeError, NodeRequest};
use crate::plugin_id::PluginId;
use crate::proto::client_server::ClientServer;
use crate::proto::peer_server::PeerServer;
use crate::sandbox::{Limits, Sandbox};
use crate::server::Services;
use crate::space::{SpaceConfig, SpaceWatch};
use crate::storage::LogStore;
use crate::storage::lmdb::LmdbStore;
use crate::transport::grpc::GrpcTransport;
use crate::transport::{Link, Sending, Transport};

mod identity;
#[cfg(test)]
pub(crate) use identity::bootstrap_batch;
use identity::{choose_plugin, force_new_cluster, settle_identity};

/// The kv plugin, built from plugins/kv by build.rs and embedded in the binary.
pub const EMBEDDED_KV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv.wasm"));

/// Test plugins: kv-v1 (kv through the 0.1.0 ABI), kv-v2 (kv plus
/// `strlen`), chaos (hostile) and hello (a WASI command: a component of
/// another world).
#[doc(hidden)]
pub const EMBEDDED_KV_V1: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv_v1.wasm"));
#[doc(hidden)]
pub const EMBEDDED_KV_V2: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv_v2.wasm"));
#[doc(hidden)]
pub const EMBEDDED_CHAOS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chaos.wasm"));
#[doc(hidden)]
pub const EMBEDDED_HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.wasm"));

/// Bounds the raft loop's request queue (proposals, reads, peer messages).
const NODE_QUEUE: usize = 65_536;

/// Bounds the transport's reports of finished snapshot transfers (a few at
/// a time: one per peer in flight; a full queue makes the report wait).
const SNAPSHOT_REPORTS: usize = 64;

/// How long a shutting-down node waits for in-flight requests.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Run a node on an already-bound listener until `shutdown` resolves.
pub async fn run(config: NodeConfig, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    serve(config, listener, shutdown, None, PeerNetwork::Grpc).await
}

/// How a node reaches its peers.
#[derive(Clone)]
pub(crate) enum PeerNetwork {
    /// Over gRPC, to each peer's address: every node but a test's.
    Grpc,
    /// Through an in-process router, which may drop, delay and cut
    /// messages (the in-process test clusters).
    #[cfg(test)]
    Routed(Arc<crate::transport::router::Router>),
}

/// [`run`], handing the node's services to `started` once it serves (the
/// library API, [`crate::api::Node`], calls them in process).
pub(crate) async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    started: Option<tokio::sync::oneshot::Sender<Services>>,
    network: PeerNetwork,
) -> anyhow::Result<()> {
    // Credentials first: a bad certificate or auth file fails the start
    // before anything is written.
    let (dialer, server_tls) = match &config.tls {
        Some(files) => {
            let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
                bail!("TLS needs --tls-cert and --tls-key");
            };
            let server = crate::tls::server_config(&files.ca, cert, key)?;
            let client = crate::tls::client_config(files, None)?;
            (Dialer::default().with_tls(client), Some(server))
        }
        None => (Dialer::default(), None),
    };
    let tokens = match &config.auth_file {
        Some(path) => Some(Arc::new(TokenTable::load(path)?)),
        None => None,
    };
    if server_tls.is_none() && !is_loopback(&config.listen) {
        tracing::warn!(
            listen = %config.listen,
            "serving plaintext on a non-loopback address: anyone who can reach it can act as a peer or a client; \
             use --tls-ca/--tls-cert/--tls-key (and --auth-file)"
        );
    }
    let _one_process = crate::storage::data_dir::lock_data_dir(&config.data_dir)?;
    let store = LmdbStore::open(&config.data_dir.join("lmdb"), &config.lmdb)
        .with_context(|| format!("cannot open the data dir {}", config.data_dir.display()))?;
    // Validate the plugin before writing anything, so a bad plugin leaves a
    // new data dir untouched.
    let sandbox = Sandbox::new(config.sandbox.clone())?;
    let chosen = choose_plugin(&store, &config)?;
    let new_plugin = match &chosen {
        Some(wasm) => Some((sandbox.load(wasm).context("cannot load the plugin")?, wasm)),
        None => None,
    };
    let (mut identity, cluster_plugin) = settle_identity(&store, &config, &dialer).await?;
    if identity.cluster_id == 0 {
        tracing::warn!("this data dir predates cluster ids: peer requests are not checked for their cluster");
    }
    if config.force_new_cluster {
        identity = force_new_cluster(&store, identity)?;
    }
    if let Some(wasm) = cluster_plugin {
        // A joiner runs the plugin the cluster's log starts with.
        let sha = PluginId::of(&wasm).0;
        store.activate_plugin(0, &sha, &wasm)?;
    } else if let Some((plugin, wasm)) = &new_plugin {
        store.activate_plugin(0, &plugin.sha256(), wasm)?;
    }
    let (_, first_wasm) = store.first_plugin()?.context("the data dir records no plugin")?;
    let first_plugin = sandbox
        .load(&first_wasm)
        .context("cannot load the cluster's first plugin")?;
    let (_, active_wasm) = store.active_plugin()?.context("the data dir records no plugin")?;
    let active_plugin = sandbox.load(&active_wasm).context("cannot load the active plugin")?;
    let id = identity.id;
    let span = tracing::info_span!("node", node_id = id);
    let _enter = span.enter();
    tracing::info!(plugin = %active_plugin.sha256_hex(), size = active_plugin.size(), "plugin loaded");

    let link = Link {
        dialer,
        cluster_id: identity.cluster_id,
        self_id: id,
        space: Arc::default(),
        plugins: Arc::default(),
        health: Arc::default(),
        epochs: Arc::default(),
        metrics: Arc::default(),
    };
    let (applied_tx, applied_rx) = watch::channel(0u64);
    let (active_tx, active_rx) = watch::channel(active_plugin);
    let (fsm_tx, fsm_rx) = std::sync::mpsc::channel();
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let plugins = Box::new(crate::transport::grpc::PeerPlugins {
        runtime: tokio::runtime::Handle::current(),
        link: link.clone(),
        max_message_bytes: config.transport.max_message_bytes,
    });
    let (fsm_store, fsm_sandbox, mut snapshot_config) = (store.clone(), sandbox.clone(), config.snapshot.clone());
    snapshot_config.reserve_bytes = space_config(&config).min_free_bytes;
    let fsm_span = span.clone();
    let fsm_readiness = link.plugins.clone();
    let fsm_health = link.health.clone();
    let fsm_epochs = link.epochs.clone();
    let fsm_metrics = link.metrics.clone();
    let fsm_space = link.space.clone();
    // The worker is built on its own thread too, not here: building it
    // restores the stored snapshot through the plugin, and no plugin call
    // may run on an async runtime thread (wasmtime-wasi's synchronous WASI
    // calls, such as a guest printing a panic message, `block_on` the
    // runtime, which panics there).
    let fsm_thread = std::thread::Builder::new()
        .name(format!("apply-{id}"))
        .spawn(move || {
            fsm_span.in_scope(|| {
                let fsm = Fsm::new(
                    fsm_store,
                    fsm_sandbox,
                    first_plugin,
                    snapshot_config,
                    applied_tx,
                    active_tx,
                    plugins,
                );
                match fsm {
                    Ok(mut fsm) => {
                        fsm.report_readiness_to(fsm_readiness);
                        fsm.report_health_to(fsm_health);
                        fsm.report_epochs_to(fsm_epochs);
                        fsm.report_metrics_to(fsm_metrics);
                        fsm.report_memory_to(fsm_space);
                        let _ = started_tx.send(Ok(fsm.watches()));
                        fsm.run(fsm_rx)
                    }
                    Err(error) => {
                        let _ = started_tx.send(Err(error));
                        Ok(())
                    }
                }
            })
        })
        .context("cannot start the apply worker thread")?;
    let watches = tokio::task::spawn_blocking(move || started_rx.recv())
        .await
        .context("waiting for the apply worker")?
        .context("the apply worker thread stopped while starting")??;

    let space_config = space_config(&config);
    tracing::info!(
        quota_bytes = space_config.quota_bytes,
        min_free_bytes = space_config.min_free_bytes,
        "space limits"
    );
    let (node_tx, node_rx) = mpsc::channel(NODE_QUEUE);
    let refusals = Arc::new(Refusals::default());
    let (snapshots_sent, snapshots_sent_rx) = mpsc::channel(SNAPSHOT_REPORTS);
    let sending = Sending {
        link: link.clone(),
        config: config.transport.clone(),
        snapshot_chunk_bytes: config.snapshot.chunk_bytes,
        reports: snapshots_sent,
        snapshots: Arc::new(store.clone()),
    };
    let transport: Arc<dyn Transport> = match &network {
        PeerNetwork::Grpc => Arc::new(GrpcTransport::new(sending)),
        #[cfg(test)]
        PeerNetwork::Routed(router) => Arc::new(router.transport(sending)),
    };
    for (peer, addr) in &identity.members {
        transport.set_peer(*peer, addr.clone());
    }
    let node = Node::new(
        identity,
        store.clone(),
        config.raft.clone(),
        transport,
        &link,
        fsm_tx.clone(),
        applied_rx.clone(),
        refusals.clone(),
        link.health.clone(),
        SpaceWatch::new(space_config, id, link.space.clone(), watches.space_alarms.clone()),
        LimitsWatch::new(Limits::of(sandbox.config()), watches.cluster_limits.clone()),
        logging::raft_logger(),
    )?;
    let leadership = node.leadership();
    let node_task = tokio::spawn(tracing::Instrument::instrument(
        node.run(node_rx, snapshots_sent_rx),
        span.clone(),
    ));

    let stop_node = node_tx.clone();
    let stop_fsm = fsm_tx.clone();
    let (stopping_tx, mut stopping_rx) = watch::channel(false);
    let services = Services {
        node: node_tx,
        fsm: fsm_tx,
        codec: Arc::new(Codec::new(active_rx)),
        config: config.client.clone(),
        listen: config.listen.clone(),
        trapped_entries: watches.trapped_entries,
        snapshot_error: watches.snapshot_error,
        longest_apply_ms: watches.longest_apply_ms,
        space_config,
        space_alarms: watches.space_alarms,
        cluster_limits: watches.cluster_limits,
        max_snapshot_bytes: config.snapshot.max_bytes,
        max_message_bytes: config.transport.max_message_bytes,
        sandbox,
        plugins: Arc::new(store.clone()),
        snapshots: Arc::new(store.clone()),
        sessions: watches.sessions,
        stopping: stopping_tx.subscribe(),
        leadership,
        applied: applied_rx,
        peer: Arc::new(crate::server::PeerGuard {
            link,
            tls: server_tls.is_some(),
            require_client_cert: config.tls_require_client_cert,
            refusals,
            incoming_dir: config.data_dir.join("incoming"),
            snapshot_slot: Arc::new(tokio::sync::Semaphore::new(1)),
        }),
    };
    // A transfer cut by a crash left its partial file behind.
    let _ = std::fs::remove_file(config.data_dir.join("incoming").join("snapshot.partial"));
    // Received snapshots a previous run did not install: raft asks again.
    crate::snapshot::remove_ready_files(&config.data_dir.join("incoming"), u64::MAX);
    let services_for_api = services.clone();
    // What the router delivers goes to these services, as a peer's gRPC
    // calls would; from when the node stops serving, nothing does.
    #[cfg(test)]
    let routed = match &network {
        PeerNetwork::Routed(router) => Some(router.register(id, services.clone())),
        PeerNetwork::Grpc => None,
    };
    if let Some(addr) = &config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
        let started_commit = raft::Storage::initial_state(&store)?.hard_state.commit;
        tracing::info!(%addr, "serving /metrics, /livez and /readyz");
        tokio::spawn(crate::server::http::serve(listener, services.clone(), started_commit));
    }
    let max = config.transport.max_message_bytes;
    let connections = &config.connections;
    let keepalive = std::time::Duration::from_millis(connections.keepalive_interval_ms);
    let incoming = crate::listener::incoming(listener, connections.clone());
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive * 2))
        .max_concurrent_streams(Some(connections.max_streams_per_connection))
        .http2_max_header_list_size(Some(64 << 10));
    if let Some(tls) = server_tls {
        let handshake = std::time::Duration::from_millis(connections.handshake_timeout_ms);
        builder = builder
            .tls_config(tls.timeout(handshake))
            .context("cannot set up TLS")?;
    }
    let server = builder
        .layer(AuthLayer::new(tokens))
        .add_service(
            ClientServer::new(services.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            PeerServer::new(services)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        });

    // The node stops on the shutdown signal, or when the raft loop fails (a
    // storage error is fatal: better down than wrong). On shutdown the server
    // stops taking requests and lets those in flight finish, for a bounded
    // time: peers and streaming clients may hold connections open forever.
    if let Some(started) = started {
        let _ = started.send(services_for_api);
    }
    let mut node_task = node_task;
    let mut server = Box::pin(server);
    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        served = &mut server => served.context("the gRPC server failed").map(|_| None),
        finished = &mut node_task => Ok(Some(finished)),
        _ = &mut shutdown => {
            hand_over_leadership(&stop_node, id).await;
            let _ = stopping_tx.send(true);
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(served) => served.context("the gRPC server failed").map(|_| None),
                Err(_) => {
                    tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                    Ok(None)
                }
            }
        }
    };
    drop(server);
    #[cfg(test)]
    drop(routed);
    let node_result = match outcome? {
        Some(finished) => finished,
        None => {
            // The transport keeps a sender to the raft loop, so the queue
            // never closes by itself: ask the loop to stop.
            let _ = stop_node.send(NodeRequest::Shutdown).await;
            node_task.await
        }
    };
    // Connection tasks may still hold handles to the apply worker's queue:
    // stop it explicitly, after whatever it already has queued.
    let _ = stop_fsm.send(FsmRequest::Shutdown);
    let node_result = node_result.context("the raft loop panicked")?;
    let fsm_result = tokio::task::spawn_blocking(move || fsm_thread.join())
        .await
        .context("joining the apply worker")?;
    // When the apply worker failed, the raft loop stops only because it
    // went away: report the worker's own error, the cause.
    let fsm_result = match fsm_result {
        Ok(result) => result.context("the apply worker stopped"),
        Err(_) => Err(anyhow::anyhow!("the apply worker panicked")),
    };
    match (node_result, fsm_result) {
        (Err(NodeError::FsmGone), Err(cause)) => return Err(cause),
        (Err(error), _) => return Err(anyhow::Error::new(error).context("the raft loop stopped")),
        (Ok(()), fsm_result) => fsm_result?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long a stopping leader waits for its successor to take over.
const LEADER_HANDOFF: std::time::Duration = std::time::Duration::from_secs(2);

/// A leader that stops hands leadership to its most caught-up voter first
/// (bounded by `LEADER_HANDOFF`), so the cluster does not wait out an
/// election timeout; the transfer costs one round trip.
async fn hand_over_leadership(node: &mpsc::Sender<NodeRequest>, id: u64) {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if node.send(NodeRequest::StepDown { reply }).await.is_err() {
        return;
    }
    let Ok(Some(target)) = answer.await else { return };
    let deadline = tokio::time::Instant::now() + LEADER_HANDOFF;
    while tokio::time::Instant::now() < deadline {
        let (reply, status) = tokio::sync::oneshot::channel();
        if node.send(NodeRequest::Status { reply }).await.is_err() {
            return;
        }
        match status.await {
            Ok(status) if status.leader_id != id && status.leader_id != 0 => {
                tracing::info!(leader = status.leader_id, "leadership handed over");
                return;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
    tracing::warn!(
        to = target,
        "leadership did not move within {LEADER_HANDOFF:?}; stopping anyway"
    );
}

fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The space limits: as given, or the defaults for this map and filesystem.
fn space_config(config: &NodeConfig) -> SpaceConfig {
    config
        .space
        .resolve(config.lmdb.map_size_bytes as u64, &config.data_dir)
}
