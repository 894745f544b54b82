//! The trust boundary, tried as an outsider who can reach a node's port and
//! speaks `proto/raftify.proto` and raft-rs's messages: every forged input
//! is refused, no node stops, the replicas stay identical and the cluster
//! stays writable.

mod support;

use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Entry, Message, MessageType};
use raftify_host::proto::peer_client::PeerClient;
use raftify_host::proto::{RaftBatch, SnapshotChunk};
use support::*;

/// What a forger reads off `status`: the cluster id, the leader, its term
/// and log.
struct Target {
    cluster_id: u64,
    leader: u64,
    term: u64,
    last_index: u64,
}

fn target(node: &Node) -> Target {
    let status = node.status();
    Target {
        cluster_id: u64::from_str_radix(status["cluster_id"].as_str().unwrap(), 16).unwrap(),
        leader: status["leader_id"].as_u64().unwrap(),
        term: status["term"].as_u64().unwrap(),
        last_index: status["last_index"].as_u64().unwrap(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn peer(addr: &str) -> PeerClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the node's peer service");
    PeerClient::new(channel)
}

/// Send one batch over `Peer.Stream`; the node's answer once the stream ends.
fn send(addr: &str, cluster_id: u64, from: u64, messages: &[Message]) -> Result<u64, tonic::Status> {
    send_batches(
        addr,
        vec![RaftBatch {
            messages: messages.iter().map(|m| m.write_to_bytes().unwrap()).collect(),
            cluster_id,
            from,
            no_space: false,
            no_plugin_memory: false,
            plugins: Vec::new(),
            cannot_apply: false,
            epoch_want: 0,
            epoch_digest: None,
        }],
    )
}

/// Send batches over one `Peer.Stream`.
fn send_batches(addr: &str, batches: Vec<RaftBatch>) -> Result<u64, tonic::Status> {
    runtime().block_on(async {
        let mut client = peer(addr).await;
        let call = client.stream(tokio_stream::iter(batches));
        match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(answer) => answer.map(|r| r.into_inner().received),
            Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 10 s")),
        }
    })
}

fn message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

/// The refusal counters a node reports, by reason.
fn refused(node: &Node) -> std::collections::BTreeMap<String, u64> {
    let status = node.status();
    status["refused"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect())
        .unwrap_or_default()
}

/// Every node answers, agrees on the leader, and holds the same value for
/// each key (stale reads: each node's own state).
fn assert_consistent(cluster: &Cluster, keys: &[&str]) {
    let leader = cluster.leader();
    for key in keys {
        let values: Vec<String> = cluster
            .nodes
            .keys()
            .map(|id| cluster.stale(*id, &format!("get {key}")))
            .collect();
        assert!(
            values.iter().all(|v| *v == values[0]),
            "replicas differ on {key}: {values:?} (leader {leader})"
        );
    }
}

#[test]
fn forged_raft_messages_are_refused_and_no_node_stops() {
    let cluster = Cluster::start(3, &[]);
    let leader_id = cluster.leader();
    let leader = cluster.node(leader_id);
    leader.propose("set before 1").unwrap();
    let follower_id = cluster.followers()[0];
    let follower = cluster.node(follower_id);
    cluster.wait_applied(follower_id, target(leader).last_index);
    let t = target(follower);
    let other = (1..=3).find(|id| *id != leader_id && *id != follower_id).unwrap();

    let injected = raftify_host::envelope::command(b"set injected evil");
    let mut forgeries: Vec<(&str, Message)> = Vec::new();
    // A term that would overflow at the next election: raft-rs panicked on
    // it and on every restart after.
    let mut m = message(MessageType::MsgHeartbeat, t.leader, follower_id, u64::MAX);
    m.commit = 1;
    forgeries.push(("term u64::MAX", m));
    // A commit index past the follower's log.
    let mut m = message(MessageType::MsgHeartbeat, t.leader, follower_id, t.term);
    m.commit = t.last_index + 1_000;
    forgeries.push(("commit beyond the log", m));
    // An append from a node that is not the term's leader.
    let mut m = message(MessageType::MsgAppend, other, follower_id, t.term);
    m.index = t.last_index;
    m.log_term = t.term;
    m.set_entries(vec![entry(t.last_index + 1, t.term, &injected)].into());
    forgeries.push(("append from a non-leader", m));
    // Entries that are not contiguous.
    let mut m = message(MessageType::MsgAppend, t.leader, follower_id, t.term);
    m.index = t.last_index;
    m.log_term = t.term;
    m.set_entries(
        vec![
            entry(t.last_index + 1, t.term, b""),
            entry(t.last_index + 3, t.term, b""),
        ]
        .into(),
    );
    forgeries.push(("non-contiguous append", m));
    // Entries whose term goes past the message's.
    let mut m = message(MessageType::MsgAppend, t.leader, follower_id, t.term);
    m.index = t.last_index;
    m.log_term = t.term;
    m.set_entries(vec![entry(t.last_index + 1, t.term + 5, &injected)].into());
    forgeries.push(("entries from a future term", m));
    // A made-up node campaigning and heartbeating at a higher term.
    forgeries.push((
        "heartbeat from node 99",
        message(MessageType::MsgHeartbeat, 99, follower_id, t.term + 10),
    ));
    forgeries.push((
        "vote request from node 99",
        message(MessageType::MsgRequestVote, 99, follower_id, t.term + 10),
    ));
    // A snapshot on the message stream.
    forgeries.push((
        "snapshot on the stream",
        message(MessageType::MsgSnapshot, t.leader, follower_id, t.term),
    ));
    // Local-only messages: a forced election, a remote proposal.
    forgeries.push((
        "remote MsgHup",
        message(MessageType::MsgHup, t.leader, follower_id, t.term),
    ));
    let mut m = message(MessageType::MsgPropose, t.leader, follower_id, t.term);
    m.set_entries(vec![entry(0, 0, &injected)].into());
    forgeries.push(("remote MsgPropose", m));
    // Addressed to someone else.
    forgeries.push((
        "addressed to another node",
        message(MessageType::MsgHeartbeat, t.leader, other, t.term),
    ));
    for (what, forged) in &forgeries {
        let sent = send(&follower.addr, t.cluster_id, forged.from, std::slice::from_ref(forged));
        assert!(sent.is_ok(), "{what}: the stream itself should be taken: {sent:?}");
        assert!(
            follower.try_status().is_some(),
            "{what} stopped the follower; log:\n{}",
            follower.log_text()
        );
    }
    // A read-index request without its context entry panicked the leader
    // (a follower forwards them with term 0).
    let lt = target(leader);
    let forged = message(MessageType::MsgReadIndex, follower_id, leader_id, 0);
    send(&leader.addr, lt.cluster_id, follower_id, &[forged]).unwrap();
    // A vote request at term 0 skips raft-rs's term checks; granting it
    // hit `fatal!` ("term should be set").
    let mut forged = message(MessageType::MsgRequestVote, leader_id, follower_id, 0);
    forged.index = 1 << 40;
    forged.log_term = 1 << 40;
    send(&follower.addr, t.cluster_id, leader_id, &[forged]).unwrap();
    // An append with log_term 0 past the log made raft-rs commit past it.
    let mut forged = message(MessageType::MsgAppend, t.leader, follower_id, t.term + 1);
    forged.index = t.last_index + 1;
    forged.commit = t.last_index + 1;
    send(&follower.addr, t.cluster_id, t.leader, &[forged]).unwrap();
    // A leader-transfer order from outside.
    let forged = message(MessageType::MsgTransferLeader, follower_id, leader_id, lt.term);
    send(&leader.addr, lt.cluster_id, follower_id, &[forged]).unwrap();
    // A batch whose messages claim another sender than the batch.
    let forged = message(MessageType::MsgHeartbeat, t.leader, follower_id, t.term);
    send(&follower.addr, t.cluster_id, other, &[forged]).unwrap();

    // Another cluster's batches are refused whole.
    let wrong = send(
        &follower.addr,
        t.cluster_id ^ 1,
        t.leader,
        &[message(MessageType::MsgHeartbeat, t.leader, follower_id, t.term)],
    );
    assert_eq!(wrong.unwrap_err().code(), tonic::Code::PermissionDenied);

    // Nothing got through: every node is up, the term did not jump, the
    // forged write is nowhere, and the refusals are counted by reason.
    for (id, node) in &cluster.nodes {
        assert!(
            node.try_status().is_some(),
            "node {id} stopped; log:\n{}",
            node.log_text()
        );
    }
    let after = target(follower);
    assert!(
        after.term < t.term + 10,
        "the term jumped from {} to {}",
        t.term,
        after.term
    );
    let counts = refused(follower);
    for reason in [
        "overflow",
        "beyond_log",
        "not_the_leader",
        "bad_entries",
        "not_a_member",
        "snapshot_out_of_band",
        "local_only",
        "addressing",
        "other_cluster",
        "bad_term",
    ] {
        assert!(
            counts.get(reason).copied().unwrap_or(0) > 0,
            "no {reason} refusal counted: {counts:?}"
        );
    }
    let counts = refused(leader);
    assert!(counts.get("bad_read_index").copied().unwrap_or(0) > 0, "{counts:?}");
    assert!(counts.get("local_only").copied().unwrap_or(0) > 0, "{counts:?}");

    // "Out of space" claimed for ids that are not members (thousands of
    // them): no alarm, and the leader's memory for such reports is bounded.
    let leader_addr = cluster.node(cluster.leader()).addr.clone();
    let forged = (1000..3000)
        .map(|from| RaftBatch {
            messages: Vec::new(),
            cluster_id: t.cluster_id,
            from,
            no_space: true,
            no_plugin_memory: true,
            // Readiness for a swap, too: bounded, and never a swap by itself.
            plugins: vec![raftify_host::proto::PluginState {
                sha256: vec![7; 32],
                state: 1,
                error: String::new(),
            }],
            cannot_apply: true,
            // A want past the log (an epoch per tick, if honoured) and a
            // digest of the wrong length.
            epoch_want: u64::MAX,
            epoch_digest: Some(raftify_host::proto::EpochDigest {
                index: 1,
                sha256: vec![1; 7],
            }),
        })
        .collect();
    send_batches(&leader_addr, forged).unwrap();
    let status = cluster.node(cluster.leader()).status();
    assert_eq!(status["space_alarms"], serde_json::json!([]), "{status}");
    assert_eq!(status["epoch"]["index"], 0, "no epoch for strangers' wants: {status}");

    // The cluster is writable and its replicas agree.
    for i in 0..20 {
        cluster
            .node(cluster.leader())
            .propose(&format!("set after{i} {i}"))
            .unwrap();
    }
    let last = target(cluster.node(cluster.leader())).last_index;
    for id in [1, 2, 3] {
        cluster.wait_applied(id, last);
    }
    assert_eq!(cluster.stale(follower_id, "get injected"), "(nil)");
    assert_consistent(&cluster, &["before", "after0", "after19", "injected"]);
}

/// Stream a snapshot to `addr`: a header message, an announced size and
/// the chunks given. The node's answer.
async fn push_snapshot(
    addr: &str,
    header: Message,
    cluster_id: u64,
    total: u64,
    chunks: Vec<Vec<u8>>,
) -> Result<(), tonic::Status> {
    let mut client = peer(addr).await;
    let first = SnapshotChunk {
        message: header.write_to_bytes().unwrap(),
        total_bytes: total,
        data: Vec::new(),
        cluster_id,
    };
    let rest = chunks.into_iter().map(|data| SnapshotChunk {
        data,
        ..Default::default()
    });
    let stream = tokio_stream::iter(std::iter::once(first).chain(rest));
    client.install_snapshot(stream).await.map(|_| ())
}

fn snapshot_message(t: &Target, from: u64, to: u64) -> Message {
    let mut m = message(MessageType::MsgSnapshot, from, to, t.term);
    let meta = m.mut_snapshot().mut_metadata();
    meta.index = t.last_index + 10;
    meta.term = t.term;
    meta.mut_conf_state().voters = vec![1, 2, 3];
    m
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn forged_and_oversized_snapshots_are_refused_with_memory_held_to_a_chunk() {
    let cluster = Cluster::start(3, &[]);
    let leader_id = cluster.leader();
    cluster.node(leader_id).propose("set before 1").unwrap();
    let follower_id = cluster.followers()[0];
    let follower = cluster.node(follower_id);
    let t = target(follower);
    let other = (1..=3).find(|id| *id != leader_id && *id != follower_id).unwrap();
    let rt = runtime();

    // Push a snapshot that must be refused; the node's answer.
    let refusal = |header: Message, cluster_id: u64, total: u64, chunks: Vec<Vec<u8>>| {
        rt.block_on(push_snapshot(&follower.addr, header, cluster_id, total, chunks))
            .unwrap_err()
    };
    // Garbage data "from the leader": refused after the transfer, the node stays.
    let garbage = vec![0xAB; 64 << 10];
    let header = snapshot_message(&t, leader_id, follower_id);
    let error = refusal(header, t.cluster_id, garbage.len() as u64, vec![garbage]);
    assert!(error.message().contains("not a raftify snapshot"), "{error:?}");
    // From a node that is not the leader: refused before any data.
    let error = refusal(
        snapshot_message(&t, other, follower_id),
        t.cluster_id,
        10,
        vec![vec![0; 10]],
    );
    assert!(error.message().contains("not_the_leader"), "{error:?}");
    // Another cluster: refused.
    let header = snapshot_message(&t, leader_id, follower_id);
    let error = refusal(header.clone(), t.cluster_id ^ 1, 10, vec![]);
    assert_eq!(error.code(), tonic::Code::PermissionDenied);
    // Longer than announced, and cut short: refused.
    let error = refusal(header.clone(), t.cluster_id, 4, vec![vec![0; 8]]);
    assert!(error.message().contains("longer than"), "{error:?}");
    let error = refusal(header, t.cluster_id, 100, vec![vec![0; 8]]);
    assert!(error.message().contains("ended after 8 of 100"), "{error:?}");

    // Three pushes announcing 8 GiB each, held open while sending 1 MiB
    // chunks: one is taken at a time, and memory stays near where it was.
    let before = rss_kib(follower.pid());
    let (addr, cluster_id) = (follower.addr.clone(), t.cluster_id);
    let header = snapshot_message(&t, leader_id, follower_id);
    let outcomes = rt.block_on(async move {
        let pushes = (0..3).map(|_| {
            let (addr, header) = (addr.clone(), header.clone());
            async move {
                let mut client = peer(&addr).await;
                let first = SnapshotChunk {
                    message: header.write_to_bytes().unwrap(),
                    total_bytes: 8 << 30,
                    data: Vec::new(),
                    cluster_id,
                };
                // 64 MiB in 1 MiB chunks, then the stream is cut.
                let rest = (0..64).map(|_| SnapshotChunk {
                    data: vec![7; 1 << 20],
                    ..Default::default()
                });
                let stream = tokio_stream::iter(std::iter::once(first).chain(rest));
                client.install_snapshot(stream).await.map(|_| ()).unwrap_err()
            }
        });
        futures::future::join_all(pushes).await
    });
    let busy = outcomes
        .iter()
        .filter(|s| s.code() == tonic::Code::ResourceExhausted)
        .count();
    assert!(
        busy >= 1,
        "no push was turned away while another was received: {outcomes:?}"
    );
    let after = rss_kib(follower.pid());
    println!("follower RSS before {before} KiB, after three 8 GiB pushes {after} KiB");
    assert!(after < before + 48 * 1024, "RSS grew from {before} KiB to {after} KiB");
    assert!(!follower.data_dir.join("incoming/snapshot.partial").exists());

    // Well-formed snapshots that do not check out: metadata raft-rs cannot
    // restore, members that are not the configuration, a plugin nobody has.
    let mut no_voters = snapshot_message(&t, leader_id, follower_id);
    no_voters.mut_snapshot().mut_metadata().mut_conf_state().voters.clear();
    no_voters.mut_snapshot().mut_metadata().mut_conf_state().learners = vec![follower_id];
    let error = refusal(no_voters, t.cluster_id, 1, vec![vec![0]]);
    assert!(error.message().contains("snapshot_out_of_band"), "{error:?}");
    let members: Vec<(u64, String)> = cluster.addrs.iter().map(|(id, a)| (*id, a.clone())).collect();
    for (what, header) in [
        (
            "are not its configuration",
            raftify_host::snapshot::SnapshotHeader {
                plugin_sha256: [1; 32],
                members: vec![(u64::MAX, "127.0.0.1:1".into())],
                alarms: vec![],
                limits: None,
                ..Default::default()
            },
        ),
        (
            "cannot get",
            raftify_host::snapshot::SnapshotHeader {
                plugin_sha256: [1; 32],
                members: members.clone(),
                alarms: vec![],
                limits: None,
                ..Default::default()
            },
        ),
    ] {
        let data = raftify_host::snapshot::encode(&header, b"state");
        let message = snapshot_message(&t, leader_id, follower_id);
        let error = refusal(message, t.cluster_id, data.len() as u64, vec![data]);
        assert!(error.message().contains(what), "{what}: {error:?}");
    }

    // Everyone is up, the cluster is writable and consistent.
    for (id, node) in &cluster.nodes {
        assert!(
            node.try_status().is_some(),
            "node {id} stopped; log:\n{}",
            node.log_text()
        );
    }
    assert!(refused(follower).get("bad_snapshot").copied().unwrap_or(0) >= 3);
    cluster.node(cluster.leader()).propose("set after 1").unwrap();
    let last = target(cluster.node(cluster.leader())).last_index;
    for id in [1, 2, 3] {
        cluster.wait_applied(id, last);
    }
    assert_consistent(&cluster, &["before", "after"]);
}

#[test]
fn joins_at_dead_or_bad_addresses_cannot_cost_the_quorum() {
    let mut cluster = Cluster::start(3, &[]);
    let leader_id = cluster.leader();
    let addr = cluster.node(leader_id).addr.clone();
    // Bad addresses and ids are refused outright.
    for bad in ["[::1]:1:2", "evil host:1", "evil\nhost:1", "h:0"] {
        let out = cli(&["member", "add", bad, "--addr", &addr]);
        assert!(!out.status.success(), "{bad:?} was accepted");
    }
    for bad_id in [u64::MAX.to_string(), "1000".to_string(), "2".to_string()] {
        let out = cli(&["member", "add", &free_addr(), "--id", &bad_id, "--addr", &addr]);
        assert!(!out.status.success(), "id {bad_id} was accepted: {}", stdout(&out));
    }
    // Three joins at addresses where nothing listens, on a young cluster
    // whose log is shorter than the promotion lag.
    let mut dead = Vec::new();
    for _ in 0..3 {
        let out = cli(&["member", "add", &free_addr(), "--addr", &addr]);
        assert!(out.status.success(), "{}", stderr(&out));
        let id: u64 = stdout(&out).parse().unwrap();
        assert!(id >= 4, "got id {id}");
        dead.push(id);
    }
    // Well past an election timeout, they are still learners.
    std::thread::sleep(Duration::from_secs(3));
    let members = cluster.node(cluster.leader()).status()["members"].clone();
    for member in members.as_array().unwrap() {
        let id = member["id"].as_u64().unwrap();
        if dead.contains(&id) {
            assert_eq!(member["role"], "learner", "dead node {id} was promoted: {members}");
        }
    }
    // Losing one real voter leaves a quorum.
    let victim = cluster.followers()[0];
    cluster.kill(victim);
    let leader = cluster.leader();
    cluster.node(leader).propose("set still 1").unwrap();
}

/// A CA in `dir` with a certificate for each name, valid for 127.0.0.1.
fn certificates(dir: &std::path::Path, names: &[&str]) {
    let d = dir.to_str().unwrap();
    let out = cli(&["tls", "init", d]);
    assert!(out.status.success(), "tls init: {}", stderr(&out));
    for name in names {
        let out = cli(&["tls", "issue", d, name, "--san", "127.0.0.1", "--san", "localhost"]);
        assert!(out.status.success(), "tls issue {name}: {}", stderr(&out));
    }
}

fn path(dir: &std::path::Path, file: &str) -> String {
    dir.join(file).to_str().unwrap().to_string()
}

/// Start `n` nodes serving mutual TLS with their own certificates (and
/// `extra` flags); CLI calls reach them with `client_flags`.
fn tls_cluster(
    dir: &std::path::Path,
    certs: &std::path::Path,
    n: u64,
    extra: &[&str],
    client_flags: &[String],
) -> Vec<Node> {
    let addrs: Vec<String> = (1..=n).map(|_| free_addr()).collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let nodes: Vec<Node> = (1..=n)
        .map(|id| {
            let (cert, key) = (
                path(certs, &format!("n{id}.pem")),
                path(certs, &format!("n{id}-key.pem")),
            );
            let id_text = id.to_string();
            let ca = path(certs, "ca.pem");
            let mut flags = vec![
                "--id",
                &id_text,
                "--peers",
                &peers,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ];
            flags.extend(extra);
            let mut node = Node::spawn(&dir.join(format!("n{id}")), &addrs[id as usize - 1], &flags);
            node.client_flags = client_flags.to_vec();
            node
        })
        .collect();
    for node in &nodes {
        node.wait_ready();
    }
    nodes
}

#[test]
fn a_tls_cluster_takes_only_mutual_tls_peers_and_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let rogue = dir.path().join("rogue");
    certificates(&certs, &["n1", "n2", "n3", "n4"]);
    certificates(&rogue, &["r1"]);
    let ca = path(&certs, "ca.pem");
    let client = vec!["--tls-ca".to_string(), ca.clone()];
    let nodes = tls_cluster(dir.path(), &certs, 3, &[], &client);

    // Over TLS the cluster replicates, follows the leader and answers.
    nodes[1].propose("set secure 1").unwrap();
    assert_eq!(nodes[2].query("get secure").unwrap(), "1");
    let status = nodes[0].status();
    assert_eq!(status["members"].as_array().unwrap().len(), 3);

    // Plaintext against a TLS node: one clear line, non-zero exit.
    let out = cli(&["status", "--addr", &nodes[0].addr, "--timeout-ms", "3000"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    // A client trusting another CA refuses the node's certificate.
    let out = cli(&["status", "--addr", &nodes[0].addr, "--tls-ca", &path(&rogue, "ca.pem")]);
    assert!(!out.status.success());
    assert!(stderr(&out).to_lowercase().contains("certificate"), "{}", stderr(&out));
    // TLS against a plaintext node: refused with a hint.
    let plain = Node::start(&dir.path().join("plain"), &free_addr(), &[]);
    let out = cli(&["status", "--addr", &plain.addr, "--tls-ca", &ca]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));

    // The peer service wants a client certificate from this CA.
    let rt = runtime();
    let addr = nodes[0].addr.clone();
    let fetch = |identity: Option<(&std::path::Path, &str)>| {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&ca).unwrap()));
        if let Some((dir, name)) = identity {
            let cert = std::fs::read(path(dir, &format!("{name}.pem"))).unwrap();
            let key = std::fs::read(path(dir, &format!("{name}-key.pem"))).unwrap();
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        let addr = addr.clone();
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            PeerClient::new(channel)
                .fetch_plugin(raftify_host::proto::FetchPluginRequest {
                    sha256: vec![0; 32],
                    cluster_id: 0,
                })
                .await
                .map(|_| ())
        })
    };
    assert_eq!(fetch(None).unwrap_err().code(), tonic::Code::Unauthenticated);
    // A certificate from another CA does not get through the handshake.
    assert!(fetch(Some((&rogue, "r1"))).is_err());
    // A member's certificate does (and the plugin is not there: NOT_FOUND
    // means the request got in... and the cluster id 0 is another cluster's).
    assert_eq!(
        fetch(Some((&certs, "n4"))).unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    // A fourth node joins over mutual TLS.
    let joiner_addr = free_addr();
    let (cert, key) = (path(&certs, "n4.pem"), path(&certs, "n4-key.pem"));
    let mut joiner = Node::spawn(
        &dir.path().join("n4"),
        &joiner_addr,
        &[
            "--join",
            &nodes[0].addr,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    joiner.client_flags = client.clone();
    joiner.wait_ready();
    wait_until(START_DEADLINE, "the joiner to catch up", || {
        joiner
            .cli(&["query", "get secure", "--consistency", "stale", "--addr", &joiner_addr])
            .stdout
            .starts_with(b"1")
    });
}

#[test]
fn tokens_with_roles_gate_every_client_rpc_and_never_show() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    certificates(&certs, &["n1", "n2", "ops"]);
    let ca = path(&certs, "ca.pem");
    let (reader, writer, admin) = ("read-token-8f3a", "write-token-2c9d", "admin-token-71be");
    let auth = dir.path().join("auth.toml");
    let mut text = String::new();
    for (name, role, token) in [
        ("dash", "read", reader),
        ("app", "write", writer),
        ("ops", "admin", admin),
    ] {
        text += &format!(
            "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
            raftify_host::auth::sha256_hex(token)
        );
    }
    std::fs::write(&auth, text).unwrap();
    let auth_path = auth.to_str().unwrap().to_string();

    // Without TLS, --auth-file is refused at start.
    let mut refused = Node::spawn(&dir.path().join("plain"), &free_addr(), &["--auth-file", &auth_path]);
    let status = refused.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        refused.log_text().contains("--auth-file needs TLS"),
        "{}",
        refused.log_text()
    );

    let client = vec![
        "--tls-ca".to_string(),
        ca.clone(),
        "--token".to_string(),
        reader.to_string(),
    ];
    let nodes = tls_cluster(dir.path(), &certs, 1, &["--auth-file", &auth_path], &client);
    let node = &nodes[0];
    // Without a certificate, even an admin cannot join a node.
    let out = cli(&[
        "member",
        "add",
        &free_addr(),
        "--addr",
        &node.addr,
        "--tls-ca",
        &ca,
        "--token",
        admin,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("client certificate"), "{}", stderr(&out));
    let addr = node.addr.clone();
    let wasm = dir.path().join("kv.wasm");
    std::fs::write(&wasm, raftify_host::daemon::EMBEDDED_KV).unwrap();
    let wasm = wasm.to_str().unwrap().to_string();
    let spare = free_addr();
    // Every client command, the role it needs, and its arguments.
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("read", vec!["query", "get a"]),
        ("read", vec!["status"]),
        ("read", vec!["members"]),
        ("read", vec!["plugin", "list"]),
        ("write", vec!["propose", "set a 1"]),
        ("admin", vec!["snapshot"]),
        ("admin", vec!["leader", "transfer", "1"]),
        ("admin", vec!["member", "add", &spare]),
        ("admin", vec!["plugin", "swap", &wasm]),
    ];
    let (ops_cert, ops_key) = (path(&certs, "ops.pem"), path(&certs, "ops-key.pem"));
    let run = |token: Option<&str>, args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        // Joining (`member add`) over TLS takes a member's certificate too.
        all.extend([
            "--addr",
            &addr,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &ops_cert,
            "--tls-key",
            &ops_key,
        ]);
        if let Some(token) = token {
            all.extend(["--token", token]);
        }
        cli(&all)
    };
    let rank = |role: &str| ["read", "write", "admin"].iter().position(|r| *r == role).unwrap();
    for (needed, args) in &commands {
        for (held, token) in [("read", reader), ("write", writer), ("admin", admin)] {
            let out = run(Some(token), args);
            if rank(held) >= rank(needed) {
                assert!(out.status.success(), "{held} token, {args:?}: {}", stderr(&out));
            } else {
                assert!(!out.status.success(), "{held} token was let through {args:?}");
                let err = stderr(&out);
                assert!(err.contains(&format!("needs {needed}")), "{args:?}: {err}");
                assert!(err.contains(&format!("has role {held}")), "{args:?}: {err}");
            }
        }
        let none = run(None, args);
        assert!(!none.status.success(), "no token was let through {args:?}");
        assert!(stderr(&none).contains("token is required"), "{}", stderr(&none));
        let wrong = run(Some("not-a-real-token"), args);
        assert!(!wrong.status.success());
        assert!(stderr(&wrong).contains("not valid"), "{}", stderr(&wrong));
    }
    // A refused write changed nothing: `a` holds the admin-era value only.
    assert_eq!(node.query("get a").unwrap(), "1");

    // Joining needs an admin token.
    let (cert, key) = (path(&certs, "n2.pem"), path(&certs, "n2-key.pem"));
    let join_flags = ["--join", &addr, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let mut denied = Node::spawn(&dir.path().join("j1"), &free_addr(), &join_flags);
    let status = denied.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    assert!(denied.log_text().contains("token is required"), "{}", denied.log_text());
    let mut flags = join_flags.to_vec();
    flags.extend(["--token", admin]);
    let mut joined = Node::spawn(&dir.path().join("j2"), &free_addr(), &flags);
    joined.client_flags = client.clone();
    joined.wait_ready();

    // No token appears in any log.
    for log in [node.log_text(), joined.log_text(), denied.log_text()] {
        for token in [reader, writer, admin] {
            assert!(!log.contains(token), "a token is in a log line");
        }
    }
}
