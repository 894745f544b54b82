//! raftify-host: a Raft replicated-state-machine host whose state machine is
//! a sandboxed WebAssembly component. ARCHITECTURE.md is the codemap.

pub mod auth;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod debug;
pub mod dial;
pub mod envelope;
pub mod epochs;
pub mod etcd;
pub mod firewall;
pub mod fsm;
pub mod health;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod readiness;
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
