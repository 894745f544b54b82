//! Failover figures: the time from a leader's SIGKILL to the first
//! successful write and the first successful linearizable read, through the
//! leader's successor and through the other follower, over `KILLS` kills
//! (default 10) of a 3-node cluster of the release binary on 127.0.0.1.
//!
//! `cargo bench -p raftify-host --bench failover` (or `KILLS=20 ...`).
//!
//! Probes start a new attempt every `PROBE_EVERY` through a fresh connection
//! to the node they measure (each attempt bounded by `ATTEMPT_TIMEOUT`), so
//! an attempt stuck on the dead leader never hides a later one that would
//! succeed: the figure is the completion time of the first attempt that
//! succeeds.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use raftify_host::client::Client;
use raftify_host::proto::Consistency;
use support::*;

const PROBE_EVERY: Duration = Duration::from_millis(20);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
const GIVE_UP: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Probe {
    Write,
    Read,
}

/// Attempts through `addr` every `PROBE_EVERY`, from `start`; the time from
/// `start` at which the first successful one completed.
async fn first_success(addr: String, probe: Probe, start: Instant) -> Option<Duration> {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if start.elapsed() > GIVE_UP {
                    return None;
                }
                n += 1;
                let (addr, done) = (addr.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let Ok(mut client) = Client::connect(&addr, ATTEMPT_TIMEOUT).await else {
                        return;
                    };
                    let ok = match probe {
                        Probe::Write => client.propose_text(&format!("set failover{n} x")).await.is_ok(),
                        Probe::Read => client.query_text("get failover1", Consistency::Linearizable).await.is_ok(),
                    };
                    if ok {
                        let _ = done.send(start.elapsed());
                    }
                });
            }
            Some(at) = done_rx.recv() => return Some(at),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn summary(name: &str, mut figures: Vec<Duration>) {
    figures.sort();
    if figures.is_empty() {
        println!("{name:<45} no figures");
        return;
    }
    let median = figures[figures.len() / 2];
    let worst = *figures.last().unwrap();
    let all: Vec<String> = figures.iter().map(|d| ms(*d)).collect();
    println!(
        "{name:<45} median {:>8}  worst {:>8}  ({})",
        ms(median),
        ms(worst),
        all.join(", ")
    );
}

fn main() {
    // `cargo bench` passes --bench; there is nothing to filter.
    let kills: usize = std::env::var("KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster.leader();
    cluster.node(leader).propose("set failover1 x").unwrap();

    let mut figures: [Vec<Duration>; 4] = Default::default();
    let names = [
        "write through the successor",
        "write through the other follower",
        "linearizable read through the successor",
        "linearizable read through the other follower",
    ];
    for kill in 0..kills {
        let leader = cluster.leader();
        let followers: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
        let addrs: Vec<String> = followers.iter().map(|id| cluster.addrs[id].clone()).collect();
        let start = Instant::now();
        cluster.kill(leader);
        let probes = runtime.block_on(async {
            let probes = [Probe::Write, Probe::Read].into_iter().flat_map(|probe| {
                addrs
                    .iter()
                    .map(move |addr| tokio::spawn(first_success(addr.clone(), probe, start)))
            });
            let mut out = Vec::new();
            for probe in probes.collect::<Vec<_>>() {
                out.push(probe.await.unwrap());
            }
            out
        });
        let successor = cluster.leader();
        let successor_at = followers.iter().position(|id| *id == successor).unwrap();
        let (s, o) = (successor_at, 1 - successor_at);
        let [w0, w1, r0, r1] = [probes[0], probes[1], probes[2], probes[3]];
        let writes = [w0, w1];
        let reads = [r0, r1];
        println!(
            "kill {kill}: leader {leader} -> {successor}; write {:?} / {:?}, read {:?} / {:?} (successor / other)",
            writes[s], writes[o], reads[s], reads[o]
        );
        for (i, figure) in [writes[s], writes[o], reads[s], reads[o]].into_iter().enumerate() {
            match figure {
                Some(d) => figures[i].push(d),
                None => println!("  {} gave no answer within {GIVE_UP:?}", names[i]),
            }
        }
        // Bring the old leader back and let it catch up before the next kill.
        cluster.restart(leader);
        let commit = cluster.node(successor).status()["commit_index"].as_u64().unwrap();
        cluster.wait_applied(leader, commit);
    }
    println!("\n{kills} leader SIGKILLs, 3 nodes, election timeout 1 s (10 ticks of 100 ms):");
    for (name, figures) in names.iter().zip(figures) {
        summary(name, figures);
    }
}
