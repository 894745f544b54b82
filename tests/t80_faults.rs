//! Faults cost nothing: a Jepsen-style run against a 3-node cluster of the
//! real binary. Concurrent clients write registers, read them linearizably
//! (through any node) and append unique values to a list, recording every
//! operation with one clock, while a nemesis deals faults one at a time:
//! SIGKILL of any node and of the leader, SIGSTOP of the leader past the
//! election timeout, a network partition (a node's link cut, the leader's
//! or another's), leader transfer, a membership change (a member removed
//! and a fresh node joined in its place), a plugin hot swap (kv, kv-v2,
//! kv-v1 in turn) and forced snapshots, with a small snapshot interval.
//! Each round then checks: the history is linearizable, every acknowledged
//! append is in the list exactly once (and nothing else is), the replicas
//! are identical after healing and agreed at every epoch, no node
//! panicked, and the longest stretch without a successful read and without
//! a successful write.
//!
//! Partitions need network namespaces (CAP_NET_ADMIN, as root in CI); where
//! they cannot be made the round says so and deals the other faults.
//!
//! CI runs a few short rounds; a soak run sets the environment:
//! `FAULT_ROUNDS=20 FAULT_SECONDS=45 FAULT_SEED=7 cargo test --release
//! --test t80_faults -- --nocapture` (or `host/benches/faults.sh`). A
//! failure prints the seed, the nemesis schedule and the checker's
//! explanation.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftify_host::client::{Client, ClientError};
use raftify_host::daemon::{EMBEDDED_KV, EMBEDDED_KV_V1, EMBEDDED_KV_V2};
use raftify_host::proto::Consistency;
use support::lan::Lan;
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
/// The election timeout of `FLAGS` (the default: 10 ticks of 100 ms).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Past this, a stretch with no successful read (or write) while a quorum
/// was up fails the round. The target is 2 election timeouts; the bound
/// leaves room for a debug build on a loaded 2-core machine, and the
/// failover benchmark measures the real figure.
const LONGEST_GAP: Duration = Duration::from_secs(6);

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

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
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

/// The addresses of the current members, which clients pick from.
type Addrs = Arc<Mutex<Vec<String>>>;

async fn run_client(id: usize, seed: u64, addrs: Addrs, start: Instant, stop: Arc<AtomicBool>) -> Record {
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
            let addr = {
                let addrs = addrs.lock().unwrap();
                addrs[rng.below(addrs.len() as u64) as usize].clone()
            };
            client = Client::connect(&addr, Duration::from_secs(3)).await.ok();
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
                    let text = response.rendered().into_owned();
                    let seen = (text != "(nil)").then_some(text);
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
            // Try another node next (this one may be down, paused or cut off).
            client = None;
        }
    }
    record
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    KillAny,
    KillLeader,
    PauseLeader,
    PartitionAny,
    PartitionLeader,
    Transfer,
    Replace,
    Swap,
    Snapshot,
}

const EVERY_FAULT: [Fault; 9] = [
    Fault::KillAny,
    Fault::KillLeader,
    Fault::PauseLeader,
    Fault::PartitionAny,
    Fault::PartitionLeader,
    Fault::Transfer,
    Fault::Replace,
    Fault::Swap,
    Fault::Snapshot,
];

/// Faults are dealt from a shuffled deck of one of each, so every kind
/// comes up once before any comes up twice, even in short rounds.
struct Deck {
    cards: Vec<Fault>,
    partitions: bool,
}

impl Deck {
    fn deal(&mut self, rng: &mut Rng) -> Fault {
        use Fault::*;
        loop {
            let fault = self.shuffled(rng).pop().unwrap();
            if self.partitions || !matches!(fault, PartitionAny | PartitionLeader) {
                return fault;
            }
        }
    }

    fn shuffled(&mut self, rng: &mut Rng) -> &mut Vec<Fault> {
        if self.cards.is_empty() {
            self.cards = EVERY_FAULT.to_vec();
            for i in (1..self.cards.len()).rev() {
                self.cards.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        &mut self.cards
    }
}

/// One member of the cluster, in one slot.
struct Member {
    id: u64,
    addr: String,
    dir: PathBuf,
    node: Node,
}

/// The cluster under test: three slots, each holding one member. With a
/// `Lan`, every slot is a network namespace of its own, which a partition
/// cuts off; without one, nodes run on 127.0.0.1.
struct Faulty {
    lan: Option<Lan>,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// Addresses and data dirs made so far: names the next ones.
    started: u64,
    dirs: u64,
    addrs: Addrs,
    /// The plugins a swap cycles through.
    plugins: Vec<String>,
    swaps: usize,
    /// Every node log, for the check that nothing panicked.
    logs: Vec<PathBuf>,
    /// Linearizable reads served and retried by nodes since stopped.
    reads: (u64, u64),
}

impl Faulty {
    fn start(lan: Option<Lan>) -> Faulty {
        let dir = tempfile::tempdir().unwrap();
        let plugins = [
            ("kv-v2", EMBEDDED_KV_V2),
            ("kv-v1", EMBEDDED_KV_V1),
            ("kv", EMBEDDED_KV),
        ]
        .iter()
        .map(|(name, bytes)| {
            let path = dir.path().join(format!("{name}.wasm"));
            std::fs::write(&path, bytes).unwrap();
            precompile(&path);
            path.to_str().unwrap().to_string()
        })
        .collect();
        let mut cluster = Faulty {
            lan,
            dir,
            members: Vec::new(),
            started: 0,
            dirs: 0,
            addrs: Arc::default(),
            plugins,
            swaps: 0,
            logs: Vec::new(),
            reads: (0, 0),
        };
        let addrs: Vec<String> = (0..3).map(|slot| cluster.fresh_addr(slot)).collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(slot, addr)| format!("{}={addr}", slot + 1))
            .collect::<Vec<_>>()
            .join(",");
        for (slot, addr) in addrs.into_iter().enumerate() {
            let id = slot as u64 + 1;
            let dir = cluster.fresh_dir();
            let mut flags = vec!["--id".to_string(), id.to_string(), "--peers".into(), peers.clone()];
            flags.extend(FLAGS.iter().map(|f| f.to_string()));
            let node = cluster.spawn(slot, &dir, &addr, &flags);
            cluster.members.push(Member { id, addr, dir, node });
        }
        cluster.publish_addrs();
        cluster.leader();
        cluster
    }

    fn fresh_addr(&mut self, slot: usize) -> String {
        self.started += 1;
        match &self.lan {
            // A namespace of its own: every port is free there.
            Some(lan) => format!("{}:{}", lan.ip(slot), 7000 + self.started),
            None => free_addr(),
        }
    }

    fn fresh_dir(&mut self) -> PathBuf {
        self.dirs += 1;
        self.dir.path().join(format!("n{}", self.dirs))
    }

    fn spawn(&mut self, slot: usize, dir: &Path, addr: &str, flags: &[String]) -> Node {
        let netns = self.lan.as_ref().map(|lan| lan.netns(slot));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = Node::spawn_in(netns.as_deref(), dir, addr, &flags);
        self.logs.push(node.log.clone());
        node
    }

    fn publish_addrs(&self) {
        *self.addrs.lock().unwrap() = self.members.iter().map(|m| m.addr.clone()).collect();
    }

    fn slot_of(&self, id: u64) -> usize {
        self.members.iter().position(|m| m.id == id).expect("a member")
    }

    /// Wait until every member reports the same leader, a member; return it.
    fn leader(&self) -> u64 {
        let mut agreed = 0;
        wait_until(START_DEADLINE, "the members to agree on a leader", || {
            let leaders: Vec<u64> = self
                .members
                .iter()
                .map(|m| m.node.try_status().and_then(|s| s["leader_id"].as_u64()).unwrap_or(0))
                .collect();
            agreed = leaders[0];
            agreed != 0 && leaders.iter().all(|l| *l == agreed) && self.members.iter().any(|m| m.id == agreed)
        });
        agreed
    }

    /// A CLI call through the member in `slot`, retried while the answer
    /// says retrying may work, until `within` passes.
    fn retried(&self, slot: usize, args: &[&str], within: Duration) -> Result<String, String> {
        let deadline = Instant::now() + within;
        let addr = self.members[slot].addr.clone();
        let mut all = args.to_vec();
        all.extend(["--addr", &addr, "--timeout-ms", "10000"]);
        loop {
            match outcome(cli(&all)) {
                Err(error) if error.contains("retry") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                result => return result,
            }
        }
    }

    /// Add what the member in `slot` says of its reads to `reads`, before
    /// it stops (its counts start again at zero).
    fn tally(&mut self, slot: usize) {
        if let Some(status) = self.members[slot].node.try_status() {
            self.reads.0 += status["reads_served"].as_u64().unwrap_or(0);
            self.reads.1 += status["reads_retried"].as_u64().unwrap_or(0);
        }
    }

    /// Linearizable reads served and retried, by every node of the round.
    fn read_counts(&mut self) -> (u64, u64) {
        for slot in 0..self.members.len() {
            self.tally(slot);
        }
        self.reads
    }

    fn restart(&mut self, slot: usize) {
        let (dir, addr) = (self.members[slot].dir.clone(), self.members[slot].addr.clone());
        let flags: Vec<String> = FLAGS.iter().map(|f| f.to_string()).collect();
        let node = self.spawn(slot, &dir, &addr, &flags);
        node.wait_ready();
        self.members[slot].node = node;
    }

    /// Remove the member in `slot` and join a fresh node in its place.
    fn replace(&mut self, slot: usize) -> Result<u64, String> {
        let old = self.members[slot].id;
        let through = (slot + 1) % self.members.len();
        self.retried(
            through,
            &["member", "remove", &old.to_string()],
            Duration::from_secs(30),
        )?;
        self.tally(slot);
        self.members[slot].node.kill();
        let addr = self.fresh_addr(slot);
        let dir = self.fresh_dir();
        let mut flags = vec!["--join".to_string(), self.members[through].addr.clone()];
        flags.extend(FLAGS.iter().map(|f| f.to_string()));
        let node = self.spawn(slot, &dir, &addr, &flags);
        node.wait_ready();
        let id = node.status()["id"].as_u64().unwrap();
        self.members[slot] = Member { id, addr, dir, node };
        self.publish_addrs();
        let seen_by = &self.members[through].node;
        wait_until(START_DEADLINE, &format!("node {id} to become a voter"), || {
            seen_by.try_status().is_some_and(|s| {
                s["members"]
                    .as_array()
                    .is_some_and(|ms| ms.len() == 3 && ms.iter().all(|m| m["role"] == "voter"))
            })
        });
        Ok(id)
    }

    /// Deal one fault, wait it out, and undo it; returns what was done.
    fn inflict(&mut self, fault: Fault, rng: &mut Rng) -> String {
        let leader = self.leader();
        let leader_slot = self.slot_of(leader);
        let any_slot = rng.below(self.members.len() as u64) as usize;
        let any = self.members[any_slot].id;
        match fault {
            Fault::KillAny | Fault::KillLeader => {
                let slot = if fault == Fault::KillLeader {
                    leader_slot
                } else {
                    any_slot
                };
                let down = rng.millis(500, 2000);
                self.tally(slot);
                self.members[slot].node.kill();
                std::thread::sleep(down);
                self.restart(slot);
                format!(
                    "kill -9 node {} (leader {leader}), down {down:?}",
                    self.members[slot].id
                )
            }
            Fault::PauseLeader => {
                let pause = rng.millis(2000, 3500);
                self.members[leader_slot].node.signal("-STOP");
                std::thread::sleep(pause);
                self.members[leader_slot].node.signal("-CONT");
                format!("SIGSTOP leader {leader} for {pause:?}")
            }
            Fault::PartitionAny | Fault::PartitionLeader => {
                let slot = if fault == Fault::PartitionLeader {
                    leader_slot
                } else {
                    any_slot
                };
                let cut = rng.millis(2000, 4000);
                let lan = self.lan.as_ref().expect("partitions are dealt only with a lan");
                lan.cut(slot);
                std::thread::sleep(cut);
                lan.heal(slot);
                format!("cut node {} off (leader {leader}) for {cut:?}", self.members[slot].id)
            }
            Fault::Transfer => {
                let to = self.members[(leader_slot + 1) % self.members.len()].id;
                let moved = self.retried(
                    leader_slot,
                    &["leader", "transfer", &to.to_string()],
                    Duration::from_secs(10),
                );
                format!("leader transfer {leader} -> {to}: {moved:?}")
            }
            Fault::Replace => match self.replace(any_slot) {
                Ok(id) => format!("member remove {any} (leader {leader}); node {id} joined in its place"),
                Err(error) => panic!("removing member {any} failed: {error}"),
            },
            Fault::Swap => {
                let plugin = self.plugins[self.swaps % self.plugins.len()].clone();
                self.swaps += 1;
                let name = Path::new(&plugin).file_name().unwrap().to_string_lossy().into_owned();
                match self.retried(any_slot, &["plugin", "swap", &plugin], Duration::from_secs(30)) {
                    Ok(_) => format!("plugin swap to {name} through node {any}"),
                    Err(error) => panic!("the swap to {name} failed: {error}"),
                }
            }
            Fault::Snapshot => {
                let taken = self.retried(any_slot, &["snapshot"], Duration::from_secs(10)).is_ok();
                format!("snapshot on node {any}: taken {taken}")
            }
        }
    }
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

/// A network for partitions, or `None` (and why) where it cannot be made.
fn lan() -> Option<Lan> {
    match Lan::new(3) {
        Ok(lan) => Some(lan),
        Err(why) => {
            println!("   no partitions in this run: cannot make network namespaces ({why})");
            None
        }
    }
}

fn round(seed: u64, seconds: u64, deck: &mut Deck) {
    println!("== round with seed {seed}, {seconds} s");
    let mut cluster = Faulty::start(lan());
    deck.partitions = cluster.lan.is_some();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (addrs, stop) = (cluster.addrs.clone(), stop.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(run_client(id, seed, addrs, start, stop))
            })
        })
        .collect();
    // The clients stop even if the nemesis panics.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_clients = StopOnDrop(stop.clone());

    let mut rng = Rng(seed | 1);
    let until = start + Duration::from_secs(seconds);
    let mut schedule = Vec::new();
    while Instant::now() + Duration::from_secs(4) < until {
        std::thread::sleep(rng.millis(1000, 2500));
        let fault = deck.deal(&mut rng);
        let at = start.elapsed().as_secs_f64();
        let done = cluster.inflict(fault, &mut rng);
        schedule.push(format!("{at:6.2}s-{:6.2}s {done}", start.elapsed().as_secs_f64()));
    }
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let faults_end = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let records: Vec<Record> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let explain = |what: &str| format!("{what}\nseed {seed}; nemesis schedule:\n{}", schedule.join("\n"));

    // Healed: every member up, caught up, and answering alike.
    let leader = cluster.leader();
    let leader_node = &cluster.members[cluster.slot_of(leader)].node;
    let commit = leader_node.status()["commit_index"].as_u64().unwrap();
    for member in &cluster.members {
        wait_until(START_DEADLINE, &format!("node {} to apply {commit}", member.id), || {
            member
                .node
                .try_status()
                .is_some_and(|s| s["applied_index"].as_u64().unwrap_or(0) >= commit)
        });
    }
    let stale = |node: &Node, text: &str| {
        outcome(node.cli(&["query", text, "--consistency", "stale", "--addr", &node.addr])).unwrap()
    };
    let mut keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    keys.push("l".into());
    for key in &keys {
        let values: Vec<String> = cluster
            .members
            .iter()
            .map(|m| stale(&m.node, &format!("get {key}")))
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
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for event in records.iter().flat_map(|r| r.events.iter().cloned()) {
        match event {
            Event::Register { key, op } => {
                match op.kind {
                    Kind::Read(_) => reads.extend(op.ret),
                    Kind::Write(_) => writes.extend(op.ret),
                }
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
    let list = stale(leader_node, "get l");
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
    for log in &cluster.logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains("panicked"),
            "{}",
            explain(&format!("a node panicked; {}:\n{text}", log.display()))
        );
        // Every epoch's state hash agreed with the others' (the snapshot
        // faults are epochs on every replica).
        assert!(
            !text.contains("REPLICAS DIVERGED"),
            "{}",
            explain(&format!("replicas diverged at an epoch; {}:\n{text}", log.display()))
        );
    }

    let (served, retried) = cluster.read_counts();
    println!(
        "   linearizable reads: {served} served, {retried} of them retried ({:.3}%)",
        100.0 * retried as f64 / served.max(1) as f64
    );
    let ok: usize = records.iter().map(|r| r.ok).sum();
    let unknown: usize = records.iter().map(|r| r.unknown).sum();
    let failed: usize = records.iter().map(|r| r.failed).sum();
    let warm_up = Duration::from_secs(1);
    let read_gap = longest_gap(reads, warm_up, faults_end);
    let write_gap = longest_gap(writes, warm_up, faults_end);
    println!(
        "   {} faults; {ok} ok, {unknown} unknown, {failed} failed operations; {} appends in the list; \
         longest stretch without a successful read {read_gap:?}, without a successful write {write_gap:?} \
         (election timeout {ELECTION_TIMEOUT:?})",
        schedule.len(),
        present.len()
    );
    for line in &schedule {
        println!("   {line}");
    }
    // One fault at a time: a quorum was up all along, so the cluster must
    // have kept serving both reads and writes.
    for (what, gap) in [("read", read_gap), ("write", write_gap)] {
        assert!(
            gap < LONGEST_GAP,
            "{}",
            explain(&format!("no {what} succeeded for {gap:?}"))
        );
    }
}

#[test]
fn the_cluster_stays_linearizable_and_loses_nothing_under_every_fault() {
    let rounds = env_u64("FAULT_ROUNDS", 2);
    let seconds = env_u64("FAULT_SECONDS", 20);
    let first_seed = env_u64(
        "FAULT_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    println!("FAULT_SEED={first_seed} FAULT_ROUNDS={rounds} FAULT_SECONDS={seconds} reproduces this run's schedules");
    // One deck for the whole run: two short rounds see every kind of fault.
    let mut deck = Deck {
        cards: Vec::new(),
        partitions: true,
    };
    for r in 0..rounds {
        round(first_seed.wrapping_add(r), seconds, &mut deck);
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
