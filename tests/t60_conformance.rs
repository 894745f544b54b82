//! One command language, one snapshot format, four languages.
//!
//! Every kv plugin (Rust, TypeScript, Python and C) must pass the cases in
//! `tests/conformance/kv.cases` in a live 3-node cluster, leave the same state
//! on every replica, come back from its own snapshot after a restart, and take
//! over another language's state through a hot-swap. The non-Rust plugins are
//! built by `plugins/build.sh kv-ts kv-py kv-c stamp-py`, which the README's
//! test command runs first.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raftify_host::client::{Client, ClientError};
use raftify_host::daemon::EMBEDDED_KV;
use raftify_host::proto::{
    Consistency, ProposeRequest, QueryRequest, propose_request, propose_response, query_request, query_response,
};
use sha2::Digest;
use support::*;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Read a plugin built by `plugins/build.sh`; the Rust kv is embedded.
fn plugin_bytes(name: &str) -> Vec<u8> {
    if name == "kv" {
        return EMBEDDED_KV.to_vec();
    }
    if name == "kv-v1" {
        return raftify_host::daemon::EMBEDDED_KV_V1.to_vec();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "cannot read {}: {error}. Build it with `plugins/build.sh {name}`",
            path.display()
        )
    })
}

/// The plugin as a file nodes can load, compiled into the shared cache.
fn write_plugin(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, plugin_bytes(name)).unwrap();
    precompile(&path);
    path
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Propose,
    Query,
    RawPropose,
    RawQuery,
}

/// One line of `kv.cases`.
#[derive(Debug)]
struct Case {
    line: usize,
    source: String,
    kind: Kind,
    command: Vec<u8>,
    expected: Result<String, String>,
}

fn cases() -> Vec<Case> {
    let text = include_str!("conformance/kv.cases");
    let mut cases = Vec::new();
    for (n, source) in text.lines().enumerate() {
        if source.trim().is_empty() || source.starts_with('#') {
            continue;
        }
        let line = n + 1;
        let (head, expected) = source
            .rsplit_once(" => ")
            .unwrap_or_else(|| panic!("kv.cases line {line}: no ` => `"));
        let (kind, command) = head.split_once(' ').unwrap_or((head, ""));
        let kind = match kind {
            "propose" => Kind::Propose,
            "query" => Kind::Query,
            "raw-propose" => Kind::RawPropose,
            "raw-query" => Kind::RawQuery,
            other => panic!("kv.cases line {line}: unknown kind {other:?}"),
        };
        let command = match kind {
            Kind::Propose | Kind::Query => command.as_bytes().to_vec(),
            Kind::RawPropose | Kind::RawQuery => unescape(command),
        };
        let expected = match expected.strip_prefix("err: ") {
            Some(message) => Err(message.to_string()),
            None => Ok(expected.to_string()),
        };
        cases.push(Case {
            line,
            source: source.to_string(),
            kind,
            command,
            expected,
        });
    }
    cases
}

/// `\xNN` escapes to bytes; everything else as UTF-8.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("\\x") {
        out.extend_from_slice(&rest.as_bytes()[..at]);
        let hex = &rest[at + 2..at + 4];
        out.push(u8::from_str_radix(hex, 16).expect("two hex digits after \\x"));
        rest = &rest[at + 4..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

/// The keys the cases write, to compare replicas by.
fn case_keys() -> Vec<String> {
    let mut keys: Vec<String> = cases()
        .iter()
        .filter(|case| case.kind == Kind::Propose)
        .filter_map(|case| {
            let text = String::from_utf8(case.command.clone()).ok()?;
            text.split_whitespace().nth(1).map(str::to_string)
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Send one command as a client would; the rendered result or the error
/// message (from encode, apply or query). A trap or a host error fails the
/// test: conformance means bad input is an ordinary error.
async fn run(client: &mut Client, kind: Kind, command: &[u8]) -> Result<String, String> {
    let encode_error = |error: ClientError| match error {
        ClientError::Rpc(status) if status.code() == tonic::Code::InvalidArgument => {
            let message = status.message();
            Err(message
                .strip_prefix("cannot encode the command: ")
                .unwrap_or(message)
                .to_string())
        }
        other => panic!("request failed: {other}"),
    };
    match kind {
        Kind::Propose | Kind::RawPropose => {
            let command = if kind == Kind::Propose {
                propose_request::Command::Text(String::from_utf8(command.to_vec()).unwrap())
            } else {
                propose_request::Command::Entry(command.to_vec())
            };
            let response = match client
                .propose(ProposeRequest {
                    command: Some(command),
                    frees_space: false,
                    ..Default::default()
                })
                .await
            {
                Ok(response) => response,
                Err(error) => return encode_error(error),
            };
            match response.outcome {
                Some(propose_response::Outcome::Ok(_)) => Ok(response.rendered().into_owned()),
                Some(propose_response::Outcome::PluginError(message)) => Err(message),
                other => panic!("expected a result or a plugin error, got {other:?}"),
            }
        }
        Kind::Query | Kind::RawQuery => {
            let request = if kind == Kind::Query {
                query_request::Request::Text(String::from_utf8(command.to_vec()).unwrap())
            } else {
                query_request::Request::Bytes(command.to_vec())
            };
            let response = match client
                .query(QueryRequest {
                    request: Some(request),
                    consistency: Consistency::Linearizable as i32,
                })
                .await
            {
                Ok(response) => response,
                Err(error) => return encode_error(error),
            };
            match response.outcome {
                Some(query_response::Outcome::Ok(_)) => Ok(response.rendered().into_owned()),
                Some(query_response::Outcome::PluginError(message)) => Err(message),
                other => panic!("expected a result or a plugin error, got {other:?}"),
            }
        }
    }
}

/// `get` of every key and `len`, read from one node's local state.
async fn state_of(addr: &str, keys: &[String]) -> BTreeMap<String, String> {
    let mut client = Client::connect(addr, CLIENT_TIMEOUT).await.unwrap();
    let mut state = BTreeMap::new();
    for text in keys.iter().map(|key| format!("get {key}")).chain(["len".to_string()]) {
        let response = client.query_text(&text, Consistency::Stale).await.unwrap();
        let Some(query_response::Outcome::Ok(_)) = response.outcome else {
            panic!("{text:?} on {addr}: {:?}", response.outcome);
        };
        state.insert(text, response.rendered().into_owned());
    }
    state
}

/// Wait until every node has applied what the leader has, then return each
/// node's state; panics unless they are all the same.
fn replicas_agree(cluster: &Cluster, keys: &[String]) -> BTreeMap<String, String> {
    let leader = cluster.leader();
    let applied = cluster.node(leader).status()["applied_index"].as_u64().unwrap();
    let mut states = Vec::new();
    for (id, node) in &cluster.nodes {
        cluster.wait_applied(*id, applied);
        states.push((*id, block_on(state_of(&node.addr, keys))));
    }
    let (first_id, first) = &states[0];
    for (id, state) in &states[1..] {
        assert_eq!(state, first, "node {id} and node {first_id} differ");
    }
    first.clone()
}

/// The whole conformance run for one plugin.
fn conformance(language: &str, name: &str) {
    let plugins = tempfile::tempdir().unwrap();
    let plugin = write_plugin(plugins.path(), name);
    let mut cluster = Cluster::start(3, &["--plugin", plugin.to_str().unwrap()]);
    let leader = cluster.leader();

    // The command language, through the leader.
    let failures = block_on(async {
        let mut client = Client::connect(&cluster.node(leader).addr, CLIENT_TIMEOUT)
            .await
            .unwrap();
        let mut failures = Vec::new();
        let cases = cases();
        for case in &cases {
            let got = run(&mut client, case.kind, &case.command).await;
            if got != case.expected {
                failures.push(format!("  kv.cases:{}: {}\n      got: {got:?}", case.line, case.source));
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{language} ({name}) failed {} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // A large value: interpreted plugins spend hundreds of fuel units per
    // byte in encode, apply and render, and must still fit their budgets.
    let huge = "é".repeat(100_000);
    block_on(async {
        let mut client = Client::connect(&cluster.node(leader).addr, CLIENT_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(
            run(&mut client, Kind::Propose, format!("set huge {huge}").as_bytes()).await,
            Ok("OK".into())
        );
        assert!(
            run(&mut client, Kind::Query, b"get huge").await == Ok(huge.clone()),
            "get huge"
        );
    });

    // Every replica ends in the same state.
    let mut keys = case_keys();
    keys.push("huge".into());
    let state = replicas_agree(&cluster, &keys);
    assert_eq!(state["len"], "14", "{state:?}");

    // Snapshot, restart, restore: a follower comes back from its own
    // snapshot (the plugin's restore() of its own snapshot()) with the same state.
    let follower = cluster.followers()[0];
    let snapshot = cli(&["snapshot", "--addr", &cluster.node(follower).addr]);
    assert!(snapshot.status.success(), "snapshot failed: {}", stderr(&snapshot));
    cluster.kill(follower);
    cluster.restart(follower);
    cluster.node(follower).wait_ready();
    let log = cluster.node(follower).log_text();
    assert!(
        log.contains("restored"),
        "node {follower} did not restore a snapshot:\n{log}"
    );
    assert_eq!(replicas_agree(&cluster, &keys), state);
}

#[test]
fn the_rust_kv_passes_the_conformance_suite() {
    conformance("Rust", "kv");
}

#[test]
fn the_typescript_kv_passes_the_conformance_suite() {
    conformance("TypeScript", "kv-ts");
}

#[test]
fn the_python_kv_passes_the_conformance_suite() {
    conformance("Python", "kv-py");
}

#[test]
fn the_c_kv_passes_the_conformance_suite() {
    conformance("C", "kv-c");
}

/// The kv plugins here export ABI 0.2.0; kv-v1 is kv through 0.1.0
/// (whole-state snapshot and restore), which the host still runs.
#[test]
fn the_rust_kv_through_abi_0_1_passes_the_conformance_suite() {
    conformance("Rust-through-ABI-0.1.0", "kv-v1");
}

#[test]
fn a_cluster_hot_swaps_its_kv_through_every_language_and_back_keeping_every_key() {
    let cluster = Cluster::start(3, &[]);
    let leader_addr = cluster.node(cluster.leader()).addr.clone();

    // State the Rust kv builds: plain, unicode, counters and lists.
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    block_on(async {
        let mut client = Client::connect(&leader_addr, CLIENT_TIMEOUT).await.unwrap();
        for i in 0..200 {
            let (key, value) = (format!("k{i:03}"), format!("v{i}-ünï-🦀"));
            ok(client.propose_text(&format!("set {key} {value}")).await);
            expected.insert(key, value);
        }
        for i in 0..10 {
            ok(client.propose_text("incr counter 7").await);
            ok(client.propose_text(&format!("append list x{i}")).await);
        }
    });
    expected.insert("counter".into(), "70".into());
    expected.insert(
        "list".into(),
        (0..10).map(|i| format!("x{i}")).collect::<Vec<_>>().join(" "),
    );

    let plugins = tempfile::tempdir().unwrap();
    for (language, name) in [
        ("TypeScript", "kv-ts"),
        ("Python", "kv-py"),
        ("C", "kv-c"),
        ("Rust-through-ABI-0.1.0", "kv-v1"),
        ("Rust", "kv"),
    ] {
        // Compiled ahead, so the swap does not wait on every node compiling.
        let wasm = std::fs::read(write_plugin(plugins.path(), name)).unwrap();
        let sha = sha256_hex(&wasm);
        block_on(async {
            let mut client = Client::connect(&leader_addr, CLIENT_TIMEOUT).await.unwrap();
            client
                .swap_plugin(wasm)
                .await
                .unwrap_or_else(|e| panic!("swap to {language} failed: {e}"));
        });
        wait_until(START_DEADLINE, &format!("every node to run {language}"), || {
            cluster
                .nodes
                .values()
                .all(|node| node.try_status().is_some_and(|s| s["plugin_sha256"] == sha))
        });

        // Every key made so far, on every replica, read by the new plugin.
        let keys: Vec<String> = expected.keys().cloned().collect();
        let state = replicas_agree(&cluster, &keys);
        for (key, value) in &expected {
            assert_eq!(
                state[&format!("get {key}")],
                *value,
                "{key} after the swap to {language}"
            );
        }
        assert_eq!(
            state["len"],
            expected.len().to_string(),
            "len after the swap to {language}"
        );

        // And the new plugin writes in the same language.
        block_on(async {
            let mut client = Client::connect(&leader_addr, CLIENT_TIMEOUT).await.unwrap();
            ok(client.propose_text(&format!("set written-by-{name} {language}")).await);
            let response = client.propose_text("incr counter 1").await.unwrap();
            assert_eq!(
                response.rendered(),
                (expected["counter"].parse::<i64>().unwrap() + 1).to_string()
            );
        });
        expected.insert(format!("written-by-{name}"), language.to_string());
        let next = expected["counter"].parse::<i64>().unwrap() + 1;
        expected.insert("counter".into(), next.to_string());
    }
}

#[test]
fn clocks_and_randomness_are_the_same_on_every_replica_even_after_a_restart() {
    let plugins = tempfile::tempdir().unwrap();
    let plugin = write_plugin(plugins.path(), "stamp-py");
    let mut cluster = Cluster::start(3, &["--plugin", plugin.to_str().unwrap()]);
    let follower = cluster.followers()[0];
    let stamp = |cluster: &Cluster, range: std::ops::Range<u32>| {
        let addr = cluster.node(cluster.leader()).addr.clone();
        block_on(async {
            let mut client = Client::connect(&addr, CLIENT_TIMEOUT).await.unwrap();
            for i in range {
                ok(client.propose_text(&format!("stamp s{i}")).await);
            }
        })
    };

    stamp(&cluster, 0..5);
    // The follower restarts from a snapshot, so it replays later entries on
    // a fresh instance while the others keep theirs.
    let snapshot = cli(&["snapshot", "--addr", &cluster.node(follower).addr]);
    assert!(snapshot.status.success(), "snapshot failed: {}", stderr(&snapshot));
    cluster.kill(follower);
    stamp(&cluster, 5..10);
    cluster.restart(follower);
    cluster.node(follower).wait_ready();
    stamp(&cluster, 10..15);

    let keys: Vec<String> = (0..15).map(|i| format!("s{i}")).collect();
    let state = replicas_agree(&cluster, &keys);
    // The values are real readings: each entry saw its own time and numbers.
    let values: Vec<&String> = keys.iter().map(|key| &state[&format!("get {key}")]).collect();
    for value in &values {
        assert_eq!(
            value.split(':').count(),
            4,
            "time:monotonic:random:urandom, got {value}"
        );
    }
    let mut distinct = values.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), values.len(), "every stamp differs: {values:?}");
}

fn ok(response: Result<raftify_host::proto::ProposeResponse, ClientError>) {
    let response = response.unwrap_or_else(|e| panic!("propose failed: {e}"));
    assert!(
        matches!(response.outcome, Some(propose_response::Outcome::Ok(_))),
        "{:?}",
        response.outcome
    );
}
