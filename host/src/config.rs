//! Node configuration: every limit is a named field with a default, set by a
//! flag, a `RAFTIFY_*` environment variable or a TOML file (`--config`), in
//! that order of precedence, and validated with a clear error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

pub use crate::dial::check_addr;
use crate::listener::ConnectionConfig;
use crate::node::RaftConfig;
use crate::sandbox::SandboxConfig;
use crate::server::ClientConfig;
use crate::snapshot::SnapshotConfig;
use crate::storage::lmdb::LmdbOptions;
use crate::tls::TlsFiles;
use crate::transport::TransportConfig;

/// The address `run` listens on, and clients call, by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";
pub const DEFAULT_DATA_DIR: &str = "raftify-data";

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `None`: take it from the data dir, or 1 for a new one-node cluster.
    pub id: Option<u64>,
    pub listen: String,
    /// Where to serve `/metrics`, `/livez` and `/readyz` over HTTP (none: off).
    pub metrics_listen: Option<String>,
    pub data_dir: PathBuf,
    /// `None`: the plugin stored in the data dir, or the embedded kv plugin.
    pub plugin: Option<PathBuf>,
    /// Initial members for a new cluster (`--peers`); must include this node.
    pub peers: BTreeMap<u64, String>,
    /// A member to ask to join an existing cluster through (`--join`).
    pub join: Option<String>,
    /// Restart as the only member of a new cluster, keeping this node's
    /// data (disaster recovery after losing a majority for good).
    pub force_new_cluster: bool,
    /// Serve TLS only, and dial peers over TLS with this certificate
    /// (`cert` and `key` are always set here).
    pub tls: Option<TlsFiles>,
    /// Client RPCs, too, need a client certificate signed by the CA.
    pub tls_require_client_cert: bool,
    /// Bearer tokens with roles; every Client RPC needs one.
    pub auth_file: Option<PathBuf>,
    /// The token a joining node presents (`--join ... --token T`).
    pub token: Option<String>,
    pub connections: ConnectionConfig,
    pub raft: RaftConfig,
    pub sandbox: SandboxConfig,
    pub client: ClientConfig,
    pub transport: TransportConfig,
    pub lmdb: LmdbOptions,
    pub snapshot: SnapshotConfig,
    /// `None`: the default, which depends on the map and the filesystem
    /// (see `space`), resolved when the node starts.
    pub quota_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
}

/// `raftify-host run` flags. Each may also be set by its `RAFTIFY_*`
/// environment variable or in the `--config` TOML file (same name, with
/// underscores).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// A TOML file with any of these settings (flags and env win over it).
    #[arg(long, env = "RAFTIFY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer). Taken from the data dir on restart.
    #[arg(long, env = "RAFTIFY_ID")]
    pub id: Option<u64>,
    /// Address to serve peers and clients on [default: 127.0.0.1:7070].
    #[arg(long, env = "RAFTIFY_LISTEN")]
    pub listen: Option<String>,
    /// Serve Prometheus `/metrics` and the `/livez` and `/readyz` probes
    /// over plain HTTP/1.1 on this address (off unless given).
    #[arg(long, env = "RAFTIFY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Where the node keeps its LMDB and caches [default: ./raftify-data].
    #[arg(long, env = "RAFTIFY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The state machine component (.wasm). Default: the plugin stored in the
    /// data dir, or the embedded kv plugin for a new node.
    #[arg(long, env = "RAFTIFY_PLUGIN")]
    pub plugin: Option<PathBuf>,
    /// Initial members of a new cluster: `1=HOST:PORT,2=HOST:PORT,...`, the
    /// same on every node.
    #[arg(long, env = "RAFTIFY_PEERS", conflicts_with = "join")]
    pub peers: Option<String>,
    /// Join an existing cluster through any member, HOST:PORT. The cluster
    /// assigns an id unless --id is given. Ignored once the node has joined.
    #[arg(long, env = "RAFTIFY_JOIN")]
    pub join: Option<String>,
    /// Disaster recovery: restart this node's data as a one-member cluster
    /// (every entry it holds is kept and committed); others then --join it.
    /// Only for when a majority is lost for good.
    #[arg(long, env = "RAFTIFY_FORCE_NEW_CLUSTER")]
    #[serde(default)]
    pub force_new_cluster: bool,
    /// The CA certificate (PEM) peers' and clients' certificates are signed
    /// by. With --tls-cert and --tls-key the node serves only TLS and dials
    /// peers over mutual TLS.
    #[arg(long, env = "RAFTIFY_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by --tls-ca; used to serve and
    /// to dial peers.
    #[arg(long, env = "RAFTIFY_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "RAFTIFY_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Clients, too, must present a certificate signed by --tls-ca (peers
    /// always must).
    #[arg(long, env = "RAFTIFY_TLS_REQUIRE_CLIENT_CERT")]
    #[serde(default)]
    pub tls_require_client_cert: bool,
    /// TOML of [[token]] tables (name, role = read|write|admin, sha256 of
    /// the token): every client call then needs `--token`. Needs TLS.
    #[arg(long, env = "RAFTIFY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// The admin token a node joining with --join presents.
    #[arg(long, env = "RAFTIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Connections served at once [default: 512].
    #[arg(long, env = "RAFTIFY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a connection may stay silent before it is closed (the
    /// server pings live ones every 10 s) [default: 60].
    #[arg(long, env = "RAFTIFY_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,

    /// Raft clock period in milliseconds [default: 100].
    #[arg(long, env = "RAFTIFY_TICK_INTERVAL_MS")]
    pub tick_interval_ms: Option<u64>,
    /// Ticks before a follower without a leader campaigns [default: 10].
    #[arg(long, env = "RAFTIFY_ELECTION_TICKS")]
    pub election_ticks: Option<usize>,
    /// Ticks between leader heartbeats [default: 2].
    #[arg(long, env = "RAFTIFY_HEARTBEAT_TICKS")]
    pub heartbeat_ticks: Option<usize>,
    /// Append messages in flight per follower [default: 256].
    #[arg(long, env = "RAFTIFY_MAX_INFLIGHT_MESSAGES")]
    pub max_inflight_messages: Option<usize>,
    /// Proposals waiting for commit before "busy" [default: 100000].
    #[arg(long, env = "RAFTIFY_MAX_PENDING_PROPOSALS")]
    pub max_pending_proposals: Option<usize>,
    /// Largest proposal in bytes [default: 1048576].
    #[arg(long, env = "RAFTIFY_MAX_PROPOSAL_BYTES")]
    pub max_proposal_bytes: Option<usize>,
    /// Largest gRPC message in bytes [default: 67108864].
    #[arg(long, env = "RAFTIFY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest plugin component `plugin swap` accepts [default: 50331648].
    #[arg(long, env = "RAFTIFY_MAX_PLUGIN_BYTES")]
    pub max_plugin_bytes: Option<usize>,
    /// How long a plugin swap waits for a voter that says nothing of the new
    /// component before it fails, naming it [default: 60000].
    #[arg(long, env = "RAFTIFY_SWAP_READY_TIMEOUT_MS")]
    pub swap_ready_timeout_ms: Option<u64>,
    /// How long a client request may wait for its result [default: 10000].
    #[arg(long, env = "RAFTIFY_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Fuel for one plugin call [default: 1000000000]. Must match on every node.
    #[arg(long, env = "RAFTIFY_FUEL_PER_CALL")]
    pub fuel_per_call: Option<u64>,
    /// Fuel for one plugin snapshot or restore [default: 50000000000].
    #[arg(long, env = "RAFTIFY_FUEL_PER_SNAPSHOT")]
    pub fuel_per_snapshot: Option<u64>,
    /// Largest plugin memory in bytes [default: 1073741824]. Must match on every node.
    #[arg(long, env = "RAFTIFY_MAX_MEMORY_BYTES")]
    pub max_memory_bytes: Option<usize>,
    /// Largest result one plugin call may return, in bytes [default: 16777216].
    #[arg(long, env = "RAFTIFY_MAX_RESULT_BYTES")]
    pub max_result_bytes: Option<usize>,
    /// Where compiled plugins are cached [default: DATA_DIR/compiled]. Nodes
    /// on one machine may share it; only trusted users may write it, since
    /// compiled code is loaded as is (each file is checksummed).
    #[arg(long, env = "RAFTIFY_COMPILE_CACHE_DIR")]
    pub compile_cache_dir: Option<PathBuf>,
    /// Take a snapshot after this many applied entries [default: 100000].
    #[arg(long, env = "RAFTIFY_SNAPSHOT_EVERY_ENTRIES")]
    pub snapshot_every_entries: Option<u64>,
    /// Log entries kept behind a snapshot [default: 1000].
    #[arg(long, env = "RAFTIFY_SNAPSHOT_KEEP_ENTRIES")]
    pub snapshot_keep_entries: Option<u64>,
    /// Before a periodic snapshot, also wait until the entries applied since
    /// the last one hold this percentage of its size, so a large state is
    /// not rewritten every few seconds; 0: count entries only [default: 25].
    #[arg(long, env = "RAFTIFY_SNAPSHOT_LOG_PERCENT")]
    pub snapshot_log_percent: Option<u64>,
    /// Chunk size for sending snapshots [default: 1048576].
    #[arg(long, env = "RAFTIFY_SNAPSHOT_CHUNK_BYTES")]
    pub snapshot_chunk_bytes: Option<usize>,
    /// Largest snapshot accepted from a leader [default: 8589934592].
    #[arg(long, env = "RAFTIFY_MAX_SNAPSHOT_BYTES")]
    pub max_snapshot_bytes: Option<u64>,
    /// Largest LMDB file in bytes [default: 17179869184].
    #[arg(long, env = "RAFTIFY_LMDB_MAP_SIZE_BYTES")]
    pub lmdb_map_size_bytes: Option<usize>,
    /// The most bytes this node's store may hold before it raises the
    /// cluster's space alarm, which refuses writes [default: 8 GiB, or 80%
    /// of the LMDB map if less].
    #[arg(long, env = "RAFTIFY_QUOTA_BYTES")]
    pub quota_bytes: Option<u64>,
    /// Raise the space alarm when the data dir's filesystem has less free
    /// space than this [default: 256 MiB, or a tenth of a smaller filesystem].
    #[arg(long, env = "RAFTIFY_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
    /// Do not fsync LMDB commits. UNSAFE: a power loss loses acknowledged
    /// writes. For tests and benchmarks only.
    #[arg(long, env = "RAFTIFY_UNSAFE_NO_FSYNC")]
    #[serde(default)]
    pub unsafe_no_fsync: bool,
    /// How log lines are written to stderr: `text` for people, `json` (one
    /// object per line, fields included) for log collectors. A flag or
    /// RAFTIFY_LOG_FORMAT only, since logging starts before --config is read.
    #[arg(long, env = "RAFTIFY_LOG_FORMAT", value_enum, default_value = "text")]
    #[serde(skip)]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("bad config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--peers: {0}")]
    Peers(String),
    #[error("{0}")]
    Invalid(String),
}

impl RunArgs {
    /// Merge with the config file (if any), apply defaults, validate.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => RunArgs::default(),
        };
        let args = self.or(file);
        let snapshot = SnapshotConfig::default();
        let defaults = (
            RaftConfig::default(),
            SandboxConfig::default(),
            ClientConfig::default(),
            TransportConfig::default(),
            LmdbOptions::default(),
        );
        let (raft, sandbox, client, transport, lmdb) = defaults;
        let connections = ConnectionConfig::default();
        let tls = match (args.tls_ca, args.tls_cert, args.tls_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca,
                cert: Some(cert),
                key: Some(key),
            }),
            _ => {
                return Err(ConfigError::Invalid(
                    "TLS needs all three of --tls-ca, --tls-cert and --tls-key".into(),
                ));
            }
        };
        let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let config = NodeConfig {
            id: args.id,
            listen: args.listen.unwrap_or_else(|| DEFAULT_ADDR.to_string()),
            metrics_listen: args.metrics_listen,
            plugin: args.plugin,
            peers: match &args.peers {
                Some(text) => parse_peers(text)?,
                None => BTreeMap::new(),
            },
            join: args.join,
            force_new_cluster: args.force_new_cluster,
            tls,
            tls_require_client_cert: args.tls_require_client_cert,
            auth_file: args.auth_file,
            token: args.token,
            connections: ConnectionConfig {
                max_connections: args.max_connections.unwrap_or(connections.max_connections),
                idle_timeout_ms: args
                    .idle_timeout_secs
                    .map_or(connections.idle_timeout_ms, |s| s.saturating_mul(1000)),
                ..connections
            },
            raft: RaftConfig {
                tick_interval_ms: args.tick_interval_ms.unwrap_or(raft.tick_interval_ms),
                election_ticks: args.election_ticks.unwrap_or(raft.election_ticks),
                heartbeat_ticks: args.heartbeat_ticks.unwrap_or(raft.heartbeat_ticks),
                max_inflight_messages: args.max_inflight_messages.unwrap_or(raft.max_inflight_messages),
                max_entries_bytes_per_message: raft.max_entries_bytes_per_message,
                max_pending_proposals: args.max_pending_proposals.unwrap_or(raft.max_pending_proposals),
                promote_lag_entries: raft.promote_lag_entries,
            },
            sandbox: SandboxConfig {
                fuel_per_call: args.fuel_per_call.unwrap_or(sandbox.fuel_per_call),
                fuel_per_snapshot: args.fuel_per_snapshot.unwrap_or(sandbox.fuel_per_snapshot),
                fuel_per_codec_call: sandbox.fuel_per_codec_call,
                max_memory_bytes: args.max_memory_bytes.unwrap_or(sandbox.max_memory_bytes),
                max_result_bytes: args.max_result_bytes.unwrap_or(sandbox.max_result_bytes),
                max_output_bytes_per_call: sandbox.max_output_bytes_per_call,
                cache_dir: Some(args.compile_cache_dir.unwrap_or_else(|| data_dir.join("compiled"))),
            },
            client: ClientConfig {
                max_proposal_bytes: args.max_proposal_bytes.unwrap_or(client.max_proposal_bytes),
                request_timeout_ms: args.request_timeout_ms.unwrap_or(client.request_timeout_ms),
                stream_window: client.stream_window,
                max_plugin_bytes: args.max_plugin_bytes.unwrap_or(client.max_plugin_bytes),
                swap_ready_timeout_ms: args.swap_ready_timeout_ms.unwrap_or(client.swap_ready_timeout_ms),
            },
            transport: TransportConfig {
                max_message_bytes: args.max_message_bytes.unwrap_or(transport.max_message_bytes),
                snapshot_chunk_bytes: args.snapshot_chunk_bytes.unwrap_or(snapshot.chunk_bytes),
                ..transport
            },
            lmdb: LmdbOptions {
                map_size_bytes: args.lmdb_map_size_bytes.unwrap_or(lmdb.map_size_bytes),
                unsafe_no_fsync: args.unsafe_no_fsync,
            },
            snapshot: SnapshotConfig {
                every_entries: args.snapshot_every_entries.unwrap_or(snapshot.every_entries),
                keep_entries: args.snapshot_keep_entries.unwrap_or(snapshot.keep_entries),
                log_percent: args.snapshot_log_percent.unwrap_or(snapshot.log_percent),
                chunk_bytes: args.snapshot_chunk_bytes.unwrap_or(snapshot.chunk_bytes),
                max_bytes: args.max_snapshot_bytes.unwrap_or(snapshot.max_bytes),
                // Set from the space reserve when the node starts.
                reserve_bytes: 0,
            },
            quota_bytes: args.quota_bytes,
            min_free_bytes: args.min_free_bytes,
            data_dir,
        };
        config.validate()?;
        Ok(config)
    }

    /// Field by field: ours if set, else `other`'s.
    fn or(self, other: RunArgs) -> RunArgs {
        RunArgs {
            config: self.config,
            id: self.id.or(other.id),
            listen: self.listen.or(other.listen),
            metrics_listen: self.metrics_listen.or(other.metrics_listen),
            data_dir: self.data_dir.or(other.data_dir),
            plugin: self.plugin.or(other.plugin),
            peers: self.peers.or(other.peers),
            join: self.join.or(other.join),
            force_new_cluster: self.force_new_cluster || other.force_new_cluster,
            tls_ca: self.tls_ca.or(other.tls_ca),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
            tls_require_client_cert: self.tls_require_client_cert || other.tls_require_client_cert,
            auth_file: self.auth_file.or(other.auth_file),
            token: self.token.or(other.token),
            max_connections: self.max_connections.or(other.max_connections),
            idle_timeout_secs: self.idle_timeout_secs.or(other.idle_timeout_secs),
            tick_interval_ms: self.tick_interval_ms.or(other.tick_interval_ms),
            election_ticks: self.election_ticks.or(other.election_ticks),
            heartbeat_ticks: self.heartbeat_ticks.or(other.heartbeat_ticks),
            max_inflight_messages: self.max_inflight_messages.or(other.max_inflight_messages),
            max_pending_proposals: self.max_pending_proposals.or(other.max_pending_proposals),
            max_proposal_bytes: self.max_proposal_bytes.or(other.max_proposal_bytes),
            max_plugin_bytes: self.max_plugin_bytes.or(other.max_plugin_bytes),
            max_message_bytes: self.max_message_bytes.or(other.max_message_bytes),
            request_timeout_ms: self.request_timeout_ms.or(other.request_timeout_ms),
            fuel_per_call: self.fuel_per_call.or(other.fuel_per_call),
            fuel_per_snapshot: self.fuel_per_snapshot.or(other.fuel_per_snapshot),
            max_memory_bytes: self.max_memory_bytes.or(other.max_memory_bytes),
            max_result_bytes: self.max_result_bytes.or(other.max_result_bytes),
            swap_ready_timeout_ms: self.swap_ready_timeout_ms.or(other.swap_ready_timeout_ms),
            log_format: self.log_format,
            compile_cache_dir: self.compile_cache_dir.or(other.compile_cache_dir),
            lmdb_map_size_bytes: self.lmdb_map_size_bytes.or(other.lmdb_map_size_bytes),
            quota_bytes: self.quota_bytes.or(other.quota_bytes),
            min_free_bytes: self.min_free_bytes.or(other.min_free_bytes),
            snapshot_every_entries: self.snapshot_every_entries.or(other.snapshot_every_entries),
            snapshot_keep_entries: self.snapshot_keep_entries.or(other.snapshot_keep_entries),
            snapshot_log_percent: self.snapshot_log_percent.or(other.snapshot_log_percent),
            snapshot_chunk_bytes: self.snapshot_chunk_bytes.or(other.snapshot_chunk_bytes),
            max_snapshot_bytes: self.max_snapshot_bytes.or(other.max_snapshot_bytes),
            unsafe_no_fsync: self.unsafe_no_fsync || other.unsafe_no_fsync,
        }
    }
}

fn load_file(path: &Path) -> Result<RunArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

/// Parse `--peers`: `ID=HOST:PORT` pairs, comma-separated.
///
/// ```
/// let peers = raftify_host::config::parse_peers("1=127.0.0.1:7001,2=127.0.0.1:7002").unwrap();
/// assert_eq!(peers[&2], "127.0.0.1:7002");
/// assert!(raftify_host::config::parse_peers("1=127.0.0.1:7001,1=127.0.0.1:7002").is_err());
/// ```
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::Peers(format!("{item:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|&id| id > 0)
            .ok_or_else(|| ConfigError::Peers(format!("{id:?} is not a positive integer id")))?;
        check_addr(addr.trim()).map_err(ConfigError::Peers)?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(ConfigError::Peers(format!("node {id} is listed twice")));
        }
    }
    if peers.is_empty() {
        return Err(ConfigError::Peers("no peers given".into()));
    }
    Ok(peers)
}

impl NodeConfig {
    /// What `raftify-host run --listen LISTEN --data-dir DATA_DIR` runs
    /// with: every other field at its default (change them as needed, e.g.
    /// `peers`, `join`, `plugin`).
    pub fn new(listen: &str, data_dir: impl Into<PathBuf>) -> Result<NodeConfig, ConfigError> {
        RunArgs {
            listen: Some(listen.to_string()),
            data_dir: Some(data_dir.into()),
            ..RunArgs::default()
        }
        .resolve()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: String| Err(ConfigError::Invalid(message));
        if self.id == Some(0) {
            return bad("--id must be a positive integer (0 is raft's \"no node\")".into());
        }
        check_addr(&self.listen).map_err(|e| ConfigError::Invalid(format!("--listen: {e}")))?;
        if let Some(metrics) = &self.metrics_listen {
            check_addr(metrics).map_err(|e| ConfigError::Invalid(format!("--metrics-listen: {e}")))?;
            if *metrics == self.listen {
                return Err(ConfigError::Invalid(
                    "--metrics-listen must differ from --listen (HTTP/1.1 there, gRPC here)".into(),
                ));
            }
        }
        if let Some(id) = self.id
            && !self.peers.is_empty()
            && !self.peers.contains_key(&id)
        {
            return bad(format!("--peers does not include this node's --id {id}"));
        }
        if let Some(join) = &self.join {
            check_addr(join).map_err(|e| ConfigError::Invalid(format!("--join: {e}")))?;
            if !self.peers.is_empty() {
                return bad(
                    "--join and --peers cannot be combined: join an existing cluster, or start a new one".into(),
                );
            }
        }
        if self.auth_file.is_some() && self.tls.is_none() {
            return bad(
                "--auth-file needs TLS (--tls-ca, --tls-cert, --tls-key): tokens must not cross the network in clear"
                    .into(),
            );
        }
        if self.tls_require_client_cert && self.tls.is_none() {
            return bad("--tls-require-client-cert needs TLS (--tls-ca, --tls-cert, --tls-key)".into());
        }
        if self.connections.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if !self.peers.is_empty() && self.id.is_none() {
            return bad("--peers needs --id to say which of the peers this node is".into());
        }
        let raft = &self.raft;
        if raft.tick_interval_ms == 0 {
            return bad("tick_interval_ms must be at least 1".into());
        }
        if raft.heartbeat_ticks == 0 || raft.election_ticks <= raft.heartbeat_ticks {
            return bad(format!(
                "election_ticks ({}) must be greater than heartbeat_ticks ({}), which must be at least 1",
                raft.election_ticks, raft.heartbeat_ticks
            ));
        }
        if raft.max_inflight_messages == 0 || raft.max_pending_proposals == 0 {
            return bad("max_inflight_messages and max_pending_proposals must be at least 1".into());
        }
        if self.client.max_proposal_bytes == 0
            || self.client.max_proposal_bytes + 1024 > self.transport.max_message_bytes
        {
            return bad(format!(
                "max_proposal_bytes ({}) must be at least 1 and leave 1 KiB of room under max_message_bytes ({})",
                self.client.max_proposal_bytes, self.transport.max_message_bytes
            ));
        }
        if self.client.max_plugin_bytes + (1 << 20) > self.transport.max_message_bytes {
            return bad(format!(
                "max_plugin_bytes ({}) must leave 1 MiB of room under max_message_bytes ({}): a swap entry travels in one message",
                self.client.max_plugin_bytes, self.transport.max_message_bytes
            ));
        }
        if self.client.request_timeout_ms == 0 {
            return bad("request_timeout_ms must be at least 1".into());
        }
        crate::sandbox::Limits::of(&self.sandbox).check().or_else(bad)?;
        if self.sandbox.max_result_bytes + (64 << 10) > self.transport.max_message_bytes {
            return bad(format!(
                "max_result_bytes ({}) must leave 64 KiB of room under max_message_bytes ({}): a result travels in one message",
                self.sandbox.max_result_bytes, self.transport.max_message_bytes
            ));
        }
        if self.snapshot.every_entries == 0 {
            return bad("snapshot_every_entries must be at least 1".into());
        }
        if self.snapshot.chunk_bytes < 1024 || self.snapshot.chunk_bytes + 1024 > self.transport.max_message_bytes {
            return bad(format!(
                "snapshot_chunk_bytes ({}) must be at least 1 KiB and leave 1 KiB of room under max_message_bytes ({})",
                self.snapshot.chunk_bytes, self.transport.max_message_bytes
            ));
        }
        if self.lmdb.map_size_bytes < (1 << 20) {
            return bad("lmdb_map_size_bytes must be at least 1 MiB".into());
        }
        if let Some(quota) = self.quota_bytes
            && (quota < (1 << 20) || quota > self.lmdb.map_size_bytes as u64)
        {
            return bad(format!(
                "quota_bytes ({quota}) must be at least 1 MiB and at most lmdb_map_size_bytes ({})",
                self.lmdb.map_size_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_bad_peers_are_named() {
        let peers = parse_peers("1=127.0.0.1:7001, 2=localhost:7002").unwrap();
        assert_eq!(peers[&2], "localhost:7002");
        for bad in [
            "1",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=nohost",
            "1=h:99999",
            "1=h:0",
            "1=[::1]:1:2",
            "1=evil host:1",
            "1=evil\nhost:1",
            "1=-bad-:1",
            "1=999.1.1.1:1",
            "1=a:1,1=b:2",
            "",
        ] {
            assert!(parse_peers(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "election_ticks = 20\nheartbeat_ticks = 4\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(file),
            listen: Some("127.0.0.1:9001".into()),
            ..Default::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:9001");
        assert_eq!(config.raft.election_ticks, 20);
        assert_eq!(config.raft.tick_interval_ms, 100);
    }

    #[test]
    fn bad_settings_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "no_such_setting = 1\n").unwrap();
        let err = RunArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("no_such_setting"), "{err}");
        let err = RunArgs {
            election_ticks: Some(2),
            heartbeat_ticks: Some(2),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("election_ticks"), "{err}");
        let err = RunArgs {
            id: Some(3),
            peers: Some("1=127.0.0.1:1,2=127.0.0.1:2".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("--id 3"), "{err}");
    }
}
