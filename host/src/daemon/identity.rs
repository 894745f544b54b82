//! A node's identity and first plugin, settled before anything starts:
//! bootstrap from `--peers`, restart from the data dir, join through a
//! seed, or force a new one-member cluster (disaster recovery).

use anyhow::{Context, bail};

use crate::config::NodeConfig;
use crate::dial::Dialer;
use crate::plugin_id::PluginId;
use crate::storage::{LogStore, NodeIdentity, WriteBatch, initial_conf_state};
use crate::transport::Link;
use std::sync::Arc;

/// First start: record the id, members and initial configuration. Restart:
/// read them back, and refuse flags that contradict them.
pub(super) async fn settle_identity<S: LogStore>(
    store: &S,
    config: &NodeConfig,
    dialer: &Dialer,
) -> anyhow::Result<(NodeIdentity, Option<Vec<u8>>)> {
    if let Some(mut identity) = store.identity()? {
        if let Some(id) = config.id
            && id != identity.id
        {
            bail!(
                "the data dir {} belongs to node {}, not --id {id}",
                config.data_dir.display(),
                identity.id
            );
        }
        // The node may have moved: its own address is whatever it listens on.
        if let Some(entry) = identity.members.iter_mut().find(|(i, _)| *i == identity.id) {
            entry.1 = config.listen.clone();
        }
        return Ok((identity, None));
    }
    if let Some(seed) = &config.join {
        return join(store, config, seed, dialer).await;
    }
    let id = config.id.unwrap_or(1);
    let members: Vec<(u64, String)> = if config.peers.is_empty() {
        vec![(id, config.listen.clone())]
    } else {
        config.peers.iter().map(|(i, a)| (*i, a.clone())).collect()
    };
    store.write(bootstrap_batch(id, &members)?)?;
    tracing::info!(id, ?members, "bootstrapped a new cluster member");
    Ok((
        store.identity()?.context("the bootstrap identity was not stored")?,
        None,
    ))
}

/// The initial members, written as the first log entries (one committed
/// AddNode conf change per member, at term 1) exactly as every initial
/// member writes them, so their logs agree and a node that joins later
/// learns the initial configuration by replaying the log.
pub(crate) fn bootstrap_batch(id: u64, members: &[(u64, String)]) -> anyhow::Result<WriteBatch> {
    use protobuf::Message as _;
    use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType, HardState};
    let mut entries = Vec::with_capacity(members.len());
    for (i, (member, addr)) in members.iter().enumerate() {
        let change = ConfChange {
            change_type: ConfChangeType::AddNode,
            node_id: *member,
            context: addr.clone().into_bytes().into(),
            ..Default::default()
        };
        entries.push(Entry {
            entry_type: EntryType::EntryConfChange,
            term: 1,
            index: i as u64 + 1,
            data: change.write_to_bytes()?.into(),
            ..Default::default()
        });
    }
    let last = entries.len() as u64;
    let voters = members.iter().map(|(i, _)| *i).collect();
    Ok(WriteBatch {
        entries,
        hard_state: Some(HardState {
            term: 1,
            commit: last,
            ..Default::default()
        }),
        conf_state: Some((initial_conf_state(voters), last)),
        identity: Some(NodeIdentity {
            id,
            members: members.to_vec(),
            max_id: members.iter().map(|(i, _)| *i).max().unwrap_or(id),
            cluster_id: crate::storage::new_cluster_id(members),
        }),
        applied_index: None,
    })
}

/// Disaster recovery: turn this node's data into a one-member cluster.
///
/// Every entry in the local log is kept and treated as committed (the local
/// commit index may lag what the lost majority had committed, and an entry
/// this node holds may have been acknowledged). Then a `RemoveNode` entry
/// for every other member is appended, so nodes that later join and replay
/// the log learn the new configuration too.
pub(super) fn force_new_cluster<S: LogStore>(store: &S, mut identity: NodeIdentity) -> anyhow::Result<NodeIdentity> {
    use protobuf::Message as _;
    use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType};
    let state = store.initial_state()?;
    let last = store.last_index()?;
    let term = state.hard_state.term.max(store.term(last)?);
    let others: Vec<u64> = state
        .conf_state
        .voters
        .iter()
        .chain(&state.conf_state.learners)
        .copied()
        .filter(|id| *id != identity.id)
        .collect();
    let mut entries = Vec::new();
    for (i, other) in others.iter().enumerate() {
        let change = ConfChange {
            change_type: ConfChangeType::RemoveNode,
            node_id: *other,
            ..Default::default()
        };
        entries.push(Entry {
            entry_type: EntryType::EntryConfChange,
            term,
            index: last + 1 + i as u64,
            data: change.write_to_bytes()?.into(),
            ..Default::default()
        });
    }
    let new_last = last + entries.len() as u64;
    identity.members.retain(|(id, _)| *id == identity.id);
    let mut hard_state = state.hard_state.clone();
    hard_state.term = term;
    hard_state.commit = new_last;
    store.write(WriteBatch {
        entries,
        hard_state: Some(hard_state),
        conf_state: Some((initial_conf_state(vec![identity.id]), new_last)),
        identity: Some(identity.clone()),
        applied_index: None,
    })?;
    tracing::warn!(
        id = identity.id,
        removed = ?others,
        last_index = new_last,
        "forced a new one-member cluster from this node's data"
    );
    Ok(identity)
}

/// Ask the cluster at `seed` for an id (retrying while it elects a leader or
/// finishes another membership change), then record the identity. The log,
/// including the configuration, arrives by replication.
pub(super) async fn join<S: LogStore>(
    store: &S,
    config: &NodeConfig,
    seed: &str,
    dialer: &Dialer,
) -> anyhow::Result<(NodeIdentity, Option<Vec<u8>>)> {
    let client_dialer = match &config.token {
        Some(token) => dialer.clone().with_token(token).map_err(anyhow::Error::msg)?,
        None => dialer.clone(),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let timeout = std::time::Duration::from_millis(config.client.request_timeout_ms);
    let response = loop {
        let attempt = async {
            let mut client = crate::client::Client::connect_with(seed, timeout, &client_dialer).await?;
            client.join(&config.listen, config.id.unwrap_or(0)).await
        };
        match attempt.await {
            Ok(response) => break response,
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tracing::info!(%seed, %error, "cannot join yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error).with_context(|| format!("cannot join the cluster through {seed}")),
        }
    };
    let members: Vec<(u64, String)> = response.members.iter().map(|m| (m.id, m.addr.clone())).collect();
    if response.id == 0 {
        bail!("the cluster at {seed} answered the join without an id");
    }
    let mut identity = NodeIdentity {
        id: response.id,
        max_id: members.iter().map(|(i, _)| *i).max().unwrap_or(0).max(response.id),
        members,
        cluster_id: response.cluster_id,
    };
    let link = Link {
        dialer: dialer.clone(),
        cluster_id: response.cluster_id,
        self_id: response.id,
        space: Arc::default(),
        plugins: Arc::default(),
        health: Arc::default(),
        epochs: Arc::default(),
        metrics: Arc::default(),
    };
    if !identity.members.iter().any(|(i, _)| *i == response.id) {
        identity.members.push((response.id, config.listen.clone()));
    }
    // The log the joiner will replay starts with the cluster's first plugin.
    let first: [u8; 32] = response
        .first_plugin_sha256
        .as_slice()
        .try_into()
        .context("the cluster did not name its first plugin")?;
    let addrs: Vec<String> = identity.members.iter().map(|(_, a)| a.clone()).collect();
    let wasm = crate::transport::fetch_plugin(
        &link,
        &first,
        std::iter::once(seed.to_string()).chain(addrs),
        config.transport.max_message_bytes,
    )
    .await
    .with_context(|| format!("cannot fetch the cluster's plugin {}", hex::encode(first)))?;
    store.write(WriteBatch {
        identity: Some(identity.clone()),
        ..Default::default()
    })?;
    tracing::info!(id = identity.id, %seed, "joined the cluster as a learner");
    Ok((identity, Some(wasm)))
}

/// The plugin a new node starts with: `--plugin` or the embedded kv. `None`
/// when the data dir already records its plugins (a `--plugin` given again is
/// accepted if it is one of them; anything else is refused).
pub(super) fn choose_plugin<S: LogStore>(store: &S, config: &NodeConfig) -> anyhow::Result<Option<Vec<u8>>> {
    let given = match &config.plugin {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("cannot read the plugin {}", path.display()))?),
        None => None,
    };
    let history = store.plugin_history()?;
    match (history.last(), given) {
        (Some(_), None) => Ok(None),
        (Some((_, active)), Some(given)) => {
            let given_sha = PluginId::of(&given).0;
            if !history.iter().any(|(_, sha)| *sha == given_sha) {
                bail!(
                    "this data dir runs plugin {}, not the --plugin given ({}); drop --plugin to restart \
                     with the stored plugin, or use `plugin swap` to change it",
                    hex::encode(active),
                    hex::encode(given_sha)
                );
            }
            Ok(None)
        }
        (None, given) if config.join.is_some() => {
            if given.is_some() {
                tracing::warn!("--plugin is ignored with --join: a joining node runs the cluster's plugins");
            }
            Ok(None)
        }
        (None, given) => Ok(Some(given.unwrap_or_else(|| super::EMBEDDED_KV.to_vec()))),
    }
}
