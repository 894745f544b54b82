//! Faults cost nothing: a Jepsen-style run against a 3-node cluster of the
//! real binary. Concurrent clients write registers, read them
//! linearizably (through any node) and append unique values to a list,
//! recording every operation with one clock, while a nemesis kills nodes
//! (the leader among them) with SIGKILL, pauses the leader with SIGSTOP past
//! the election timeout, moves leadership and forces snapshots. Each round
//! then checks: the history is linearizable, every acknowledged append is
//! in the list exactly once (and nothing else is), the replicas are
//! identical, and the longest stretch without a successful operation.
//!
//! CI runs a few short rounds; a soak run sets the environment:
//! `FAULT_ROUNDS=20 FAULT_SECONDS=45 FAULT_SEED=7 cargo test --release
//! --test t80_faults -- --nocapture` (or `host/benches/faults.sh`). A
//! failure prints the seed, the nemesis schedule and the checker's
//! explanation.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raftify_host::client::{Client, ClientError};
use raftify_host::proto::Consistency;
use support::linearizability::{self, Kind, Op};
use support::*;

const FLAGS: &[&str] = &[
    "--snapshot-log-percent",
    "0",
    "--snapshot-every-entries",
    "300",
    "--snapshot-keep-entries",
    "50",
    "--request-timeout-ms",
    "4000",
];
const KEYS: usize = 4;
const CLIENTS: usize = 6;

/// A small seeded generator: the schedule of a round is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One recorded operation.
#[derive(Debug, Clone)]
enum Event {
    Register { key: usize, op: Op },
    Append { value: String, acknowledged: bool },
}

/// What one client did.
struct Record {
    events: Vec<Event>,
    ok: usize,
    unknown: usize,
    failed: usize,
}

/// A definite "no": the request was never proposed (not the leader, busy,
/// refused). Anything else may or may not have taken effect.
fn definitely_not_applied(error: &ClientError) -> bool {
    matches!(error, ClientError::Rpc(status) if matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
    ))
}

async fn run_client(id: usize, seed: u64, addrs: Vec<String>, start: Instant, stop: Arc<AtomicBool>) -> Record {
    let mut rng = Rng(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut record = Record {
        events: Vec::new(),
        ok: 0,
        unknown: 0,
        failed: 0,
    };
    let mut client: Option<Client> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            let addr = &addrs[rng.below(addrs.len() as u64) as usize];
            client = Client::connect(addr, Duration::from_secs(3)).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        };
        n += 1;
        let key = rng.below(KEYS as u64) as usize;
        let call = start.elapsed();
        let choice = rng.below(10);
        let (event, failed) = if choice < 4 {
            let value = format!("c{id}n{n}");
            let result = c.propose_text(&format!("set k{key} {value}")).await;
            let failed = result.is_err();
            let op = |ret| Op {
                client: id,
                call,
                ret,
                kind: Kind::Write(value.clone()),
            };
            match result {
                Ok(_) => {
                    record.ok += 1;
                    (
                        Some(Event::Register {
                            key,
                            op: op(Some(start.elapsed())),
                        }),
                        failed,
                    )
                }
                Err(e) if definitely_not_applied(&e) => {
                    record.failed += 1;
                    (None, failed)
                }
                Err(_) => {
                    record.unknown += 1;
                    (Some(Event::Register { key, op: op(None) }), failed)
                }
            }
        } else if choice < 8 {
            let result = c.query_text(&format!("get k{key}"), Consistency::Linearizable).await;
            match result {
                Ok(response) => {
                    record.ok += 1;
                    let seen = (response.text != "(nil)").then_some(response.text);
                    let op = Op {
                        client: id,
                        call,
                        ret: Some(start.elapsed()),
                        kind: Kind::Read(seen),
                    };
                    (Some(Event::Register { key, op }), false)
                }
                Err(_) => {
                    // A read that failed constrains nothing.
                    record.failed += 1;
                    (None, true)
                }
            }
        } else {
            let value = format!("a{id}n{n}");
            let result = c.propose_text(&format!("append l {value}")).await;
            let failed = result.is_err();
            let acknowledged = result.is_ok();
            match &result {
                Ok(_) => record.ok += 1,
                Err(e) if definitely_not_applied(e) => record.failed += 1,
                Err(_) => record.unknown += 1,
            }
            (Some(Event::Append { value, acknowledged }), failed)
        };
        record.events.extend(event);
        // A few hundred operations a second in all: enough to see every
        // fault, few enough to check in seconds.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if failed {
            // Try another node next (this one may be down or paused).
            client = None;
        }
    }
    record
}

fn signal(node: &Node, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &node.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {}", node.pid());
}

/// The nemesis: one fault every 1.5-3 s until `until`; never more than one
/// node down or paused at a time, so a quorum is always there. Returns the
/// schedule, as text.
fn nemesis(cluster: &mut Cluster, rng: &mut Rng, start: Instant, until: Instant) -> Vec<String> {
    let mut schedule = Vec::new();
    while Instant::now() + Duration::from_secs(4) < until {
        std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
        let leader = cluster.leader();
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        let other = ids[rng.below(ids.len() as u64) as usize];
        let at = start.elapsed().as_secs_f64();
        match rng.below(5) {
            0 | 1 => {
                let victim = if rng.below(2) == 0 { leader } else { other };
                schedule.push(format!("{at:6.2}s kill -9 node {victim} (leader {leader})"));
                cluster.kill(victim);
                std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                let node = Node::spawn(&cluster.data_dir(victim), &cluster.addrs[&victim].clone(), FLAGS);
                node.wait_ready();
                cluster.nodes.insert(victim, node);
            }
            2 => {
                schedule.push(format!("{at:6.2}s SIGSTOP leader {leader} for 2.5 s"));
                signal(cluster.node(leader), "-STOP");
                std::thread::sleep(Duration::from_millis(2500));
                signal(cluster.node(leader), "-CONT");
            }
            3 => {
                let to = ids.iter().copied().find(|id| *id != leader).unwrap_or(leader);
                schedule.push(format!("{at:6.2}s leader transfer {leader} -> {to}"));
                let addr = cluster.node(leader).addr.clone();
                let _ = cli(&[
                    "leader",
                    "transfer",
                    &to.to_string(),
                    "--addr",
                    &addr,
                    "--timeout-ms",
                    "5000",
                ]);
            }
            _ => {
                schedule.push(format!("{at:6.2}s snapshot on node {other}"));
                let addr = cluster.node(other).addr.clone();
                let _ = cli(&["snapshot", "--addr", &addr, "--timeout-ms", "10000"]);
            }
        }
    }
    schedule
}

/// The longest stretch, between `from` and `to`, in which no operation
/// returned successfully.
fn longest_gap(mut returns: Vec<Duration>, from: Duration, to: Duration) -> Duration {
    returns.sort();
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for at in returns.into_iter().chain([to]) {
        longest = longest.max(at.saturating_sub(previous));
        previous = previous.max(at);
    }
    longest
}

fn round(seed: u64, seconds: u64) {
    println!("== round with seed {seed}, {seconds} s");
    let mut cluster = Cluster::start(3, FLAGS);
    let addrs: Vec<String> = cluster.addrs.values().cloned().collect();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (addrs, stop) = (addrs.clone(), stop.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(run_client(id, seed, addrs, start, stop))
            })
        })
        .collect();
    let mut rng = Rng(seed | 1);
    let until = start + Duration::from_secs(seconds);
    let schedule = nemesis(&mut cluster, &mut rng, start, until);
    let remaining = until.saturating_duration_since(Instant::now());
    std::thread::sleep(remaining);
    let faults_end = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let records: Vec<Record> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let explain = |what: &str| format!("{what}\nseed {seed}; nemesis schedule:\n{}", schedule.join("\n"));

    // Healed: every node up, caught up, and answering alike.
    let leader = cluster.leader();
    let commit = cluster.node(leader).status()["commit_index"].as_u64().unwrap();
    for id in [1, 2, 3] {
        cluster.wait_applied(id, commit);
    }
    let mut keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    keys.push("l".into());
    for key in &keys {
        let values: Vec<String> = [1, 2, 3]
            .iter()
            .map(|id| cluster.stale(*id, &format!("get {key}")))
            .collect();
        assert!(
            values.iter().all(|v| *v == values[0]),
            "{}",
            explain(&format!("replicas differ on {key}: {values:?}"))
        );
    }

    // Linearizable, key by key.
    let mut histories: BTreeMap<usize, Vec<Op>> = BTreeMap::new();
    let mut appends: BTreeMap<String, bool> = BTreeMap::new();
    let mut returns = Vec::new();
    for event in records.iter().flat_map(|r| r.events.iter().cloned()) {
        match event {
            Event::Register { key, op } => {
                returns.extend(op.ret);
                histories.entry(key).or_default().push(op);
            }
            Event::Append { value, acknowledged } => {
                appends.insert(value, acknowledged);
            }
        }
    }
    for (key, history) in &histories {
        if let Err(violation) = linearizability::check(history) {
            panic!("{}", explain(&format!("k{key} is not linearizable: {violation}")));
        }
    }
    // Appends: each acknowledged one exactly once, nothing never attempted.
    let list = cluster.stale(leader, "get l");
    let present: Vec<&str> = if list == "(nil)" {
        Vec::new()
    } else {
        list.split(' ').collect()
    };
    let distinct: BTreeSet<&str> = present.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        present.len(),
        "{}",
        explain("an append is in the list twice")
    );
    for value in &present {
        assert!(
            appends.contains_key(*value),
            "{}",
            explain(&format!("{value} was never appended"))
        );
    }
    for (value, acknowledged) in &appends {
        if *acknowledged {
            assert!(
                distinct.contains(value.as_str()),
                "{}",
                explain(&format!("acknowledged {value} is lost"))
            );
        }
    }

    let ok: usize = records.iter().map(|r| r.ok).sum();
    let unknown: usize = records.iter().map(|r| r.unknown).sum();
    let failed: usize = records.iter().map(|r| r.failed).sum();
    let gap = longest_gap(returns, Duration::from_secs(1), faults_end);
    println!(
        "   {} faults; {ok} ok, {unknown} unknown, {failed} failed operations; {} appends in the list; \
         longest stretch without a successful register op: {gap:?}",
        schedule.len(),
        present.len()
    );
    for line in &schedule {
        println!("   {line}");
    }
    // A quorum was up all along: the cluster must have kept serving.
    assert!(
        gap < Duration::from_secs(10),
        "{}",
        explain(&format!("nothing succeeded for {gap:?}"))
    );
}

#[test]
fn the_cluster_stays_linearizable_and_loses_nothing_under_kills_pauses_and_moves() {
    let rounds = env_u64("FAULT_ROUNDS", 2);
    let seconds = env_u64("FAULT_SECONDS", 15);
    let first_seed = env_u64(
        "FAULT_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    for r in 0..rounds {
        round(first_seed.wrapping_add(r), seconds);
    }
}

// The checker checks: histories it must accept and ones it must refuse.

fn op(client: usize, call: u64, ret: Option<u64>, kind: Kind) -> Op {
    Op {
        client,
        call: Duration::from_millis(call),
        ret: ret.map(Duration::from_millis),
        kind,
    }
}

fn w(v: &str) -> Kind {
    Kind::Write(v.into())
}

fn r(v: Option<&str>) -> Kind {
    Kind::Read(v.map(String::from))
}

#[test]
fn the_checker_accepts_linearizable_histories() {
    // Sequential.
    let h = [op(0, 0, Some(1), w("a")), op(0, 2, Some(3), r(Some("a")))];
    assert!(linearizability::check(&h).is_ok());
    // A read concurrent with a write may see either value.
    let h = [
        op(0, 0, Some(10), w("a")),
        op(1, 1, Some(2), r(None)),
        op(2, 3, Some(4), r(Some("a"))),
    ];
    assert!(linearizability::check(&h).is_ok());
    // A write of unknown outcome may have happened...
    let h = [op(0, 0, None, w("a")), op(1, 5, Some(6), r(Some("a")))];
    assert!(linearizability::check(&h).is_ok());
    // ...or not.
    let h = [op(0, 0, None, w("a")), op(1, 5, Some(6), r(None))];
    assert!(linearizability::check(&h).is_ok());
}

#[test]
fn the_checker_refuses_histories_no_register_allows() {
    // A stale read: "b" was written after "a" completed, yet read "a" later.
    let h = [
        op(0, 0, Some(1), w("a")),
        op(0, 2, Some(3), w("b")),
        op(1, 4, Some(5), r(Some("a"))),
    ];
    let violation = linearizability::check(&h).unwrap_err();
    assert!(violation.to_string().contains("none of these can come next"));
    // A value nobody wrote.
    let h = [op(0, 0, Some(1), w("a")), op(1, 2, Some(3), r(Some("z")))];
    assert!(linearizability::check(&h).is_err());
    // Reads that go back in time: once "b" is seen, "a" cannot come back.
    let h = [
        op(0, 0, Some(10), w("a")),
        op(1, 0, Some(10), w("b")),
        op(2, 11, Some(12), r(Some("b"))),
        op(2, 13, Some(14), r(Some("a"))),
    ];
    assert!(linearizability::check(&h).is_err());
    // A lost write: it completed, yet a later read finds the key absent.
    let h = [op(0, 0, Some(1), w("a")), op(1, 2, Some(3), r(None))];
    assert!(linearizability::check(&h).is_err());
}

#[test]
fn the_longest_gap_counts_the_edges() {
    let s = Duration::from_secs;
    assert_eq!(longest_gap(vec![s(2), s(3)], s(0), s(10)), s(7));
    assert_eq!(longest_gap(vec![s(6), s(1)], s(0), s(7)), s(5));
    assert_eq!(longest_gap(vec![], s(1), s(4)), s(3));
}
