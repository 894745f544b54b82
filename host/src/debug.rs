//! `raftify-host debug`: look inside a stopped node's data dir, or a live
//! node's raft state.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType};
use raft::{GetEntriesContext, Storage};
use serde_json::{Value, json};

use crate::codec::Codec;
use crate::envelope::{self, Payload};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::snapshot;
use crate::storage::LogStore;
use crate::storage::lmdb::{LmdbOptions, LmdbStore};

/// Everything persisted in a data dir, as JSON (the text output is derived
/// from it).
pub fn persisted(data_dir: &Path) -> anyhow::Result<Value> {
    let lmdb = data_dir.join("lmdb");
    if !lmdb.join("data.mdb").exists() {
        bail!("{} holds no raftify-host data (no lmdb/data.mdb)", data_dir.display());
    }
    let options = LmdbOptions {
        map_size_bytes: LmdbOptions::default().map_size_bytes,
        unsafe_no_fsync: false,
    };
    // Opening repairs a torn log tail and moves an old log out of LMDB:
    // never under a running node.
    let _lock = crate::storage::data_dir::lock_data_dir(data_dir)?;
    let store = LmdbStore::open(&lmdb, &options).context("cannot open the node's store")?;
    // Each entry is decoded by the plugin active at its index.
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(data_dir.join("compiled")),
        ..SandboxConfig::default()
    })?;
    let history = store.plugin_history()?;
    let mut codecs: BTreeMap<[u8; 32], Codec> = BTreeMap::new();
    for (_, sha) in &history {
        if codecs.contains_key(sha) {
            continue;
        }
        if let Some(wasm) = store.plugin_blob(sha)? {
            let plugin = sandbox
                .load(&wasm)
                .with_context(|| format!("cannot load the stored plugin {}", hex::encode(sha)))?;
            codecs.insert(*sha, Codec::new(tokio::sync::watch::channel(plugin).1));
        }
    }
    let codec_at = |index: u64| {
        history
            .iter()
            .rev()
            .find(|(from, _)| *from < index)
            .or(history.first())
            .and_then(|(_, sha)| codecs.get(sha))
    };
    let state = store.initial_state()?;
    let first = store.first_index()?;
    let last = store.last_index()?;
    let mut entries = Vec::new();
    let mut next = first;
    while next <= last {
        let batch = store.entries(next, last + 1, 4 << 20, GetEntriesContext::empty(false))?;
        for entry in &batch {
            entries.push(describe(entry, codec_at(entry.index)));
        }
        next = batch.last().map_or(last + 1, |e| e.index + 1);
    }
    let snapshot = match store.stored_snapshot()? {
        None => Value::Null,
        Some(snapshot) => {
            let metadata = snapshot.get_metadata();
            let header = snapshot::decode(&snapshot.data).ok().map(|(header, state)| {
                json!({
                    "plugin_sha256": hex::encode(header.plugin_sha256),
                    "members": header.members,
                    "state_bytes": state.len(),
                })
            });
            json!({
                "index": metadata.index,
                "term": metadata.term,
                "voters": metadata.get_conf_state().voters,
                "learners": metadata.get_conf_state().learners,
                "bytes": snapshot.data.len(),
                "header": header,
            })
        }
    };
    let identity = store.identity()?;
    Ok(json!({
        "entries": entries,
        "hard_state": {
            "term": state.hard_state.term,
            "vote": state.hard_state.vote,
            "commit": state.hard_state.commit,
        },
        "conf_state": {
            "voters": state.conf_state.voters,
            "learners": state.conf_state.learners,
        },
        "snapshot": snapshot,
        "first_index": first,
        "last_index": last,
        "applied_index": store.applied_index()?,
        "node_id": identity.as_ref().map(|i| i.id),
        "members": identity.map(|i| i.members).unwrap_or_default(),
        "plugin_sha256": history.last().map(|(_, sha)| hex::encode(sha)),
        "plugin_history": history
            .iter()
            .map(|(index, sha)| json!({ "from_index": index, "sha256": hex::encode(sha) }))
            .collect::<Vec<_>>(),
        "traps": store.traps(0, u64::MAX)?,
    }))
}

fn describe(entry: &Entry, codec: Option<&Codec>) -> Value {
    let (kind, text) = match entry.get_entry_type() {
        EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&entry.data) {
            Ok(change) => {
                let what = match change.get_change_type() {
                    ConfChangeType::AddNode => "add voter",
                    ConfChangeType::AddLearnerNode => "add learner",
                    ConfChangeType::RemoveNode => "remove",
                };
                let addr = String::from_utf8_lossy(&change.context).into_owned();
                (
                    "conf-change",
                    format!("{what} {} {addr}", change.node_id).trim_end().to_string(),
                )
            }
            Err(e) => ("conf-change", format!("<malformed: {e}>")),
        },
        EntryType::EntryConfChangeV2 => ("conf-change-v2", "<joint conf change>".to_string()),
        EntryType::EntryNormal => match envelope::open(&entry.data) {
            Ok(Payload::Empty) => ("empty", String::new()),
            Ok(Payload::Host(host)) => ("host", format!("{host:?}")),
            Ok(Payload::PluginChunk { sha256, offset, bytes }) => (
                "plugin-chunk",
                format!(
                    "plugin {} bytes {}..{}",
                    hex::encode(sha256),
                    offset,
                    offset + bytes.len() as u64
                ),
            ),
            Ok(Payload::PluginSwap { sha256, len }) => (
                "plugin-swap",
                format!("swap to plugin {} ({len} bytes)", hex::encode(sha256)),
            ),
            Ok(Payload::Command(command)) => ("command", decoded(codec, command)),
            Ok(Payload::SessionCommand { session, seq, command }) => {
                return json!({
                    "index": entry.index,
                    "term": entry.term,
                    "type": "command",
                    "text": decoded(codec, command),
                    "session": session,
                    "sequence": seq,
                });
            }
            Err(e) => ("malformed", e.to_string()),
        },
    };
    json!({ "index": entry.index, "term": entry.term, "type": kind, "text": text })
}

/// A command's text, through the plugin's codec.
fn decoded(codec: Option<&Codec>, command: &[u8]) -> String {
    match codec.map(|c| c.decode(command)) {
        Some(Ok(text)) => text,
        Some(Err(e)) => format!("<{} bytes the plugin cannot decode: {e}>", command.len()),
        None => format!("<{} bytes; no plugin stored>", command.len()),
    }
}

/// Render `persisted` as text.
pub fn print_persisted(value: &Value) {
    for entry in value["entries"].as_array().into_iter().flatten() {
        let in_session = match (entry["session"].as_u64(), entry["sequence"].as_u64()) {
            (Some(session), Some(seq)) => format!("  (session {session}, sequence {seq})"),
            _ => String::new(),
        };
        println!(
            "{:>8} {:>4} {:<12} {}{in_session}",
            entry["index"],
            entry["term"],
            entry["type"].as_str().unwrap_or_default(),
            entry["text"].as_str().unwrap_or_default()
        );
    }
    let hs = &value["hard_state"];
    println!(
        "hard state:     term {} vote {} commit {}",
        hs["term"], hs["vote"], hs["commit"]
    );
    let cs = &value["conf_state"];
    println!("conf state:     voters {} learners {}", cs["voters"], cs["learners"]);
    match &value["snapshot"] {
        Value::Null => println!("snapshot:       none"),
        s => println!(
            "snapshot:       index {} term {} {} bytes plugin {}",
            s["index"],
            s["term"],
            s["bytes"],
            s["header"]["plugin_sha256"].as_str().unwrap_or("?")
        ),
    }
    println!("first index:    {}", value["first_index"]);
    println!("last index:     {}", value["last_index"]);
    println!("applied index:  {}", value["applied_index"]);
    println!("node id:        {}", value["node_id"]);
    println!("members:        {}", value["members"]);
    println!("plugin:         {}", value["plugin_sha256"].as_str().unwrap_or("none"));
    for trap in value["traps"].as_array().into_iter().flatten() {
        println!("trapped entry:  {} {}", trap[0], trap[1].as_str().unwrap_or_default());
    }
}
