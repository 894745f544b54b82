//! Three raftify-host nodes in one process on 127.0.0.1, each with the
//! embedded kv plugin: a proposal through the leader's handle, a
//! linearizable read through a follower's, and the cluster's status.
//!
//!     cargo run --release --example embedded

use std::time::Duration;

use raftify_host::{Consistency, Node, NodeConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The listeners first: a new cluster's members are given to each node.
    let mut listeners = Vec::new();
    for _ in 1..=3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let mut config = NodeConfig::new(&addrs[i], dir.path().join(format!("n{id}")))?;
        config.id = Some(id);
        config.peers = addrs
            .iter()
            .enumerate()
            .map(|(j, a)| (j as u64 + 1, a.clone()))
            .collect();
        nodes.push(Node::start_on(config, listener).await?);
        println!("node {id} serves on {}", addrs[i]);
    }

    let leader_id = nodes[0].handle().wait_for_leader(Duration::from_secs(20)).await?;
    let leader = nodes[leader_id as usize - 1].handle();
    let follower = nodes[leader_id as usize % 3].handle();
    println!("node {leader_id} leads");

    let applied = leader.propose("set greeting hello").await?;
    println!(
        "proposed `set greeting hello` on the leader: {} at index {}",
        applied.text, applied.index
    );
    let counted = leader.propose("incr visits").await?;
    println!("proposed `incr visits`: {}", counted.text);
    let read = follower.query("get greeting", Consistency::Linearizable).await?;
    println!("linearizable `get greeting` on a follower: {}", read.text);

    // A follower refuses writes and names the leader.
    let refused = follower.propose("set k v").await.unwrap_err();
    println!("a proposal on a follower: {refused} ({:?})", refused.kind());

    let status = follower.status().await?;
    println!(
        "follower {}: term {}, commit {}, applied {}, {} members, plugin {}",
        status.id,
        status.term,
        status.commit_index,
        status.applied_index,
        status.members.len(),
        &status.plugin_sha256[..12]
    );
    for node in nodes {
        node.stop().await?;
    }
    Ok(())
}
