//! raftify-host: a Raft replicated-state-machine host whose state machine is
//! a sandboxed WebAssembly component. ARCHITECTURE.md is the codemap.

pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod debug;
pub mod dial;
pub mod envelope;
pub mod firewall;
pub mod fsm;
pub mod listener;
pub mod logging;
pub mod node;
pub mod sandbox;
pub mod server;
pub mod snapshot;
pub mod space;
pub mod storage;
pub mod tls;
pub mod transport;

/// Generated gRPC code (proto/raftify.proto).
pub mod proto {
    tonic::include_proto!("raftify.v1");
}
