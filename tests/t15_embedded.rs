//! The library API, in process (issue 17, item 1): nodes started with
//! `Node::start` in this test's process, driven through their handles, as
//! a Rust program embedding raftify-host would. No processes, no CLI.

use std::time::Duration;

use raftify_host::{Consistency, ErrorKind, Node, NodeConfig, NodeHandle, PluginFailure};

const DEADLINE: Duration = Duration::from_secs(30);

/// Start nodes 1..=n of a new cluster, each on a free 127.0.0.1 port.
async fn cluster(dir: &std::path::Path, n: u64) -> Vec<Node> {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut config = NodeConfig::new(&addrs[i], dir.join(format!("n{id}"))).unwrap();
        config.id = Some(id);
        config.peers = addrs
            .iter()
            .enumerate()
            .map(|(j, a)| (j as u64 + 1, a.clone()))
            .collect();
        nodes.push(Node::start_on(config, listener).await.unwrap());
    }
    nodes
}

/// Wait until `handle` reports `ok`, or fail after `DEADLINE`.
async fn wait_until(handle: &NodeHandle, what: &str, ok: impl Fn(&raftify_host::NodeStatus) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(status) = handle.status().await
            && ok(&status)
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text(applied: &raftify_host::Applied) -> &str {
    assert!(applied.result.is_ok(), "{applied:?}");
    &applied.text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_in_one_process_propose_read_and_change_their_membership() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let leader_id = nodes[0].handle().wait_for_leader(DEADLINE).await.unwrap();
    let leader = &nodes[leader_id as usize - 1];
    let follower = &nodes[leader_id as usize % 3];

    // Writes on the leader, reads anywhere, linearizable on a follower.
    let applied = leader.handle().propose("set greeting hello").await.unwrap();
    assert_eq!(text(&applied), "OK");
    assert!(applied.index > 0);
    let read = follower
        .handle()
        .query("get greeting", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(text(&read), "hello");
    assert!(read.index >= applied.index);

    // A follower refuses a write and names the leader; nothing is written.
    let refused = follower.handle().propose("set other 1").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::NotLeader, "{refused}");
    assert_eq!(refused.leader_addr(), Some(leader.addr()));
    let len = leader.handle().query("len", Consistency::Linearizable).await.unwrap();
    assert_eq!(text(&len), "1");

    // The plugin's own error is a result, replicated like any other.
    leader.handle().propose("set word abc").await.unwrap();
    let failed = leader.handle().propose("incr word").await.unwrap();
    assert!(matches!(failed.result, Err(PluginFailure::Error(_))), "{failed:?}");
    // A command the codec cannot encode never reaches the log.
    let invalid = leader.handle().propose("frobnicate").await.unwrap_err();
    assert_eq!(invalid.kind(), ErrorKind::Invalid, "{invalid}");

    // Exactly once: a sequence sent again returns its first result, through
    // any handle; a follower's refuses it as any write.
    let session = leader.handle().open_session().await.unwrap();
    let first = leader.handle().propose_in(session, 1, "incr hits").await.unwrap();
    assert_eq!(text(&first), "1");
    let again = leader.handle().propose_in(session, 1, "incr hits").await.unwrap();
    assert_eq!(text(&again), "1", "sequence 1 applied twice");
    assert_eq!(
        text(&leader.handle().propose_in(session, 2, "incr hits").await.unwrap()),
        "2"
    );
    let refused = follower.handle().propose_in(session, 3, "incr hits").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::NotLeader);
    let zero = leader.handle().propose_in(session, 0, "incr hits").await.unwrap_err();
    assert_eq!(zero.kind(), ErrorKind::Invalid, "{zero}");
    let status = leader.handle().status().await.unwrap();
    assert_eq!(status.sessions, 1);

    // A fourth node joins through a follower's address and catches up; the
    // leader removes it again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = NodeConfig::new(&addr, dir.path().join("n4")).unwrap();
    config.join = Some(follower.addr().to_string());
    let fourth = Node::start_on(config, listener).await.unwrap();
    let commit = leader.handle().status().await.unwrap().commit_index;
    wait_until(&fourth.handle(), "the fourth node to catch up", |s| {
        s.applied_index >= commit
    })
    .await;
    let stale = fourth.handle().query("get greeting", Consistency::Stale).await.unwrap();
    assert_eq!(text(&stale), "hello");
    let fourth_id = fourth.handle().status().await.unwrap().id;
    wait_until(&leader.handle(), "four voters", |s| {
        s.members.iter().filter(|m| m.voter).count() == 4
    })
    .await;
    // The promotion shows in `status` once applied; raft takes the next
    // change once it has heard so, a moment later: the handle waits that
    // out itself.
    leader.handle().remove_member(fourth_id).await.unwrap();
    wait_until(&leader.handle(), "three members", |s| s.members.len() == 3).await;
    fourth.stop().await.unwrap();

    // Leadership moves where asked; a snapshot is taken where asked.
    let target_id = leader_id % 3 + 1;
    leader.handle().transfer_leader(target_id).await.unwrap();
    wait_until(&follower.handle(), "the new leader", |s| s.leader_id == target_id).await;
    let index = follower.handle().snapshot().await.unwrap();
    assert!(index >= applied.index);
    assert_eq!(follower.handle().status().await.unwrap().snapshot_index, index);

    for node in nodes {
        node.stop().await.unwrap();
    }
}

/// The handle's watches say what changed without a request: a follower's
/// applied index reaches a write, and its leadership watch names the new
/// leader after the old one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_tell_of_an_applied_write_and_of_a_new_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), 3).await;
    let leader_id = nodes[0].handle().wait_for_leader(DEADLINE).await.unwrap();
    let old = nodes.remove(leader_id as usize - 1);
    let watcher = nodes[0].handle();
    assert!(old.handle().leadership().get().is_leader());
    assert_eq!(watcher.wait_for_leader(DEADLINE).await.unwrap(), leader_id);
    assert!(!watcher.leadership().get().is_leader());

    let written = old.handle().propose("set k v").await.unwrap();
    let mut applied = watcher.applied_index();
    let reached = tokio::time::timeout(DEADLINE, applied.wait_for(|&index| index >= written.index))
        .await
        .expect("the follower applied the write in time")
        .unwrap();
    assert!(reached >= written.index);

    // Held values hold nothing up: the node goes on applying.
    let mut leadership = watcher.leadership();
    let before = leadership.get();
    let more = old.handle().propose("set k w").await.unwrap();
    tokio::time::timeout(DEADLINE, applied.wait_for(|&index| index >= more.index))
        .await
        .expect("the follower applied the second write in time")
        .unwrap();

    old.stop().await.unwrap();
    let new = tokio::time::timeout(
        DEADLINE,
        leadership.wait_for(|l| l.leader_id != 0 && l.leader_id != leader_id),
    )
    .await
    .expect("a new leader within the deadline")
    .unwrap();
    assert!(new.term > before.term, "{new:?} after {before:?}");
    let leader = nodes
        .iter()
        .find(|n| n.handle().leadership().get().id == new.leader_id)
        .unwrap();
    let says = tokio::time::timeout(DEADLINE, leader.handle().leadership().wait_for(|l| l.is_leader()))
        .await
        .expect("the new leader knows it leads")
        .unwrap();
    assert_eq!(says.role, "leader");
    for node in nodes {
        node.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_says_why_and_a_dropped_one_stops() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = NodeConfig::new(&addr, dir.path().join("bad")).unwrap();
    config.plugin = Some(dir.path().join("missing.wasm"));
    let error = Node::start_on(config, listener)
        .await
        .err()
        .expect("a missing plugin fails the start");
    assert!(format!("{error:#}").contains("missing.wasm"), "{error:#}");

    // A one-node cluster leads itself; dropped, it lets go of its port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = NodeConfig::new(&addr, dir.path().join("one")).unwrap();
    let node = Node::start_on(config, listener).await.unwrap();
    assert_eq!(node.handle().wait_for_leader(DEADLINE).await.unwrap(), 1);
    assert_eq!(text(&node.handle().propose("incr n 5").await.unwrap()), "5");
    let handle = node.handle();
    drop(node);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while std::net::TcpListener::bind(&addr).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped node still holds {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its handle outlives it, and says it is gone.
    let gone = handle.propose("incr n").await.unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::Unavailable, "{gone}");
}

/// The program that embeds a node is trusted: on a node that demands a
/// client certificate and a token of every remote client, its handle needs
/// neither, while a remote client without them is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handle_needs_no_certificate_or_token_where_remote_clients_do() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    raftify_host::tls::init(&certs).unwrap();
    let (cert, key) = raftify_host::tls::issue(&certs, "n1", &["127.0.0.1".to_string()]).unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
            raftify_host::auth::sha256_hex("secret")
        ),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = NodeConfig::new(&addr, dir.path().join("n1")).unwrap();
    config.tls = Some(raftify_host::tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: Some(cert),
        key: Some(key),
    });
    config.tls_require_client_cert = true;
    config.auth_file = Some(tokens);
    let node = Node::start_on(config, listener).await.unwrap();
    node.handle().wait_for_leader(DEADLINE).await.unwrap();
    assert_eq!(text(&node.handle().propose("set a 1").await.unwrap()), "OK");
    assert_eq!(
        text(&node.handle().query("get a", Consistency::Linearizable).await.unwrap()),
        "1"
    );

    // A remote client that trusts the CA but has no certificate or token.
    let files = raftify_host::tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: None,
        key: None,
    };
    let dialer =
        raftify_host::dial::Dialer::default().with_tls(raftify_host::tls::client_config(&files, None).unwrap());
    let refused = match raftify_host::client::Client::connect_with(&addr, DEADLINE, &dialer).await {
        Ok(mut client) => client
            .query_text("get a", raftify_host::proto::Consistency::Stale)
            .await
            .err(),
        Err(error) => Some(error),
    };
    assert!(refused.is_some(), "a remote client without credentials was served");
    node.stop().await.unwrap();
}

/// Raft takes one membership change at a time. Two asked for at once on the
/// handle both go through: the second waits out the first (the node says
/// it was not proposed, so sending it again is safe), rather than failing
/// with "another membership change is in progress".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_asked_for_at_once_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), 3).await;
    let leader_id = nodes[0].handle().wait_for_leader(DEADLINE).await.unwrap();
    let leader = nodes[leader_id as usize - 1].handle();
    // Learners at addresses nobody serves: their adds commit on the
    // voters alone (they are never promoted).
    let spare: Vec<String> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        })
        .collect();
    let (a, b) = tokio::join!(leader.add_member(&spare[0], 0), leader.add_member(&spare[1], 0));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a, b);
    wait_until(&leader, "five members", |s| s.members.len() == 5).await;
    let (removed_a, removed_b) = tokio::join!(leader.remove_member(a), leader.remove_member(b));
    removed_a.unwrap();
    removed_b.unwrap();
    wait_until(&leader, "three members", |s| s.members.len() == 3).await;
    for node in nodes {
        node.stop().await.unwrap();
    }
}
