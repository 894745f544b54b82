//! Whole nodes in one process, their peer traffic through the test router
//! (`transport::router`): the daemon's raft loop, apply worker, plugin,
//! LMDB store and Peer service code as in production, with a network the
//! test holds. Leaders are cut off, batches dropped and delayed, a follower
//! caught up by a streamed snapshot, in seconds and without processes or
//! peer sockets. Each node still serves clients on a 127.0.0.1 port.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{Consistency, ErrorKind, Node, NodeHandle, NodeStatus, Session};
use crate::config::NodeConfig;
use crate::transport::router::Router;

/// Bounds every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

struct Cluster {
    _dir: tempfile::TempDir,
    router: Arc<Router>,
    nodes: BTreeMap<u64, Node>,
}

impl Cluster {
    /// Nodes 1..=n of a new cluster on one router, with fast raft ticks
    /// and whatever `tune` sets.
    async fn start(n: u64, seed: u64, tune: impl Fn(&mut NodeConfig)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let router = Router::new(seed);
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            listeners.insert(id, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let peers: BTreeMap<u64, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        let mut nodes = BTreeMap::new();
        for (id, listener) in listeners {
            let mut config = NodeConfig::new(&peers[&id], dir.path().join(format!("n{id}"))).unwrap();
            config.id = Some(id);
            config.peers = peers.clone();
            config.raft.tick_interval_ms = 20;
            tune(&mut config);
            let node = Node::start_routed(config, listener, router.clone()).await.unwrap();
            nodes.insert(id, node);
        }
        Cluster {
            _dir: dir,
            router,
            nodes,
        }
    }

    fn handle(&self, id: u64) -> NodeHandle {
        self.nodes[&id].handle()
    }

    /// Wait until every node in `among` names the same leader, one of them.
    async fn leader(&self, among: &[u64]) -> u64 {
        self.until(&format!("{among:?} to agree on a leader"), async || {
            let mut leaders = Vec::new();
            for id in among {
                leaders.push(self.handle(*id).status().await.ok()?.leader_id);
            }
            (among.contains(&leaders[0]) && leaders.iter().all(|l| *l == leaders[0])).then_some(leaders[0])
        })
        .await
    }

    async fn status(&self, id: u64) -> NodeStatus {
        self.handle(id).status().await.unwrap()
    }

    /// Wait until node `id` has applied `index`.
    async fn applied(&self, id: u64, index: u64) {
        self.until(&format!("node {id} to apply {index}"), async || {
            let status = self.handle(id).status().await.ok()?;
            (status.applied_index >= index).then_some(())
        })
        .await
    }

    /// `text` in `session` at `sequence`, on whichever node leads, again
    /// and again until it is answered (the session makes that safe);
    /// returns the result text and index.
    async fn write(&self, session: Session, sequence: u64, text: &str) -> (String, u64) {
        self.until(&format!("{text:?} to be applied"), async || {
            for id in self.nodes.keys() {
                match self.handle(*id).propose_in(session, sequence, text).await {
                    Ok(applied) => return Some((applied.text, applied.index)),
                    Err(error) if error.kind() == ErrorKind::NotLeader || error.outcome_unknown() => {}
                    Err(error) => panic!("{text:?} on node {id}: {error}"),
                }
            }
            None
        })
        .await
    }

    async fn stale(&self, id: u64, text: &str) -> String {
        self.handle(id).query(text, Consistency::Stale).await.unwrap().text
    }

    /// Poll `check` until it gives a value, for at most `DEADLINE`.
    async fn until<T>(&self, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        for (_, node) in self.nodes {
            node.stop().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_is_replaced_and_catches_up_once_the_network_heals() {
    let cluster = Cluster::start(3, 1, |_| {}).await;
    let old = cluster.leader(&[1, 2, 3]).await;
    let session = cluster.handle(old).open_session().await.unwrap();
    assert_eq!(cluster.write(session, 1, "set before 1").await.0, "OK");

    // Cut off, the old leader cannot reach a quorum: the other two elect
    // one of themselves and go on writing without it.
    cluster.router.cut_off(old);
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
    let new = cluster.leader(&rest).await;
    assert_ne!(new, old);
    let (ok, index) = cluster.write(session, 2, "set during 2").await;
    assert_eq!(ok, "OK");
    assert_eq!(
        cluster.stale(old, "get during").await,
        "(nil)",
        "the cut-off node saw nothing"
    );

    // Healed, it follows the new leader and applies what it missed.
    cluster.router.heal();
    assert_eq!(cluster.leader(&[1, 2, 3]).await, new);
    cluster.applied(old, index).await;
    assert_eq!(cluster.stale(old, "get during").await, "2");
    assert!(cluster.router.lost() > 0, "the cut should have cost batches");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batches_dropped_and_delayed_every_write_applies_once_on_every_node() {
    let cluster = Cluster::start(3, 7, |_| {}).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let session = cluster.handle(leader).open_session().await.unwrap();
    cluster.router.drop_one_in(5);
    cluster.router.delay(Duration::from_millis(2));

    // Writes are retried in their session whatever the network loses: each
    // `incr` counts once.
    let mut last = 0;
    for sequence in 1..=40 {
        let (count, index) = cluster.write(session, sequence, "incr n").await;
        assert_eq!(count, sequence.to_string());
        last = index;
    }
    assert!(cluster.router.lost() > 0, "one batch in five should have been dropped");

    cluster.router.drop_one_in(0);
    for id in 1..=3 {
        cluster.applied(id, last).await;
        assert_eq!(cluster.stale(id, "get n").await, "40", "node {id}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_past_a_compaction_catches_up_by_a_streamed_snapshot() {
    // Small chunks, frequent snapshots and no log kept behind them: a
    // follower that misses 100 entries can only catch up by a snapshot,
    // which the router streams to it in many chunks.
    let cluster = Cluster::start(3, 3, |config| {
        config.snapshot.every_entries = 20;
        config.snapshot.keep_entries = 0;
        config.snapshot.log_percent = 0;
        config.snapshot.chunk_bytes = 1024;
    })
    .await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let session = cluster.handle(leader).open_session().await.unwrap();
    cluster.router.cut_off(follower);
    let mut last = 0;
    for sequence in 1..=100 {
        let text = format!("set key{sequence} {}", "v".repeat(100));
        last = cluster.write(session, sequence, &text).await.1;
    }
    cluster
        .until("the leader to compact its log past the follower", async || {
            let status = cluster.handle(leader).status().await.ok()?;
            (status.first_index > cluster.status(follower).await.last_index + 1).then_some(())
        })
        .await;

    let before = cluster.router.snapshots_delivered();
    cluster.router.heal();
    cluster.applied(follower, last).await;
    assert!(
        cluster.router.snapshots_delivered() > before,
        "no snapshot was delivered"
    );
    assert_eq!(cluster.stale(follower, "get key100").await, "v".repeat(100));
    assert_eq!(cluster.stale(follower, "len").await, "100");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_a_cut_off_node_fails_at_its_deadline_saying_nothing_was_written() {
    let cluster = Cluster::start(3, 5, |config| config.client.request_timeout_ms = 300).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let follower = if leader == 1 { 2 } else { 1 };
    cluster.router.cut_off(follower);
    let error = cluster
        .handle(follower)
        .query("get x", Consistency::Linearizable)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("wrote nothing"), "{error}");
    cluster.router.heal();
    cluster.leader(&[1, 2, 3]).await;
    let read = cluster.handle(follower).query("get x", Consistency::Linearizable).await;
    assert_eq!(read.unwrap().text, "(nil)", "served again once healed");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_peer_batch_says_is_checked_before_raft_sees_it() {
    use protobuf::Message as _;
    let cluster = Cluster::start(3, 9, |_| {}).await;
    let leader = cluster.leader(&[1, 2, 3]).await;
    let target = if leader == 1 { 2 } else { 1 };
    let status = cluster.status(target).await;
    let peer = cluster.handle(target);
    let heartbeat = |from: u64| {
        let mut message = raft::prelude::Message::default();
        message.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
        (message.from, message.to, message.term) = (from, target, status.term + 1);
        message.write_to_bytes().unwrap()
    };
    let batch = |from: u64, cluster_id: u64, messages: Vec<Vec<u8>>| crate::proto::RaftBatch {
        messages,
        cluster_id,
        from,
        ..Default::default()
    };
    let sender = 6 - leader - target;

    // A message in another sender's name is dropped and counted; raft
    // never sees it (the node's term does not move).
    let forged = batch(sender, status.cluster_id, vec![heartbeat(leader)]);
    assert_eq!(peer.services().receive_batch(forged).await.unwrap(), 1);
    // Another cluster's batch and undecodable bytes are refused outright.
    let stranger = batch(sender, status.cluster_id ^ 1, vec![heartbeat(sender)]);
    let refused = peer.services().receive_batch(stranger).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    let garbage = batch(sender, status.cluster_id, vec![vec![0xff; 7]]);
    let refused = peer.services().receive_batch(garbage).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");

    let after = cluster.status(target).await;
    let count = |reason: &str| after.refused.iter().find(|r| r.reason == reason).map_or(0, |r| r.count);
    assert_eq!(count("addressing"), 1, "{:?}", after.refused);
    assert_eq!(count("other_cluster"), 1, "{:?}", after.refused);
    assert_eq!(after.term, status.term, "a refused message moved the term");
    assert_eq!(
        cluster.leader(&[1, 2, 3]).await,
        leader,
        "and the cluster is undisturbed"
    );
    cluster.stop().await;
}
