//! Hot-swapping the plugin in a running cluster through the real binary.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raftify_host::client::Client;
use raftify_host::daemon::{EMBEDDED_CHAOS, EMBEDDED_HELLO, EMBEDDED_KV, EMBEDDED_KV_V2};
use raftify_host::proto::propose_response;
use sha2::Digest;
use support::*;

fn plugin_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// What the writer saw: the acknowledged N with the time of each
/// acknowledgement, and the writes that failed.
struct Writes {
    acked: Vec<(u64, Instant)>,
    failed: Vec<String>,
}

/// Sets the flag when dropped, so a failing test stops its writer too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Writes `set wN N` until stopped, counting every failure.
fn writer(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Writes> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let mut client = Client::connect(&addr, Duration::from_secs(10)).await.unwrap();
            let mut writes = Writes {
                acked: Vec::new(),
                failed: Vec::new(),
            };
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match client.propose_text(&format!("set w{n} {n}")).await {
                    Ok(response) if matches!(response.outcome, Some(propose_response::Outcome::Ok(_))) => {
                        writes.acked.push((n, Instant::now()));
                    }
                    Ok(response) => writes.failed.push(format!("w{n}: {:?}", response.outcome)),
                    Err(error) => writes.failed.push(format!("w{n}: {error}")),
                }
            }
            writes
        })
    })
}

#[test]
fn a_cluster_swaps_kv_for_kv_v2_under_writes_and_every_replica_follows() {
    let mut cluster = Cluster::start(
        3,
        &[
            "--snapshot-every-entries",
            "2000",
            "--snapshot-keep-entries",
            "100",
            "--snapshot-log-percent",
            "0",
        ],
    );
    let dir = cluster.dir.path().to_path_buf();
    let v2 = plugin_file(&dir, "kv-v2.wasm", EMBEDDED_KV_V2);
    let kv = plugin_file(&dir, "kv.wasm", EMBEDDED_KV);
    let leader = cluster.leader();
    let leader_addr = cluster.node(leader).addr.clone();

    // About 10 MB of state, so the swap has something to carry over.
    let value = "v".repeat(1_000_000);
    let lines: String = (0..10).map(|i| format!("set big{i} {value}\n")).collect();
    let file = dir.join("big.txt");
    std::fs::write(&file, lines).unwrap();
    assert!(
        cli(&["propose", "--file", file.to_str().unwrap(), "--addr", &leader_addr])
            .status
            .success()
    );
    let err = cluster.node(leader).query("strlen big0").unwrap_err();
    assert!(err.contains("unknown command"), "kv should not know strlen yet: {err}");

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_writer = StopOnDrop(stop.clone());
    let writes = writer(leader_addr.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500)); // let writes flow before the swap
    let swap_started = Instant::now();
    let out = cli(&[
        "plugin",
        "swap",
        &v2,
        "--addr",
        &cluster.node(cluster.followers()[0]).addr,
    ]);
    let swap_done = Instant::now();
    assert!(out.status.success(), "swap failed: {}", stderr(&out));
    assert!(stdout(&out).contains(&sha(EMBEDDED_KV_V2)), "{}", stdout(&out));
    // Two phases, told as they go: every voter compiled it before the
    // swap entry was proposed, off its apply thread.
    let progress = stderr(&out);
    for step in ["sent ", "compiled on 3 of 3 voters", "activated at index"] {
        assert!(progress.contains(step), "no {step:?} in {progress}");
    }
    for id in [1, 2, 3] {
        let log = cluster.node(id).log_text();
        assert!(log.contains("prepared a plugin for its swap"), "node {id}: {log}");
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let Writes { acked, failed } = writes.join().unwrap();
    // Writes went on through the swap: none failed, some were acknowledged
    // after it, and none waited long (chunks let the swap share the log).
    assert!(
        failed.is_empty(),
        "{} writes failed during the swap; the first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        acked.iter().any(|(_, at)| *at > swap_done),
        "no write was acknowledged after the swap"
    );
    let longest_gap = acked
        .windows(2)
        .filter(|w| w[1].1 >= swap_started && w[0].1 <= swap_done + Duration::from_secs(1))
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    eprintln!(
        "swap of a ~10 MB kv state: swap call took {:?}; longest gap between acknowledged writes around it {:?}; {} writes acknowledged",
        swap_done - swap_started,
        longest_gap,
        acked.len()
    );
    assert!(
        longest_gap < Duration::from_secs(10),
        "writes stalled for {longest_gap:?} around the swap"
    );

    let commit = cluster.node(leader).status()["commit_index"].as_u64().unwrap();
    for id in [1, 2, 3] {
        cluster.wait_applied(id, commit);
        assert_eq!(cluster.node(id).status()["plugin_sha256"], sha(EMBEDDED_KV_V2));
        assert_eq!(cluster.stale(id, "strlen big3"), "1000000");
        for (n, _) in acked.iter().step_by(37).chain(acked.last()) {
            assert_eq!(
                cluster.stale(id, &format!("get w{n}")),
                n.to_string(),
                "node {id} lost w{n}"
            );
        }
    }
    let list = stdout(&cli(&["plugin", "list", "--addr", &leader_addr]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(
        lines[0].starts_with(&sha(EMBEDDED_KV)) && lines[0].contains("from index 0"),
        "{list}"
    );
    assert!(
        lines[1].starts_with(&sha(EMBEDDED_KV_V2)) && lines[1].ends_with("current"),
        "{list}"
    );

    // A restarted node runs kv-v2.
    let restarted = cluster.followers()[1];
    cluster.kill(restarted);
    cluster.restart(restarted);
    cluster.wait_applied(restarted, commit);
    assert_eq!(cluster.node(restarted).status()["plugin_sha256"], sha(EMBEDDED_KV_V2));
    assert_eq!(cluster.stale(restarted, "strlen big9"), "1000000");

    // A node that joins after a snapshot past the swap runs kv-v2 too (it
    // fetches the plugin the snapshot names).
    for id in [1, 2, 3] {
        assert!(cli(&["snapshot", "--addr", &cluster.node(id).addr]).status.success());
    }
    let joined = cluster.join(4, leader, &[]).status()["id"].as_u64().unwrap();
    let commit = cluster.node(leader).status()["commit_index"].as_u64().unwrap();
    cluster.wait_applied(joined, commit);
    assert_eq!(cluster.node(joined).status()["plugin_sha256"], sha(EMBEDDED_KV_V2));
    assert_eq!(cluster.stale(joined, "strlen big1"), "1000000");
    // It joined with the cluster's first plugin; kv-v2 came by the fetch path.
    let log = cluster.node(joined).log_text();
    assert!(
        log.contains("fetched the plugin of an incoming snapshot from a member"),
        "{log}"
    );

    // And back to kv: strlen is gone again, the keys stay.
    let out = cli(&["plugin", "swap", &kv, "--addr", &leader_addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let commit = cluster.node(leader).status()["commit_index"].as_u64().unwrap();
    for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
        cluster.wait_applied(id, commit);
        assert_eq!(cluster.node(id).status()["plugin_sha256"], sha(EMBEDDED_KV));
        assert_eq!(cluster.stale(id, "get w1"), "1");
    }
    assert!(cluster.node(leader).query("strlen big0").is_err());
}

#[test]
fn bad_swaps_are_rejected_and_the_old_plugin_keeps_serving() {
    let cluster = Cluster::start(3, &["--max-plugin-bytes", "1048576"]);
    let dir = cluster.dir.path().to_path_buf();
    let leader = cluster.leader();
    let addr = cluster.node(leader).addr.clone();
    cluster.node(leader).propose("set kept 1").unwrap();
    let cases = [
        (
            plugin_file(&dir, "garbage.wasm", b"not a component"),
            "not a valid WebAssembly component",
        ),
        (plugin_file(&dir, "hello.wasm", EMBEDDED_HELLO), "world"),
        (plugin_file(&dir, "chaos.wasm", EMBEDDED_CHAOS), "restore() failed"),
    ];
    for (file, expected) in &cases {
        let out = cli(&["plugin", "swap", file, "--addr", &addr]);
        assert!(!out.status.success(), "{file} was accepted");
        let err = stderr(&out);
        assert!(
            err.contains("plugin swap rejected") && err.contains(expected),
            "{file}: {err}"
        );
    }
    // A valid component over --max-plugin-bytes never reaches the log.
    let big = plugin_file(&dir, "big.wasm", &padded(EMBEDDED_KV_V2, 2 << 20));
    let err = outcome(cli(&["plugin", "swap", &big, "--addr", &addr])).unwrap_err();
    assert!(err.contains("the limit is 1048576 (max_plugin_bytes)"), "{err}");
    let missing = cli(&["plugin", "swap", "/no/such.wasm", "--addr", &addr]);
    assert!(stderr(&missing).contains("cannot read"), "{}", stderr(&missing));

    let commit = cluster.node(leader).status()["commit_index"].as_u64().unwrap();
    for id in [1, 2, 3] {
        cluster.wait_applied(id, commit);
        assert_eq!(cluster.node(id).status()["plugin_sha256"], sha(EMBEDDED_KV));
        assert_eq!(cluster.stale(id, "get kept"), "1");
    }
    assert_eq!(cluster.node(leader).propose("set still 2").unwrap(), "OK");
    assert_eq!(stdout(&cli(&["plugin", "list", "--addr", &addr])).lines().count(), 1);
}

/// `component` with a custom section of `pad` bytes appended: still valid,
/// same behaviour, as large as a Python or JS runtime build.
fn padded(component: &[u8], pad: usize) -> Vec<u8> {
    let name = b"raftify-test-padding";
    let payload = 1 + name.len() + pad;
    let mut out = component.to_vec();
    out.push(0); // custom section
    let mut size = payload as u64;
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.resize(out.len() + pad, 0);
    out
}

#[test]
fn a_20_mb_component_gets_through_the_log() {
    let cluster = Cluster::start(3, &[]);
    let big = padded(EMBEDDED_KV_V2, 20 << 20);
    let file = plugin_file(cluster.dir.path(), "kv-v2-padded.wasm", &big);
    let leader = cluster.leader();
    cluster.node(leader).propose("set before big").unwrap();
    let term = cluster.node(leader).status()["term"].clone();
    let out = cli(&[
        "plugin",
        "swap",
        &file,
        "--addr",
        &cluster.node(leader).addr,
        "--timeout-ms",
        "60000",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let commit = cluster.node(leader).status()["commit_index"].as_u64().unwrap();
    for id in [1, 2, 3] {
        cluster.wait_applied(id, commit);
        assert_eq!(cluster.node(id).status()["plugin_sha256"], sha(&big));
        assert_eq!(cluster.stale(id, "strlen before"), "3");
    }
    // Its chunks shared the log with heartbeats: no election came of it.
    assert_eq!(cluster.leader(), leader);
    for id in [1, 2, 3] {
        assert_eq!(cluster.node(id).status()["term"], term, "node {id}");
    }
}

/// Issue 13: a swap's entry applied on every node at once, and a node that
/// could not compile the component paused or failed there. The swap entry
/// is proposed only once every voter compiled the component; a voter that
/// never reports it fails the swap by name, and nothing switches.
#[test]
fn a_swap_waits_for_every_voter_and_names_the_one_that_never_reports() {
    let mut cluster = Cluster::start(3, &["--swap-ready-timeout-ms", "3000"]);
    let dir = cluster.dir.path().to_path_buf();
    let v2 = plugin_file(&dir, "kv-v2.wasm", EMBEDDED_KV_V2);
    let leader = cluster.leader();
    let down = cluster.followers()[0];
    cluster.kill(down);
    cluster.node(leader).propose("set a 1").unwrap();
    let out = cli(&["plugin", "swap", &v2, "--addr", &cluster.node(leader).addr]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "node {down} has not reported the component compiled within 3000 ms"
        )),
        "{err}"
    );
    assert!(err.contains("no swap entry was proposed"), "{err}");
    for id in cluster.nodes.keys() {
        assert_eq!(
            cluster.node(*id).status()["plugin_sha256"],
            sha(EMBEDDED_KV),
            "node {id}"
        );
    }
    // Back up, the node catches up and compiles it; the swap goes through.
    cluster.restart(down);
    cluster.node(down).wait_ready();
    cluster.wait_applied(down, cluster.node(leader).status_u64("commit_index"));
    let out = cli(&["plugin", "swap", &v2, "--addr", &cluster.node(leader).addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("compiled on 3 of 3 voters"), "{}", stderr(&out));
    let commit = cluster.node(leader).status_u64("commit_index");
    for id in [1, 2, 3] {
        cluster.wait_applied(id, commit);
        assert_eq!(
            cluster.node(id).status()["plugin_sha256"],
            sha(EMBEDDED_KV_V2),
            "node {id}"
        );
        assert_eq!(cluster.stale(id, "strlen a"), "1");
    }
}
