//! Node configuration. Every limit is a named field of its layer's config
//! struct (`RaftConfig`, `SandboxConfig`, `ClientConfig`, ...), written
//! once: the struct derives clap and serde together, so one field is a
//! `run` flag, a `RAFTIFY_*` environment variable and a key of the TOML file
//! given by `--config`, in that order of precedence over its default. The
//! layers are flattened into [`RunSettings`] (the command line) and kept
//! whole in [`NodeConfig`] (what a node runs with), which is validated with
//! a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory as _, FromArgMatches};
use serde::{Deserialize, Serialize};

pub use crate::dial::check_addr;
use crate::listener::ConnectionConfig;
use crate::node::RaftConfig;
use crate::sandbox::SandboxConfig;
use crate::server::ClientConfig;
use crate::snapshot::SnapshotConfig;
use crate::space::SpaceSettings;
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
    pub space: SpaceSettings,
}

/// `raftify-host run`'s settings: the node's own, then each layer's.
/// Each may also be set by its `RAFTIFY_*` environment variable or in the
/// `--config` TOML file (the flag's name with underscores).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RunSettings {
    /// A TOML file with any of these settings (flags and env win over it).
    #[arg(long, env = "RAFTIFY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer). Taken from the data dir on restart.
    #[arg(long, env = "RAFTIFY_ID")]
    pub id: Option<u64>,
    /// Address to serve peers and clients on.
    #[arg(long, env = "RAFTIFY_LISTEN", default_value = DEFAULT_ADDR)]
    pub listen: String,
    /// Serve Prometheus `/metrics` and the `/livez` and `/readyz` probes
    /// over plain HTTP/1.1 on this address (off unless given).
    #[arg(long, env = "RAFTIFY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Where the node keeps its LMDB and caches.
    #[arg(long, env = "RAFTIFY_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
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
    pub tls_require_client_cert: bool,
    /// TOML of [[token]] tables (name, role = read|write|admin, sha256 of
    /// the token): every client call then needs `--token`. Needs TLS.
    #[arg(long, env = "RAFTIFY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// The admin token a node joining with --join presents.
    #[arg(long, env = "RAFTIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How log lines are written to stderr: `text` for people, `json` (one
    /// object per line, fields included) for log collectors. A flag or
    /// RAFTIFY_LOG_FORMAT only, since logging starts before --config is read.
    #[arg(long, env = "RAFTIFY_LOG_FORMAT", value_enum, default_value = "text")]
    #[serde(skip)]
    pub log_format: crate::logging::LogFormat,
    #[command(flatten)]
    #[serde(flatten)]
    pub connections: ConnectionConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub raft: RaftConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub client: ClientConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub sandbox: SandboxConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub snapshot: SnapshotConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub transport: TransportConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub lmdb: LmdbOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub space: SpaceSettings,
}

impl Default for RunSettings {
    /// Every setting at its default, whatever the environment says.
    fn default() -> Self {
        RunSettings {
            config: None,
            id: None,
            listen: DEFAULT_ADDR.to_string(),
            metrics_listen: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            plugin: None,
            peers: None,
            join: None,
            force_new_cluster: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_require_client_cert: false,
            auth_file: None,
            token: None,
            log_format: Default::default(),
            connections: Default::default(),
            raft: Default::default(),
            client: Default::default(),
            sandbox: Default::default(),
            snapshot: Default::default(),
            transport: Default::default(),
            lmdb: Default::default(),
            space: Default::default(),
        }
    }
}

/// Settings that a `--config` file cannot hold.
const NOT_IN_FILE: [&str; 2] = ["config", "log_format"];

/// `run`'s command line as parsed: the settings, and which of them a flag
/// or an environment variable gave (those win over the `--config` file).
#[derive(Debug, Clone, Default)]
pub struct RunArgs {
    pub settings: RunSettings,
    explicit: BTreeSet<String>,
}

impl FromArgMatches for RunArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let explicit = matches
            .ids()
            .map(|id| id.as_str())
            .filter(|id| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(str::to_string)
            .collect();
        Ok(RunArgs {
            settings: RunSettings::from_arg_matches(matches)?,
            explicit,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = RunArgs::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for RunArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        RunSettings::augment_args(command)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        RunSettings::augment_args_for_update(command)
    }
}

/// For parsing `run`'s flags on their own (`RunArgs::parse_from`).
#[derive(clap::Parser)]
#[command(name = "run")]
struct RunCommand {
    #[command(flatten)]
    args: RunArgs,
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
    #[error("{0}")]
    Flags(String),
}

impl RunArgs {
    /// `run`'s flags from `argv` (without the program name), with the
    /// environment's `RAFTIFY_*` variables as the real command line has them.
    pub fn parse_from<I, T>(argv: I) -> Result<RunArgs, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("run")).chain(argv.into_iter().map(Into::into));
        let matches = RunCommand::command()
            .try_get_matches_from(argv)
            .map_err(|e| ConfigError::Flags(e.to_string()))?;
        RunArgs::from_arg_matches(&matches).map_err(|e| ConfigError::Flags(e.to_string()))
    }

    /// Merge with the config file (if any), then validate.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let settings = match &self.settings.config {
            Some(path) => with_file(self.settings.clone(), &self.explicit, path)?,
            None => self.settings,
        };
        settings.into_config()
    }
}

/// `settings` with each key of the TOML file at `path` in place of the
/// setting's default, where no flag or variable (`explicit`) gave it.
fn with_file(settings: RunSettings, explicit: &BTreeSet<String>, path: &Path) -> Result<RunSettings, ConfigError> {
    let bad = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: toml::Table = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
    let known: BTreeSet<String> = RunCommand::command()
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .filter(|id| !NOT_IN_FILE.contains(&id.as_str()))
        .collect();
    let as_table = |settings: &RunSettings| {
        toml::Table::try_from(settings).map_err(|e| bad(format!("cannot merge the settings: {e}")))
    };
    let defaults = as_table(&RunSettings::default())?;
    let mut merged = as_table(&settings)?;
    for (key, value) in file {
        if !known.contains(&key) {
            return Err(bad(match NOT_IN_FILE.contains(&key.as_str()) {
                true => format!("`{key}` can only be given as a flag or a RAFTIFY_* variable"),
                false => format!("unknown setting `{key}`"),
            }));
        }
        // Each key checked on its own, so a wrong type names its key.
        let mut alone = defaults.clone();
        alone.insert(key.clone(), value.clone());
        RunSettings::deserialize(alone).map_err(|e| bad(format!("`{key}`: {}", e.message())))?;
        if !explicit.contains(&key) {
            merged.insert(key, value);
        }
    }
    let merged = RunSettings::deserialize(merged).map_err(|e| bad(e.message().to_string()))?;
    Ok(RunSettings {
        config: settings.config,
        log_format: settings.log_format,
        ..merged
    })
}

impl RunSettings {
    /// Parse what is still text (`--peers`, the TLS files), fill in the
    /// defaults that depend on others, and validate.
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let tls = match (self.tls_ca, self.tls_cert, self.tls_key) {
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
        let mut sandbox = self.sandbox;
        sandbox.cache_dir = Some(sandbox.cache_dir.unwrap_or_else(|| self.data_dir.join("compiled")));
        let config = NodeConfig {
            id: self.id,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            plugin: self.plugin,
            peers: match &self.peers {
                Some(text) => parse_peers(text)?,
                None => BTreeMap::new(),
            },
            join: self.join,
            force_new_cluster: self.force_new_cluster,
            tls,
            tls_require_client_cert: self.tls_require_client_cert,
            auth_file: self.auth_file,
            token: self.token,
            connections: self.connections,
            raft: self.raft,
            sandbox,
            client: self.client,
            transport: self.transport,
            lmdb: self.lmdb,
            snapshot: self.snapshot,
            space: self.space,
            data_dir: self.data_dir,
        };
        config.validate()?;
        Ok(config)
    }
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
        RunSettings {
            listen: listen.to_string(),
            data_dir: data_dir.into(),
            ..RunSettings::default()
        }
        .into_config()
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
        let connections = &self.connections;
        if connections.max_connections == 0
            || connections.handshake_timeout_ms == 0
            || connections.idle_timeout_secs == 0
            || connections.keepalive_interval_ms == 0
            || connections.max_streams_per_connection == 0
        {
            return bad(
                "max_connections, handshake_timeout_ms, idle_timeout_secs, keepalive_interval_ms and \
                 max_streams_per_connection must be at least 1"
                    .into(),
            );
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
        if raft.max_entries_bytes_per_message == 0
            || raft.max_entries_bytes_per_message + (1 << 20) > self.transport.max_message_bytes as u64
        {
            return bad(format!(
                "max_entries_bytes_per_message ({}) must be at least 1 and leave 1 MiB of room under max_message_bytes ({})",
                raft.max_entries_bytes_per_message, self.transport.max_message_bytes
            ));
        }
        let transport = &self.transport;
        if transport.peer_queue_batches == 0
            || transport.min_backoff_ms == 0
            || transport.max_backoff_ms < transport.min_backoff_ms
        {
            return bad(format!(
                "peer_queue_batches and min_backoff_ms must be at least 1, and max_backoff_ms ({}) at least min_backoff_ms ({})",
                transport.max_backoff_ms, transport.min_backoff_ms
            ));
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
        if self.client.request_timeout_ms == 0 || self.client.stream_window == 0 {
            return bad("request_timeout_ms and stream_window must be at least 1".into());
        }
        if self.sandbox.fuel_per_codec_call < 1_000_000 {
            return bad("fuel_per_codec_call must be at least 1000000".into());
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
        if let Some(quota) = self.space.quota_bytes
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
mod tests;
