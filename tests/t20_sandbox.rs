//! A hostile plugin through the real binary: a loop, a memory hog and a
//! panic each get an error back while the node keeps serving and keeps its
//! state, before and after a restart.

mod support;

use support::*;

fn chaos_plugin(dir: &std::path::Path) -> String {
    let path = dir.join("chaos.wasm");
    std::fs::write(&path, raftify_host::daemon::EMBEDDED_CHAOS).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn hostile_entries_fail_alone_and_the_node_keeps_serving_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = chaos_plugin(dir.path());
    let data = dir.path().join("n1");
    let addr = free_addr();
    let limits = [
        "--plugin",
        plugin.as_str(),
        "--fuel-per-call",
        "300000000",
        "--max-memory-bytes",
        "16777216",
    ];
    let mut node = Node::start(&data, &addr, &limits);

    assert_eq!(node.propose("set a 1").unwrap(), "OK");
    let err = node.propose("spin").unwrap_err();
    assert!(err.contains("plugin trapped: out of fuel"), "{err}");
    let err = node.propose("hog").unwrap_err();
    assert!(err.contains("plugin trapped: out of memory"), "{err}");
    let err = node.propose("panic").unwrap_err();
    assert!(err.contains("plugin trapped: the plugin panicked"), "{err}");
    let err = node.propose("set-then-panic b 2").unwrap_err();
    assert!(err.contains("panicked"), "{err}");
    let err = node.propose("fail").unwrap_err();
    assert_eq!(err, "error: chaos: asked to fail");
    let err = node.query("spin").unwrap_err();
    assert!(err.contains("out of fuel"), "{err}");

    assert_eq!(node.propose("set c 3").unwrap(), "OK");
    assert_eq!(node.query("get a").unwrap(), "1");
    assert_eq!(node.query("get b").unwrap(), "(nil)");
    assert_eq!(node.query("get c").unwrap(), "3");
    assert_eq!(node.status()["trapped_entries"], 4);
    assert_eq!(node.status()["role"], "leader");

    // A restart replays the log, skips the recorded traps, and agrees.
    node.kill();
    let node = Node::start(&data, &addr, &[]);
    assert_eq!(node.query("get a").unwrap(), "1");
    assert_eq!(node.query("get b").unwrap(), "(nil)");
    assert_eq!(node.query("get c").unwrap(), "3");
    assert_eq!(node.status()["trapped_entries"], 4);
}
