//! raftify-host: a Raft replicated-state-machine host whose state machine is
//! a sandboxed WebAssembly component. ARCHITECTURE.md is the codemap.
//!
//! The binary, `raftify-host`, runs a node and talks to one. This crate
//! also runs nodes inside a Rust program, as raftify's `Raft::bootstrap`
//! and `raft.propose` do: start a node with a plugin, let a second join it,
//! propose through the leader's handle and read the result back.
//!
//! ```no_run
//! use std::time::Duration;
//! use raftify_host::{Consistency, Node, NodeConfig};
//!
//! # async fn guide() -> anyhow::Result<()> {
//! // A one-node cluster on 127.0.0.1:7001 running the embedded kv plugin
//! // (set `plugin` to run a component of your own).
//! let mut config = NodeConfig::new("127.0.0.1:7001", "data/n1")?;
//! config.plugin = None;
//! let first = Node::start(config).await?;
//! first.handle().wait_for_leader(Duration::from_secs(10)).await?;
//!
//! // A second node joins through the first; the cluster gives it an id,
//! // and promotes it to voter once it has caught up.
//! let mut config = NodeConfig::new("127.0.0.1:7002", "data/n2")?;
//! config.join = Some(first.addr().to_string());
//! let second = Node::start(config).await?;
//!
//! // Propose on the leader, in process; read on any node.
//! let applied = first.handle().propose("set greeting hello").await?;
//! println!("applied at index {}: {}", applied.index, applied.text);
//! let read = second.handle().query("get greeting", Consistency::Linearizable).await?;
//! assert_eq!(read.text, "hello");
//!
//! // Watch instead of polling: the second node's applied index reaches
//! // the write (and `leadership()` changes with each election).
//! second.handle().applied_index().wait_for(|&i| i >= applied.index).await?;
//!
//! second.stop().await?;
//! first.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! `host/examples/embedded.rs` runs three nodes this way.

pub mod api;
pub mod auth;
pub(crate) mod background;
pub(crate) mod backup;
pub mod cli;
pub mod client;
#[cfg(test)]
mod cluster_tests;
pub(crate) mod codec;
pub(crate) mod conf_change;
pub mod config;
pub mod daemon;
pub(crate) mod debug;
pub mod dial;
pub mod envelope;
pub(crate) mod epochs;
pub(crate) mod firewall;
pub(crate) mod fsm;
pub(crate) mod health;
pub(crate) mod limits;
pub(crate) mod listener;
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod node;
pub(crate) mod outcome;
pub(crate) mod plugin_id;
pub(crate) mod readiness;
pub mod sandbox;
pub(crate) mod server;
pub(crate) mod sessions;
pub mod snapshot;
pub(crate) mod space;
pub(crate) mod storage;
pub mod tls;
pub(crate) mod transport;

pub use api::{
    Applied, Consistency, Error, ErrorKind, Leadership, Node, NodeHandle, NodeStatus, PluginFailure, Session, Watch,
};
pub use config::NodeConfig;

/// Generated gRPC code (proto/raftify.proto).
pub mod proto {
    tonic::include_proto!("raftify.v1");

    /// The result's text as the plugin rendered it: `text`, or the result's
    /// own bytes when the answer says they are the text (`text_is_ok`: a
    /// large payload is never sent twice).
    fn rendered<'a>(text: &'a str, text_is_ok: bool, ok: Option<&'a [u8]>) -> std::borrow::Cow<'a, str> {
        match ok {
            Some(bytes) if text_is_ok => String::from_utf8_lossy(bytes),
            _ => std::borrow::Cow::Borrowed(text),
        }
    }

    impl ProposeResponse {
        pub fn rendered(&self) -> std::borrow::Cow<'_, str> {
            let ok = match &self.outcome {
                Some(propose_response::Outcome::Ok(bytes)) => Some(bytes.as_slice()),
                _ => None,
            };
            rendered(&self.text, self.text_is_ok, ok)
        }
    }

    impl QueryResponse {
        pub fn rendered(&self) -> std::borrow::Cow<'_, str> {
            let ok = match &self.outcome {
                Some(query_response::Outcome::Ok(bytes)) => Some(bytes.as_slice()),
                _ => None,
            };
            rendered(&self.text, self.text_is_ok, ok)
        }
    }
}

/// The layers ARCHITECTURE.md draws import each other one way only:
/// `tests/support/import_circles.py` finds no circle among the top-level
/// modules' non-test code (before the redesign of issue 17 it found two).
#[cfg(test)]
#[test]
fn no_import_circles_between_top_level_modules() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new("python3")
        .arg(root.join("../tests/support/import_circles.py"))
        .arg(root.join("src"))
        .output()
        .expect("python3 runs the import-circle check");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && report.contains(" 0 circles"), "{report}");
}
