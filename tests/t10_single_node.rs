//! One node, end to end through the real binary: the quick-start promise,
//! durability across SIGKILL, and clear errors for bad input.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::*;

#[test]
fn a_bare_node_answers_set_with_ok_and_get_with_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n1"), &free_addr(), &[]);

    assert_eq!(node.propose("set a 1").unwrap(), "OK");
    assert_eq!(node.query("get a").unwrap(), "1");
    assert_eq!(node.query("get nothing").unwrap(), "(nil)");
    assert_eq!(node.propose("incr n 5").unwrap(), "5");
    assert_eq!(node.propose("append l x").unwrap(), "OK");
    assert_eq!(node.propose("append l y").unwrap(), "OK");
    assert_eq!(node.query("get l").unwrap(), "x y");
    assert_eq!(node.propose("del a").unwrap(), "1");
    assert_eq!(node.query("len").unwrap(), "2");
    let stale = cli(&["query", "get n", "--consistency", "stale", "--addr", &node.addr]);
    assert_eq!(stdout(&stale), "5");

    let status = node.status();
    assert_eq!(status["id"], 1);
    assert_eq!(status["role"], "leader");
    assert_eq!(status["leader_id"], 1);
    assert!(status["term"].as_u64().unwrap() >= 1);
    assert!(status["applied_index"].as_u64().unwrap() >= 6);
    assert_eq!(status["commit_index"], status["applied_index"]);
    assert_eq!(status["plugin_sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn a_file_of_commands_is_pipelined_and_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n1"), &free_addr(), &[]);
    let commands: String = (1..=300).map(|i| format!("incr c\nappend log {i}\n")).collect();
    let file = dir.path().join("commands.txt");
    std::fs::write(&file, &commands).unwrap();

    let out = cli(&["propose", "--file", file.to_str().unwrap(), "--addr", &node.addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    let expected: Vec<String> = (1..=300).flat_map(|i| [i.to_string(), "OK".to_string()]).collect();
    assert_eq!(lines, expected);
    let order: Vec<String> = (1..=300).map(|i| i.to_string()).collect();
    assert_eq!(
        node.query("get log").unwrap(),
        order.join(" "),
        "entries entered the log in file order"
    );

    // stdin works too, and a failing line fails the command but not the rest.
    let out = cli_with_stdin(
        &["propose", "--file", "-", "--addr", &node.addr],
        Some(b"set x 1\nfrob\nset y 2\n"),
    );
    assert!(!out.status.success());
    assert_eq!(stdout(&out), "OK\nOK");
    assert!(stderr(&out).contains("unknown command"), "{}", stderr(&out));
}

#[test]
fn every_acknowledged_write_survives_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let addr = free_addr();
    let mut node = Node::start(&data, &addr, &[]);

    // Write in the background and kill the node while the writes stream in.
    let commands: String = (0..20_000).map(|i| format!("set k{i} v{i}\n")).collect();
    let file = dir.path().join("writes.txt");
    std::fs::write(&file, commands).unwrap();
    let writer = {
        let addr = addr.clone();
        let file = file.clone();
        // The only node dies: retrying its session for long is pointless.
        std::thread::spawn(move || {
            cli(&[
                "propose",
                "--file",
                file.to_str().unwrap(),
                "--addr",
                &addr,
                "--retry-for-ms",
                "1000",
            ])
        })
    };
    wait_until(Duration::from_secs(60), "some writes to be applied", || {
        node.status_u64("applied_index") > 500
    });
    node.kill();
    let out = writer.join().unwrap();
    let acknowledged = stdout(&out).lines().filter(|l| *l == "OK").count();
    assert!(acknowledged > 0, "no write was acknowledged before the kill");
    assert!(acknowledged < 20_000, "the kill came too late to test anything");

    // Restart with only the data dir and the address.
    let node = Node::start(&data, &addr, &[]);
    // Responses arrive in order, so the acknowledged writes are a prefix.
    for i in (0..acknowledged).step_by(97).chain([acknowledged - 1]) {
        assert_eq!(
            node.query(&format!("get k{i}")).unwrap(),
            format!("v{i}"),
            "lost acknowledged write k{i}"
        );
    }
    let len: usize = node.query("len").unwrap().parse().unwrap();
    assert!(len >= acknowledged, "{len} keys but {acknowledged} acknowledged writes");
}

#[test]
fn sigterm_and_sigint_stop_a_node_cleanly_and_a_restart_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let addr = free_addr();
    for (i, signal) in ["-TERM", "-INT"].into_iter().enumerate() {
        let mut node = Node::start(&data, &addr, &[]);
        if i > 0 {
            assert_eq!(node.query("get kept0").unwrap(), "yes", "lost after {signal}");
        }
        node.propose(&format!("set kept{i} yes")).unwrap();
        node.signal(signal);
        let status = node.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "{signal}: exit status {status}; log:\n{}",
            node.log_text()
        );
        assert!(node.log_text().contains("stopped"), "{signal}: {}", node.log_text());
    }
    let node = Node::start(&data, &addr, &[]);
    assert_eq!(node.query("get kept0").unwrap(), "yes");
    assert_eq!(node.query("get kept1").unwrap(), "yes");
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let first = Node::start(&data, &free_addr(), &[]);
    first.propose("set mine 1").unwrap();

    let mut second = Node::spawn(&data, &free_addr(), &[]);
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "a second node ran on the same data dir");
    let log = second.log_text();
    assert!(log.contains("is in use by another raftify-host process"), "{log}");
    assert_eq!(first.propose("set mine 2").unwrap(), "OK");
    assert_eq!(first.query("get mine").unwrap(), "2");
    assert_eq!(first.status()["trapped_entries"], 0);
}

#[test]
fn a_restart_with_another_plugin_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let addr = free_addr();
    let mut node = Node::start(&data, &addr, &[]);
    node.propose("set kept yes").unwrap();
    let plugin = node.status()["plugin_sha256"].clone();
    node.terminate(Duration::from_secs(10));

    let other = dir.path().join("kv-v2.wasm");
    std::fs::write(&other, raftify_host::daemon::EMBEDDED_KV_V2).unwrap();
    let mut refused = Node::spawn(&data, &addr, &["--plugin", other.to_str().unwrap()]);
    let status = refused.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "restarted with another --plugin");
    let log = refused.log_text();
    assert!(log.contains("this data dir runs plugin"), "{log}");
    assert!(log.contains("drop --plugin"), "{log}");

    let node = Node::start(&data, &addr, &[]);
    assert_eq!(node.status()["plugin_sha256"], plugin);
    assert_eq!(node.query("get kept").unwrap(), "yes");
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "id = 3\n").unwrap();
    let config = file.to_str().unwrap();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], u64);
    let cases: [Case; 3] = [
        (&["--config", config, "--id", "1"], &[("RAFTIFY_ID", "2")], 1),
        (&["--config", config], &[("RAFTIFY_ID", "2")], 2),
        (&["--config", config], &[], 3),
    ];
    for (n, (flags, env, id)) in cases.into_iter().enumerate() {
        // A new data dir each time: the id is chosen when a node is made.
        let data = dir.path().join(format!("n{n}"));
        let node = Node::spawn_with_env(&data, &free_addr(), flags, env);
        node.wait_ready();
        assert_eq!(node.status()["id"], id, "flags {flags:?}, environment {env:?}");
    }
}

#[test]
fn a_restarted_node_needs_only_its_data_dir_and_keeps_its_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n7");
    let addr = free_addr();
    let mut node = Node::start(&data, &addr, &["--id", "7"]);
    node.propose("set kept yes").unwrap();
    let before = node.status();
    node.kill();

    let node = Node::start(&data, &addr, &[]);
    let after = node.status();
    assert_eq!(after["id"], 7);
    assert_eq!(after["plugin_sha256"], before["plugin_sha256"]);
    assert_eq!(node.query("get kept").unwrap(), "yes");
}

#[test]
fn bad_commands_get_one_clear_error_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n1"), &free_addr(), &["--max-proposal-bytes", "1000"]);

    let cases: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("unknown command", vec!["propose", "frob a"]),
        ("usage: set KEY VALUE", vec!["propose", "set a"]),
        ("is a query", vec!["propose", "get a"]),
        ("is a proposal", vec!["query", "set a 1"]),
    ]);
    for (expected, args) in cases {
        let mut args = args.clone();
        args.extend(["--addr", &node.addr]);
        let out = cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.starts_with("error: ") && err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "more than one line: {err}");
    }

    node.propose("set n notanumber").unwrap();
    assert!(node.propose("incr n").unwrap_err().contains("not an integer"));

    let big = format!("set big {}", "x".repeat(5000));
    let err = node.propose(&big).unwrap_err();
    assert!(err.contains("limit is 1000"), "{err}");

    let dead = cli(&["status", "--addr", &free_addr(), "--timeout-ms", "2000"]);
    assert!(!dead.status.success());
    assert!(stderr(&dead).starts_with("error: cannot connect"), "{}", stderr(&dead));

    // The node is unharmed.
    assert_eq!(node.propose("set still alive").unwrap(), "OK");
}

#[test]
fn bad_run_flags_and_bad_plugins_fail_fast_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm").unwrap();
    let garbage = garbage.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--election-ticks", "2", "--heartbeat-ticks", "2"],
            "election_ticks",
        ),
        (vec!["--id", "0"], "positive"),
        (vec!["--plugin", "/no/such/plugin.wasm"], "cannot read the plugin"),
        (vec!["--plugin", &garbage], "not a valid WebAssembly component"),
        (vec!["--peers", "1=nowhere"], "HOST:PORT"),
    ];
    for (flags, expected) in cases {
        let mut node = Node::spawn(&data, &free_addr(), &flags);
        let status = node.wait_exit(Duration::from_secs(60));
        assert!(!status.success(), "{flags:?} started");
        let log = node.log_text();
        assert!(log.contains(expected), "{flags:?}: expected {expected:?} in:\n{log}");
        assert!(!log.contains("panicked"), "{flags:?} panicked:\n{log}");
    }
    // None of that left a half-made node behind: a good start works and is node 1.
    let node = Node::start(&data, &free_addr(), &[]);
    assert_eq!(node.status()["id"], 1);
    assert_eq!(node.propose("set a 1").unwrap(), "OK");
}

#[test]
fn an_overloaded_node_answers_busy_and_keeps_exactly_the_writes_it_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // One proposal may wait for commit at a time; 32 clients want more.
    let node = Node::start(&dir.path().join("n1"), &free_addr(), &["--max-pending-proposals", "1"]);

    let out = cli(&[
        "bench",
        "--addr",
        &node.addr,
        "--clients",
        "32",
        "--requests",
        "2000",
        "-o",
        "json",
        // Without sessions, whose retries would wait the busy spells out.
        "--no-session",
    ]);
    // Errors make the bench exit 1; its report is on stdout all the same.
    assert_eq!(out.status.code(), Some(1), "bench: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (ok, errors) = (report["ok"].as_u64().unwrap(), report["errors"].as_u64().unwrap());
    assert_eq!(ok + errors, 2000);
    assert!(errors > 0, "32 clients never found the node busy: {report}");
    assert!(report["first_error"].as_str().unwrap().contains("busy"), "{report}");

    // A busy answer means "never proposed": each accepted write set its
    // own key, and nothing else landed.
    assert_eq!(node.query("len").unwrap(), ok.to_string());
    assert_eq!(node.propose("set after 1").unwrap(), "OK");
}

/// A node whose log cannot be written (its disk is full, or its output a
/// closed pipe) serves on: a failed log write made tracing-subscriber
/// report it with `eprintln!`, which panicked, and the panic stopped the
/// apply worker; the startup line was a `println!` that did the same.
#[test]
fn a_node_whose_output_cannot_be_written_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let node = Node::spawn_logging_to(
        std::path::Path::new("/dev/full"),
        None,
        &dir.path().join("n1"),
        &addr,
        &[],
        &[],
    );
    node.wait_ready();
    assert_eq!(node.propose("set a 1").unwrap(), "OK");
    let out = node.cli(&["snapshot", "--addr", &addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(node.propose("set b 2").unwrap(), "OK");
    assert_eq!(node.query("get a").unwrap(), "1");
    // The apply worker goes on: all that is committed gets applied. (A
    // proposer hears of its entry before the raft loop, which `status`
    // reads, learns the new applied index, so this is waited for.)
    wait_until(Duration::from_secs(10), "every committed entry to be applied", || {
        let status = node.status();
        status["applied_index"] == status["commit_index"]
    });
}

/// `--log-format json`: every log line is one JSON object with its level,
/// target and fields (the entry index among them), for log collectors.
#[test]
fn json_logs_are_one_object_per_line_with_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n1"), &free_addr(), &["--log-format", "json"]);
    assert_eq!(node.propose("set a 1").unwrap(), "OK");
    wait_until(Duration::from_secs(10), "the limits line", || {
        node.log_text().contains("sandbox limits recorded by the cluster")
    });
    let log = node.log_text();
    let mut recorded = None;
    for line in log.lines().filter(|l| !l.starts_with("raftify-host listening on")) {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string() && value["target"].is_string(), "{line}");
        if value["message"] == "sandbox limits recorded by the cluster" {
            recorded = Some(value);
        }
    }
    let recorded = recorded.expect("the limits line");
    assert!(recorded["index"].as_u64().is_some_and(|i| i > 0), "{recorded}");
}

/// Issue 16: `Client::propose_text` is exactly-once by default. The client
/// opens a session on its first proposal and keeps it; a clone starts
/// without one (two clients never share sequence numbers). When the
/// cluster forgets the session (here a full table drops it, as the least
/// recently used), a command answered "unknown session" at its first
/// attempt was not applied, so the client opens a new session and sends
/// it again: it applies once.
#[test]
fn a_clients_default_session_is_kept_and_opened_again_when_the_cluster_forgets_it() {
    use raftify_host::client::Client;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n1"), &free_addr(), &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(&node.addr, Duration::from_secs(10)).await.unwrap();
        assert!(client.session().is_none(), "opened on first use");
        assert_eq!(client.propose_text("append l a").await.unwrap().rendered(), "OK");
        let first = client.session().expect("a session").id();
        assert_eq!(client.propose_text("append l b").await.unwrap().rendered(), "OK");
        assert_eq!(client.session().unwrap().id(), first, "kept");
        assert!(client.clone().session().is_none(), "a clone has its own");

        // 1,024 sessions opened by others: the table is full, and this
        // client's, the least recently used, is dropped.
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let mut raw = client.raw();
                tokio::spawn(async move {
                    for _ in 0..128 {
                        raw.open_session(raftify_host::proto::OpenSessionRequest {})
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for open in opens {
            open.await.unwrap();
        }
        assert_eq!(client.propose_text("append l c").await.unwrap().rendered(), "OK");
        assert_ne!(client.session().unwrap().id(), first, "a new session");

        let mut plain = client.clone().without_sessions();
        assert_eq!(plain.propose_text("append l d").await.unwrap().rendered(), "OK");
        assert!(plain.session().is_none());
    });
    assert_eq!(node.query("get l").unwrap(), "a b c d", "each applied once");
    assert_eq!(node.status()["sessions"], 1024);
}
