//! Unit tests of the apply worker, against the in-memory store.

use super::*;
use crate::daemon::{EMBEDDED_CHAOS, EMBEDDED_KV};
use crate::envelope::{self, HostEntry};
use crate::readiness::Readiness;
use crate::sandbox::{CallError, Sandbox, SandboxConfig};
use crate::storage::WriteBatch;
use crate::storage::mem::MemStore;
use raft::Storage;

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        fuel_per_call: 20_000_000,
        max_memory_bytes: 64 << 20,
        ..SandboxConfig::default()
    })
    .unwrap()
}

fn fsm_over(store: &MemStore, first: &[u8], config: SnapshotConfig) -> Fsm<MemStore> {
    fsm_fetching(store, first, config, nobody()).with_local_epochs()
}

/// A worker whose epochs come from `Epoch` entries in the log, as a node's.
fn fsm_logged(store: &MemStore, first: &[u8]) -> Fsm<MemStore> {
    fsm_fetching(store, first, SnapshotConfig::default(), nobody())
}

/// No member has any plugin.
fn nobody() -> Plugins {
    Box::new(|_: PluginId| -> Option<Vec<u8>> { None })
}

/// A worker whose plugin fetches from the members go through `plugins`.
fn fsm_fetching(store: &MemStore, first: &[u8], config: SnapshotConfig, plugins: Plugins) -> Fsm<MemStore> {
    let sandbox = sandbox();
    let plugin = sandbox.load(first).unwrap();
    store.activate_plugin(0, &plugin.sha256(), first).unwrap();
    Fsm::new(
        store.clone(),
        sandbox,
        plugin.clone(),
        config,
        watch::channel(0).0,
        watch::channel(plugin).0,
        plugins,
    )
    .unwrap()
}

fn chaos_fsm(store: &MemStore) -> Fsm<MemStore> {
    fsm_over(store, EMBEDDED_CHAOS, SnapshotConfig::default())
}

/// A store holding `entries` as its log.
fn store_with(entries: &[Entry]) -> MemStore {
    let store = MemStore::new();
    store
        .write(WriteBatch {
            entries: entries.to_vec(),
            ..Default::default()
        })
        .unwrap();
    store
}

/// A store holding `commands` as committed entries 1..=n.
fn log(commands: &[&str]) -> (MemStore, Vec<Entry>) {
    let entries: Vec<Entry> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| command(i as u64 + 1, c))
        .collect();
    (store_with(&entries), entries)
}

/// Apply everything, returning each entry's outcome.
fn apply_all(fsm: &mut Fsm<MemStore>, entries: Vec<Entry>) -> Vec<Result<Vec<u8>, CallError>> {
    let mut receivers = Vec::new();
    let mut waiters = HashMap::new();
    for entry in &entries {
        let (tx, rx) = oneshot::channel();
        waiters.insert(entry.index, tx);
        receivers.push(rx);
    }
    fsm.handle(FsmRequest::Apply { entries, waiters }).unwrap();
    receivers
        .into_iter()
        .map(|mut rx| rx.try_recv().unwrap().unwrap().result)
        .collect()
}

fn get(fsm: &mut Fsm<MemStore>, key: &str) -> String {
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Query {
        request: format!("get {key}").into_bytes(),
        read_index: 0,
        reply: tx,
    })
    .unwrap();
    String::from_utf8(rx.try_recv().unwrap().result.unwrap()).unwrap()
}

#[test]
fn a_trap_fails_only_its_entry_and_the_state_is_rebuilt_without_it() {
    let (store, entries) = log(&["set a 1", "set-then-panic b 2", "spin", "set c 3", "hog"]);
    let mut fsm = chaos_fsm(&store);
    let outcomes = apply_all(&mut fsm, entries);
    assert_eq!(outcomes[0], Ok(b"OK".to_vec()));
    assert!(matches!(&outcomes[1], Err(CallError::Trap(m)) if m.contains("panicked")));
    assert!(matches!(&outcomes[2], Err(CallError::Trap(m)) if m.contains("out of fuel")));
    assert_eq!(outcomes[3], Ok(b"OK".to_vec()));
    assert!(matches!(&outcomes[4], Err(CallError::Trap(_))));
    assert_eq!(get(&mut fsm, "a"), "1");
    assert_eq!(get(&mut fsm, "b"), "(nil)", "the write before the panic must vanish");
    assert_eq!(get(&mut fsm, "c"), "3");
    assert_eq!(fsm.applied(), 5);
    assert_eq!(store.traps(0, 100).unwrap().len(), 3);
}

/// Issue 21: whether a write fits under the memory cap (64 MiB here) must
/// not depend on what only one replica ran. A query held 50 MiB in this
/// instance; a 16 MiB write then has no room in it, but has in an instance
/// with the history every replica shares, so it applies there and is no
/// trap. A write no instance has room for traps, and is recorded, as on
/// every replica.
#[test]
fn a_write_out_of_memory_only_in_this_instance_applies_on_a_fresh_one() {
    let (store, entries) = log(&[
        "set a 1",
        &format!("fill big {}", 16 << 20),
        &format!("fill huge {}", 70 << 20),
    ]);
    let mut fsm = chaos_fsm(&store);
    apply_all(&mut fsm, entries[..1].to_vec());
    assert_eq!(query(&mut fsm, "hoard 50"), Ok(b"hoarded".to_vec()));
    let held = fsm.instance.memory_bytes();
    assert!(held > 50 << 20, "the query's memory is held: {held} bytes");

    let outcomes = apply_all(&mut fsm, entries[1..2].to_vec());
    assert_eq!(outcomes[0], Ok(b"OK".to_vec()), "applied on a fresh instance");
    assert!(store.traps(0, 100).unwrap().is_empty(), "no trap recorded");
    assert_eq!(query(&mut fsm, "len"), Ok(b"2".to_vec()), "a and big");
    assert!(
        fsm.instance.memory_bytes() < held,
        "the hoard is gone with the old instance"
    );

    let outcomes = apply_all(&mut fsm, entries[2..].to_vec());
    assert!(
        outcomes[0].as_ref().is_err_and(CallError::is_out_of_memory),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(
        store.traps(0, 100).unwrap().len(),
        1,
        "a real out of memory is recorded"
    );
    assert_eq!(
        query(&mut fsm, "len"),
        Ok(b"2".to_vec()),
        "and the state before it kept"
    );
    assert_eq!(get(&mut fsm, "a"), "1");
}

/// A plugin whose snapshot copies its whole state (the SDK's default, the
/// TS, Python and C bindings) needs twice the state's memory to take one:
/// at 40 of 64 MiB it is under the alarm's mark and still cannot. Its
/// snapshot runs out of memory, and the alarm goes on until one succeeds.
#[test]
fn a_snapshot_that_runs_out_of_memory_raises_the_memory_alarm() {
    let sixteen_mib = 16 << 20;
    let (store, entries) = log(&[
        &format!("fill a {sixteen_mib}"),
        &format!("fill b {sixteen_mib}"),
        &format!("fill c {}", 8 << 20),
    ]);
    let mut fsm = chaos_fsm(&store);
    let space = Arc::new(crate::space::SpaceState::default());
    fsm.report_memory_to(space.clone());
    assert!(apply_all(&mut fsm, entries).iter().all(Result::is_ok));
    assert!(!space.over(), "40 of 64 MiB is under the mark: {:?}", space.memory());
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Snapshot { reply: tx }).unwrap();
    fsm.wait_for_snapshot().unwrap();
    let answer = rx.try_recv().unwrap();
    assert!(
        answer.as_ref().is_err_and(|m| m.contains("out of memory")),
        "{answer:?}"
    );
    assert!(
        space.memory_over(),
        "a plugin that cannot snapshot at this size is full"
    );
    assert_eq!(query(&mut fsm, "len"), Ok(b"3".to_vec()), "the state is kept");
}

#[test]
fn a_restarted_worker_replays_to_the_same_state_and_skips_recorded_traps() {
    let (store, entries) = log(&["set a 1", "panic", "set b 2"]);
    let mut first = chaos_fsm(&store);
    let outcomes_first = apply_all(&mut first, entries.clone());
    let mut second = chaos_fsm(&store);
    let outcomes_second = apply_all(&mut second, entries);
    assert_eq!(
        outcomes_first, outcomes_second,
        "replay gives the proposer's outcomes again"
    );
    assert_eq!(get(&mut second, "a"), "1");
    assert_eq!(get(&mut second, "b"), "2");
}

#[test]
fn queries_wait_for_their_read_index() {
    let (store, entries) = log(&["set a 1", "set a 2"]);
    let mut fsm = chaos_fsm(&store);
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Query {
        request: b"get a".to_vec(),
        read_index: 2,
        reply: tx,
    })
    .unwrap();
    assert!(rx.try_recv().is_err(), "answered before the read index was applied");
    apply_all(&mut fsm, entries);
    let answer = rx.try_recv().unwrap();
    assert_eq!((answer.index, answer.result), (2, Ok(b"2".to_vec())));
}

#[test]
fn a_trapping_query_rebuilds_the_instance_with_its_state() {
    let (store, entries) = log(&["set a 1"]);
    let mut fsm = chaos_fsm(&store);
    apply_all(&mut fsm, entries);
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Query {
        request: b"panic".to_vec(),
        read_index: 0,
        reply: tx,
    })
    .unwrap();
    assert!(matches!(rx.try_recv().unwrap().result, Err(CallError::Trap(_))));
    assert_eq!(get(&mut fsm, "a"), "1");
}

#[test]
fn snapshots_compact_the_log_and_restarts_and_rebuilds_start_from_them() {
    let commands: Vec<String> = (0..10)
        .map(|i| format!("set k{i} {i}"))
        .chain(["panic".to_string()])
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (store, entries) = log(&commands);
    let config = SnapshotConfig {
        every_entries: 4,
        keep_entries: 1,
        ..SnapshotConfig::default()
    };
    let mut fsm = fsm_over(&store, EMBEDDED_CHAOS, config.clone());
    // Two batches: a snapshot is taken after each batch that passes the threshold.
    apply_all(&mut fsm, entries[..5].to_vec());
    fsm.wait_for_snapshot().unwrap();
    let first_snapshot = store.stored_snapshot().unwrap().unwrap();
    assert_eq!(first_snapshot.get_metadata().index, 5);
    assert_eq!(store.first_index().unwrap(), 5, "entries up to 4 compacted, one kept");
    let outcomes = apply_all(&mut fsm, entries[5..].to_vec());
    assert!(matches!(outcomes.last().unwrap(), Err(CallError::Trap(_))));
    // The rebuild after the trap started from the snapshot and replayed the rest.
    assert_eq!(get(&mut fsm, "k0"), "0");
    assert_eq!(get(&mut fsm, "k9"), "9");
    fsm.wait_for_snapshot().unwrap();
    assert_eq!(store.stored_snapshot().unwrap().unwrap().get_metadata().index, 11);

    let mut restarted = fsm_over(&store, EMBEDDED_CHAOS, config);
    assert_eq!(restarted.applied(), 11);
    assert_eq!(*restarted.applied_tx.borrow(), 11, "status and raft are told, too");
    assert_eq!(get(&mut restarted, "k3"), "3");
    assert_eq!(get(&mut restarted, "k9"), "9");
}

/// Entries holding `data`, one each, from `index` on.
fn entries_from(index: u64, data: Vec<Vec<u8>>) -> Vec<Entry> {
    data.into_iter()
        .enumerate()
        .map(|(i, data)| Entry {
            index: index + i as u64,
            term: 1,
            data: data.into(),
            ..Default::default()
        })
        .collect()
}

/// The chunk entries and the swap entry for `wasm`, from `index` on.
fn swap_entries(index: u64, wasm: &[u8]) -> Vec<Entry> {
    use sha2::Digest as _;
    let sha: [u8; 32] = sha2::Sha256::digest(wasm).into();
    entries_from(index, envelope::plugin_swap_entries(wasm, &sha, 64 * 1024))
}

fn command(index: u64, text: &str) -> Entry {
    Entry {
        index,
        term: 1,
        data: envelope::command(text.as_bytes()).into(),
        ..Default::default()
    }
}

fn query(fsm: &mut Fsm<MemStore>, text: &str) -> Result<Vec<u8>, CallError> {
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Query {
        request: text.as_bytes().to_vec(),
        read_index: 0,
        reply: tx,
    })
    .unwrap();
    rx.try_recv().unwrap().result
}

/// The entries of a two-phase swap from `index` on: the chunks and the
/// prepare entry, then (once `ready` came) the swap entry.
fn prepared_swap_entries(index: u64, wasm: &[u8]) -> (Vec<Entry>, Entry) {
    use sha2::Digest as _;
    let sha: [u8; 32] = sha2::Sha256::digest(wasm).into();
    let entries = entries_from(index, envelope::plugin_prepare_entries(wasm, &sha, 64 * 1024));
    let swap = entries_from(
        index + entries.len() as u64,
        vec![envelope::plugin_swap(&sha, wasm.len() as u64)],
    );
    (entries, swap.into_iter().next().expect("one entry"))
}

/// Issue 13: a swap compiled the component on every node's apply
/// thread as its entry applied, so applying stopped for the compile.
/// The prepare entry starts the compile on another thread, reports it
/// ready, and the swap takes the compiled plugin; a component that does
/// not compile is reported failed and the swap is refused as before.
#[test]
fn a_prepared_swap_compiles_off_the_apply_thread_and_reports_readiness() {
    use crate::daemon::{EMBEDDED_KV, EMBEDDED_KV_V2};
    use sha2::Digest as _;
    let sha: [u8; 32] = sha2::Sha256::digest(EMBEDDED_KV_V2).into();
    let mut entries = vec![command(1, "set a 1")];
    let (prepare, swap) = prepared_swap_entries(2, EMBEDDED_KV_V2);
    entries.extend(prepare);
    let after_prepare = entries.len() as u64 + 1;
    let (bad_prepare, _) = prepared_swap_entries(after_prepare, b"not wasm");
    entries.extend(bad_prepare);
    let swap = Entry {
        index: entries.len() as u64 + 1,
        ..swap
    };
    entries.push(swap.clone());
    entries.push(command(swap.index + 1, "set b 2"));
    let store = store_with(&entries);
    let mut fsm = fsm_over(&store, EMBEDDED_KV, SnapshotConfig::default());
    let readiness = Arc::new(PluginReadiness::default());
    fsm.report_readiness_to(readiness.clone());

    let prepared = entries.iter().position(|e| e.index == swap.index).unwrap();
    apply_all(&mut fsm, entries[..prepared].to_vec());
    assert_eq!(
        fsm.plugin.sha256(),
        sha2::Sha256::digest(EMBEDDED_KV).as_slice(),
        "not swapped yet"
    );
    wait_for(
        || readiness.own(&sha) == Some(Readiness::Ready),
        "the component to compile",
    );
    assert!(
        store.plugin_blob(&sha).unwrap().is_some(),
        "its bytes are stored ahead of the swap"
    );
    let bad_sha: [u8; 32] = sha2::Sha256::digest(b"not wasm").into();
    wait_for(
        || matches!(readiness.own(&bad_sha), Some(Readiness::Failed(m)) if m.contains("not a valid")),
        "the bad component to fail",
    );

    let outcomes = apply_all(&mut fsm, entries[prepared..].to_vec());
    assert!(
        matches!(&outcomes[0], Ok(m) if String::from_utf8_lossy(m).contains("is active from index")),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(fsm.plugin.sha256(), sha);
    assert_eq!(readiness.own(&sha), None, "forgotten once active");
    assert_eq!(get(&mut fsm, "a"), "1");
    assert_eq!(get(&mut fsm, "b"), "2");

    // A replica that never prepared (a restart replays from the start)
    // reaches the same plugin and state, compiling as the swap applies.
    let mut replayed = fsm_over(&store, EMBEDDED_KV, SnapshotConfig::default());
    apply_all(&mut replayed, entries.clone());
    assert_eq!(replayed.plugin.sha256(), sha);
    assert_eq!(get(&mut replayed, "b"), "2");
}

fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_swap_switches_plugins_at_its_index_keeping_the_state_and_bad_swaps_change_nothing() {
    use crate::daemon::{EMBEDDED_HELLO, EMBEDDED_KV, EMBEDDED_KV_V2};
    // The log: a write, three bad swaps, a write, a good swap, a write.
    let mut entries = vec![command(1, "set a hello")];
    let mut swaps = Vec::new();
    for wasm in [&b"not wasm at all"[..], EMBEDDED_HELLO, EMBEDDED_CHAOS] {
        entries.extend(swap_entries(entries.len() as u64 + 1, wasm));
        swaps.push(entries.len() - 1);
    }
    entries.push(command(entries.len() as u64 + 1, "set b world"));
    entries.extend(swap_entries(entries.len() as u64 + 1, EMBEDDED_KV_V2));
    let good_swap = entries.len() as u64;
    entries.push(command(entries.len() as u64 + 1, "set c 3"));
    let store = store_with(&entries);
    let mut fsm = fsm_over(&store, EMBEDDED_KV, SnapshotConfig::default());
    assert!(query(&mut fsm, "strlen a").is_err(), "kv has no strlen");
    let outcomes = apply_all(&mut fsm, entries.clone());
    for (i, why) in swaps.into_iter().zip(["not a valid", "world", "restore() failed"]) {
        assert!(
            matches!(&outcomes[i], Err(CallError::Guest(m)) if m.starts_with("plugin swap rejected") && m.contains(why)),
            "entry {}: {:?}",
            i + 1,
            outcomes[i]
        );
    }
    let expected = format!("active from index {good_swap}");
    assert!(
        matches!(&outcomes[good_swap as usize - 1], Ok(m) if String::from_utf8_lossy(m).contains(&expected)),
        "{:?}",
        outcomes[good_swap as usize - 1]
    );
    assert_eq!(query(&mut fsm, "strlen a").unwrap(), b"5");
    assert_eq!(query(&mut fsm, "get b").unwrap(), b"world");
    assert_eq!(query(&mut fsm, "get c").unwrap(), b"3");
    let history: Vec<u64> = store.plugin_history().unwrap().iter().map(|(i, _)| *i).collect();
    assert_eq!(history, vec![0, good_swap]);

    // A restart replays the log and switches again at the same index.
    let mut restarted = fsm_over(&store, EMBEDDED_KV, SnapshotConfig::default());
    apply_all(&mut restarted, entries);
    assert_eq!(query(&mut restarted, "strlen b").unwrap(), b"5");
}

/// A swap's chunks straddle a snapshot: a worker that restores it (a
/// restart, a lagging node) never saw the chunks before it. It fetches
/// the component from a member and switches at the same index as
/// everyone; when no member has it, it stalls (and retries) rather than
/// go on with the old plugin and diverge.
#[test]
fn a_swap_straddling_a_snapshot_fetches_its_component_or_stalls_rather_than_diverge() {
    use crate::daemon::{EMBEDDED_KV, EMBEDDED_KV_V2};
    use sha2::Digest as _;
    let mut entries = vec![command(1, "set a hello")];
    entries.extend(swap_entries(2, EMBEDDED_KV_V2));
    let swap_at = entries.len() as u64;
    assert!(swap_at >= 4, "kv-v2 spans several chunks");
    entries.push(command(swap_at + 1, "set b world"));
    // The log, with a snapshot taken after the first chunk.
    let snapshotted_mid_swap = || {
        let store = store_with(&entries);
        let mut fsm = fsm_over(&store, EMBEDDED_KV, SnapshotConfig::default());
        apply_all(&mut fsm, entries[..2].to_vec());
        let (tx, mut rx) = oneshot::channel();
        fsm.handle(FsmRequest::Snapshot { reply: tx }).unwrap();
        fsm.wait_for_snapshot().unwrap();
        assert_eq!(rx.try_recv().unwrap(), Ok(2));
        store
    };

    // No member has it: the worker stalls with the reason, on the swap.
    let store = snapshotted_mid_swap();
    let mut stranded = fsm_over(&store, EMBEDDED_KV, SnapshotConfig::default());
    assert_eq!(stranded.applied(), 2);
    let (waiters, rest) = (HashMap::new(), entries[2..].to_vec());
    stranded.handle(FsmRequest::Apply { entries: rest, waiters }).unwrap();
    let reason = stranded.health.reason();
    assert!(
        reason.contains("cannot apply") && reason.contains(&format!("for the swap at index {swap_at}")),
        "{reason}"
    );
    assert!(stranded.applied() < swap_at, "nothing at or past the swap was applied");
    assert!(query(&mut stranded, "get a").is_err(), "no reads from a stalled worker");
    assert_eq!(store.plugin_history().unwrap().len(), 1, "still kv, and only kv");

    // A member that has it comes up: the retry restores, replays what
    // was committed meanwhile, and switches at the same index.
    let later = snapshotted_mid_swap();
    let wanted: [u8; 32] = sha2::Sha256::digest(EMBEDDED_KV_V2).into();
    let available = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let now_available = available.clone();
    let fetch: Plugins = Box::new(move |id: PluginId| {
        (id.0 == wanted && now_available.load(Ordering::Relaxed)).then(|| EMBEDDED_KV_V2.to_vec())
    });
    let mut recovering = fsm_fetching(&later, EMBEDDED_KV, SnapshotConfig::default(), fetch);
    let (waiters, rest) = (HashMap::new(), entries[2..].to_vec());
    recovering.handle(FsmRequest::Apply { entries: rest, waiters }).unwrap();
    assert!(recovering.health.stalled());
    available.store(true, Ordering::Relaxed);
    let metadata = later.snapshot_metadata().unwrap();
    recovering.handle(FsmRequest::Restore { metadata }).unwrap(); // retry now
    recovering.retry_stalled().unwrap();
    assert!(!recovering.health.stalled(), "{}", recovering.health.reason());
    assert_eq!(recovering.applied(), swap_at + 1);
    assert_eq!(query(&mut recovering, "get b").unwrap(), b"world");
    assert_eq!(query(&mut recovering, "strlen a").unwrap(), b"5");

    // A member has it: the same switch, at the same index.
    let store = snapshotted_mid_swap();
    let wanted: [u8; 32] = sha2::Sha256::digest(EMBEDDED_KV_V2).into();
    let fetch: Plugins = Box::new(move |id: PluginId| (id.0 == wanted).then(|| EMBEDDED_KV_V2.to_vec()));
    let mut restored = fsm_fetching(&store, EMBEDDED_KV, SnapshotConfig::default(), fetch);
    let outcomes = apply_all(&mut restored, entries[2..].to_vec());
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let history: Vec<u64> = store.plugin_history().unwrap().iter().map(|(i, _)| *i).collect();
    assert_eq!(history, vec![0, swap_at]);
    assert_eq!(query(&mut restored, "strlen a").unwrap(), b"5");
    assert_eq!(query(&mut restored, "get b").unwrap(), b"world");
}

#[test]
fn a_snapshot_that_always_traps_is_retried_with_backoff_not_every_batch() {
    let mut commands = vec!["bad-snapshot".to_string()];
    commands.extend((0..2000).map(|i| format!("set k{i} v")));
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (store, entries) = log(&refs);
    let config = SnapshotConfig {
        every_entries: 10,
        ..SnapshotConfig::default()
    };
    let mut fsm = fsm_over(&store, EMBEDDED_CHAOS, config);
    // One batch per entry, as a busy node applies them.
    for entry in entries {
        apply_all(&mut fsm, vec![entry]);
    }
    assert_eq!(get(&mut fsm, "k1999"), "v");
    // Every batch from index 10 on would have tried (and rebuilt): about
    // 2,000 times. With backoff capped at every_entries (here 64, the
    // floor), a few dozen.
    assert!(
        fsm.snapshot_attempts <= 40,
        "{} snapshot attempts",
        fsm.snapshot_attempts
    );
    assert!(fsm.snapshot_attempts >= 2);
    let error = fsm.snapshot_error().lock().unwrap().clone();
    assert!(error.contains("trapped in snapshot()"), "{error}");
}

/// The value of `key` in the stored snapshot, read by a fresh kv.
fn stored_value(store: &MemStore, key: &str) -> (u64, String) {
    let snapshot = store.stored_snapshot().unwrap().unwrap();
    let (_, state) = crate::snapshot::decode(&snapshot.data).unwrap();
    let mut kv = sandbox()
        .load(crate::daemon::EMBEDDED_KV)
        .unwrap()
        .instantiate()
        .unwrap();
    kv.restore(1, state).unwrap();
    let value = kv.query(1, format!("get {key}").as_bytes()).unwrap();
    (snapshot.get_metadata().index, String::from_utf8(value).unwrap())
}

/// Issue 21: a snapshot of a large state is read a chunk at a time
/// between batches, so applying goes on meanwhile, and what is stored
/// is the state at the snapshot's own index.
#[test]
fn entries_keep_applying_while_a_snapshot_is_taken() {
    let value = "v".repeat(1000);
    let mut commands: Vec<String> = (0..2000).map(|i| format!("set k{i:04} {value}")).collect();
    commands.extend((0..50).map(|i| format!("set k0000 changed{i}")));
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (store, entries) = log(&refs);
    let config = SnapshotConfig {
        every_entries: 2000,
        keep_entries: 10,
        // About 2 MB of state in 1 KiB chunks: hundreds of pump steps.
        chunk_bytes: 1024,
        ..SnapshotConfig::default()
    };
    let mut fsm = fsm_over(&store, crate::daemon::EMBEDDED_KV, config);
    apply_all(&mut fsm, entries[..2000].to_vec());
    assert!(
        fsm.taking.is_some(),
        "a snapshot started at 2000 and is still being read"
    );
    for entry in &entries[2000..] {
        apply_all(&mut fsm, vec![entry.clone()]);
    }
    assert_eq!(
        fsm.applied(),
        2050,
        "every entry applied while the snapshot was in progress"
    );
    assert_eq!(get(&mut fsm, "k0000"), "changed49");
    fsm.wait_for_snapshot().unwrap();
    // The snapshot holds the state at 2000, not what was applied since.
    assert_eq!(stored_value(&store, "k0000"), (2000, value.clone()));
    assert_eq!(store.first_index().unwrap(), 1991, "compacted behind it");
    // A restart from it replays the rest.
    let mut restarted = fsm_over(&store, crate::daemon::EMBEDDED_KV, SnapshotConfig::default());
    apply_all(&mut restarted, entries[2000..].to_vec());
    assert_eq!(get(&mut restarted, "k0000"), "changed49");
    assert_eq!(get(&mut restarted, "k1999"), value);
}

/// The `snapshot` command is answered once a snapshot at or past the
/// index it was asked at is stored; one asked for with nothing new
/// applied is answered at once.
#[test]
fn a_requested_snapshot_is_answered_when_it_is_stored() {
    let (store, entries) = log(&["set a 1", "set b 2", "set c 3"]);
    let mut fsm = fsm_over(&store, crate::daemon::EMBEDDED_KV, SnapshotConfig::default());
    apply_all(&mut fsm, entries);
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Snapshot { reply: tx }).unwrap();
    fsm.wait_for_snapshot().unwrap();
    assert_eq!(rx.try_recv().unwrap(), Ok(3));
    assert_eq!(stored_value(&store, "c"), (3, "3".to_string()));
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Snapshot { reply: tx }).unwrap();
    assert_eq!(rx.try_recv().unwrap(), Ok(3), "nothing new: the stored one is current");
}

/// A trap while a snapshot is being read abandons it; the rebuilt
/// instance takes the next one, and nothing half-read is stored.
#[test]
fn a_trap_during_a_snapshot_abandons_it_and_the_next_one_is_whole() {
    let value = "v".repeat(1000);
    let mut commands: Vec<String> = (0..300).map(|i| format!("set k{i:03} {value}")).collect();
    commands.push("panic".to_string());
    commands.push("set after 1".to_string());
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (store, entries) = log(&refs);
    let config = SnapshotConfig {
        every_entries: 300,
        chunk_bytes: 512,
        ..SnapshotConfig::default()
    };
    let mut fsm = fsm_over(&store, EMBEDDED_CHAOS, config);
    apply_all(&mut fsm, entries[..300].to_vec());
    assert!(fsm.taking.is_some());
    let outcomes = apply_all(&mut fsm, entries[300..].to_vec());
    assert!(matches!(&outcomes[0], Err(CallError::Trap(_))), "{outcomes:?}");
    assert!(
        store.stored_snapshot().unwrap().is_none(),
        "the abandoned snapshot was not stored"
    );
    let (tx, mut rx) = oneshot::channel();
    fsm.handle(FsmRequest::Snapshot { reply: tx }).unwrap();
    fsm.wait_for_snapshot().unwrap();
    assert_eq!(rx.try_recv().unwrap(), Ok(302));
    let mut restarted = chaos_fsm(&store);
    assert_eq!(get(&mut restarted, "k299"), value);
    assert_eq!(get(&mut restarted, "after"), "1");
}

/// A snapshot costs in proportion to the state: the next periodic one
/// waits until the entries since the last hold `log_percent` of its
/// size, not only for `every_entries` of them.
#[test]
fn a_large_state_is_snapshotted_once_enough_was_written_since() {
    let value = "v".repeat(1000);
    let mut commands: Vec<String> = (0..1000).map(|i| format!("set k{i:04} {value}")).collect();
    commands.extend((0..400).map(|i| format!("set s{i} 1")));
    commands.extend((0..600).map(|i| format!("set k{i:04} {value}")));
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (store, entries) = log(&refs);
    let config = SnapshotConfig {
        every_entries: 100,
        log_percent: 50,
        ..SnapshotConfig::default()
    };
    let mut fsm = fsm_over(&store, crate::daemon::EMBEDDED_KV, config);
    let mut snapshots = Vec::new();
    for batch in entries.chunks(100) {
        apply_all(&mut fsm, batch.to_vec());
        fsm.wait_for_snapshot().unwrap();
        snapshots.push(fsm.snapshot_index);
    }
    snapshots.dedup();
    // Each large entry adds ~1 KB to the state: after a snapshot of n of
    // them, about n/2 more are written before the next (checked per
    // batch of 100): 100, 200, 400, 700. Then the 400 small writes add
    // almost nothing, so the next waits for 100 more large ones: 1500.
    // With entries counted alone there would be one every 100.
    assert_eq!(snapshots, [100, 200, 400, 700, 1500]);
}

fn epoch_entry(index: u64) -> Entry {
    Entry {
        index,
        term: 1,
        data: envelope::host(&HostEntry::Epoch).into(),
        ..Default::default()
    }
}

/// What a plugin keeps beyond its snapshot (its memory's size, the seed
/// Rust's `HashMap` caches) must not differ between a replica that ran
/// all along and one restored from a snapshot. At an epoch every replica
/// goes on from a fresh instance restored from the epoch's snapshot,
/// however it got there: applying live (the fresh instance takes over at
/// once, or catches up in the background first), starting from the
/// epoch's stored snapshot, or replaying after a trap (a handover at once).
#[test]
fn after_an_epoch_every_replica_runs_the_same_instance_however_it_got_there() {
    let log = vec![
        command(1, "probe first"),
        command(2, "grow 16"),
        command(3, "probe grown"),
        epoch_entry(4),
        command(5, "set a 1"),
        command(6, "probe after"),
        command(7, "panic"),
    ];
    let pages = |seen: &str| -> u64 { seen.split_whitespace().nth(1).unwrap().parse().unwrap() };

    // Live, the epoch complete before the entries after it.
    let live_store = store_with(&log);
    let mut live = fsm_logged(&live_store, EMBEDDED_CHAOS);
    apply_all(&mut live, log[..4].to_vec());
    live.wait_for_snapshot().unwrap();
    assert_eq!(
        live_store.snapshot_metadata().unwrap().index,
        4,
        "the epoch's snapshot is stored"
    );
    apply_all(&mut live, log[4..6].to_vec());
    let grown = get(&mut live, "grown");
    let after = get(&mut live, "after");
    assert!(
        pages(&after) < pages(&grown),
        "a fresh instance runs after the epoch: {grown} then {after}"
    );

    // Live, the entries after the epoch applied by the old instance first.
    let mut caught_up = fsm_logged(&store_with(&log), EMBEDDED_CHAOS);
    let outcomes = apply_all(&mut caught_up, log[..6].to_vec());
    caught_up.wait_for_snapshot().unwrap();
    assert!(caught_up.successor.is_none());
    let old = String::from_utf8(outcomes[5].clone().unwrap()).unwrap();
    assert!(
        pages(&old) >= pages(&grown),
        "the running instance answered the proposer: {old}"
    );
    assert_eq!(
        get(&mut caught_up, "after"),
        after,
        "the fresh instance caught up and took over"
    );

    let mut restored = fsm_logged(&live_store, EMBEDDED_CHAOS);
    assert_eq!(restored.applied(), 4);
    let restored_digest = restored.epochs.latest_digest();
    apply_all(&mut restored, log[4..6].to_vec());
    assert_eq!(get(&mut restored, "after"), after, "restored from the epoch's snapshot");

    let replay_store = store_with(&log);
    let mut replayed = fsm_logged(&replay_store, EMBEDDED_CHAOS);
    apply_all(&mut replayed, log.clone());
    assert!(
        replay_store.stored_snapshot().unwrap().is_none(),
        "the trap's rebuild replayed through the epoch"
    );
    assert_eq!(get(&mut replayed, "after"), after, "replayed through the epoch");
    assert_eq!(get(&mut replayed, "grown"), grown);

    let digest = live.epochs.latest_digest().expect("the live worker hashed its epoch");
    assert_eq!(digest.0, 4);
    assert_eq!(
        caught_up.epochs.latest_digest(),
        Some(digest),
        "the same state at the epoch"
    );
    assert_eq!(replayed.epochs.latest_digest(), Some(digest));
    assert_eq!(restored_digest, Some(digest), "restored from the epoch's snapshot");
    let stored = live_store.stored_snapshot().unwrap().expect("the epoch's snapshot");
    assert_eq!(
        digest.1,
        <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&stored.data)),
        "the digest is the SHA-256 of the snapshot as stored"
    );
}

/// Issue 16: the session table is replicated state, so the epoch's digest
/// covers it. Two replicas whose plugins hold the same state but whose
/// session tables differ (a host bug, a corrupt restore) are told apart.
#[test]
fn an_epoch_digest_covers_the_session_table_not_only_the_plugin_state() {
    let digest_after = |first: Entry| {
        let log = vec![first, command(2, "set a 1"), epoch_entry(3)];
        let store = store_with(&log);
        let mut fsm = fsm_logged(&store, EMBEDDED_KV);
        apply_all(&mut fsm, log);
        fsm.wait_for_snapshot().unwrap();
        assert_eq!(get(&mut fsm, "a"), "1");
        fsm.epochs.latest_digest().expect("a digest at the epoch")
    };
    let with_session = digest_after(session_entry(1, &HostEntry::OpenSession));
    let without = digest_after(Entry {
        index: 1,
        term: 1,
        ..Default::default()
    });
    assert_eq!(with_session.0, 3);
    assert_eq!(without.0, 3);
    assert_ne!(
        with_session.1, without.1,
        "the same plugin state, different session tables"
    );
}

/// An epoch whose snapshot traps is recorded like a trapped entry: the
/// rebuild that follows, and every replay after, skip it rather than
/// trap and rebuild again.
#[test]
fn an_epoch_whose_snapshot_traps_is_skipped_by_the_replays_after_it() {
    let log = vec![
        command(1, "set a 1"),
        command(2, "bad-snapshot"),
        epoch_entry(3),
        command(4, "set b 2"),
    ];
    let store = store_with(&log);
    let mut fsm = fsm_logged(&store, EMBEDDED_CHAOS);
    apply_all(&mut fsm, log.clone());
    assert!(store.traps(0, 10).unwrap().iter().any(|(index, _)| *index == 3));
    assert_eq!((get(&mut fsm, "a"), get(&mut fsm, "b")), ("1".into(), "2".into()));
    let mut restarted = fsm_logged(&store, EMBEDDED_CHAOS);
    apply_all(&mut restarted, log);
    assert_eq!(get(&mut restarted, "b"), "2");
}

fn session_entry(index: u64, entry: &HostEntry) -> Entry {
    Entry {
        index,
        term: 1,
        data: envelope::host(entry).into(),
        ..Default::default()
    }
}

fn in_session(index: u64, session: u64, seq: u64, text: &str) -> Entry {
    Entry {
        index,
        term: 1,
        data: envelope::session_command(session, seq, text.as_bytes()).into(),
        ..Default::default()
    }
}

/// Issue 16: a session's sequence applies once however often it is
/// retried, and every replica decides alike however it got its state:
/// live (the epoch's fresh instance taking over before the retry, or
/// catching up past it), restored from the epoch's snapshot (which holds
/// the session table), or replaying the log.
#[test]
fn a_session_command_applies_once_however_often_it_is_retried_and_wherever_a_replica_starts() {
    let log = vec![
        session_entry(1, &HostEntry::OpenSession),
        in_session(2, 1, 1, "incr n"),
        in_session(3, 1, 1, "incr n"),
        in_session(4, 1, 2, "incr n"),
        epoch_entry(5),
        in_session(6, 1, 2, "incr n"),
        in_session(7, 1, 3, "incr n"),
        in_session(8, 999, 1, "incr n"),
        command(9, "incr n"),
    ];
    let check = |outcomes: &[Result<Vec<u8>, CallError>], from: u64| {
        let expected: [(u64, Option<&str>); 8] = [
            (2, Some("1")),
            (3, Some("1")),
            (4, Some("2")),
            (5, None),
            (6, Some("2")),
            (7, Some("3")),
            (8, None),
            (9, Some("4")),
        ];
        for (i, outcome) in outcomes.iter().enumerate() {
            let index = from + i as u64;
            let Some((_, wanted)) = expected.iter().find(|(at, _)| *at == index) else {
                continue;
            };
            match wanted {
                Some(text) => assert_eq!(outcome, &Ok(text.as_bytes().to_vec()), "index {index}"),
                None if index == 8 => {
                    assert!(
                        matches!(outcome, Err(CallError::Guest(m)) if m.contains("unknown")),
                        "{outcome:?}"
                    )
                }
                None => {}
            }
        }
    };

    let live_store = store_with(&log);
    let mut live = fsm_logged(&live_store, EMBEDDED_KV);
    let first = apply_all(&mut live, log[..5].to_vec());
    assert_eq!(
        first[0],
        Ok(1u64.to_be_bytes().to_vec()),
        "the session's id is its entry's index"
    );
    check(&first, 1);
    live.wait_for_snapshot().unwrap();
    assert_eq!(live_store.snapshot_metadata().unwrap().index, 5);
    check(&apply_all(&mut live, log[5..].to_vec()), 6);
    assert_eq!(get(&mut live, "n"), "4");
    assert_eq!(live.sessions.usage().0, 1);

    // The retry at 6 is answered while the fresh instance catches up: it
    // must not apply it either.
    let mut caught_up = fsm_logged(&store_with(&log), EMBEDDED_KV);
    check(&apply_all(&mut caught_up, log.clone()), 1);
    caught_up.wait_for_snapshot().unwrap();
    caught_up.complete_epoch().unwrap();
    assert!(caught_up.successor.is_none());
    assert_eq!(get(&mut caught_up, "n"), "4");

    // From the epoch's snapshot: the table comes with it.
    let mut restored = fsm_logged(&live_store, EMBEDDED_KV);
    assert_eq!(restored.applied(), 5);
    check(&apply_all(&mut restored, log[5..].to_vec()), 6);
    assert_eq!(get(&mut restored, "n"), "4");
    assert_eq!(restored.sessions, live.sessions);

    let mut replayed = fsm_logged(&store_with(&log), EMBEDDED_KV);
    replayed.rebuild(9).unwrap();
    assert_eq!(get(&mut replayed, "n"), "4");
    assert_eq!(replayed.sessions, live.sessions);
}

/// Issue 16: the session table is the host's, not the plugin's: a hot swap
/// keeps it, so a retry after the swap is answered, not applied again by
/// the new plugin; a restart replays to the same table.
#[test]
fn sessions_survive_a_hot_swap_and_a_restart() {
    use crate::daemon::EMBEDDED_KV_V2;
    let mut log = vec![session_entry(1, &HostEntry::OpenSession), in_session(2, 1, 1, "incr n")];
    let swap = swap_entries(3, EMBEDDED_KV_V2);
    let after = 3 + swap.len() as u64;
    log.extend(swap);
    log.push(in_session(after, 1, 1, "incr n"));
    log.push(in_session(after + 1, 1, 2, "incr n"));
    let store = store_with(&log);
    let mut fsm = fsm_logged(&store, EMBEDDED_KV);
    let outcomes = apply_all(&mut fsm, log.clone());
    let last = outcomes.len();
    assert_eq!(outcomes[1], Ok(b"1".to_vec()));
    assert_eq!(
        outcomes[last - 2],
        Ok(b"1".to_vec()),
        "the retry after the swap applied again"
    );
    assert_eq!(outcomes[last - 1], Ok(b"2".to_vec()));
    let v2: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(EMBEDDED_KV_V2).into();
    assert_eq!(fsm.plugin.sha256(), v2);
    assert_eq!(get(&mut fsm, "n"), "2");

    let mut restarted = fsm_logged(&store, EMBEDDED_KV);
    restarted.rebuild(after + 1).unwrap();
    assert_eq!(get(&mut restarted, "n"), "2");
    assert_eq!(restarted.sessions, fsm.sessions);
}
