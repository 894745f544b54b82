//! Logging: one `tracing` subscriber for the node, with raft-rs's `slog`
//! output routed into it.

use std::fmt::Write as _;

use slog::{Drain, KV};

/// Install the process-wide subscriber. `filter` is an `EnvFilter` directive
/// (e.g. `info,raft=warn`); `RAFTIFY_LOG` overrides it.
pub fn init(filter: &str) {
    let filter = std::env::var("RAFTIFY_LOG").unwrap_or_else(|_| filter.to_string());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}

/// A slog logger whose records become `tracing` events with target `raft`.
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}

struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let message = format!("{}{}", record.msg(), fields.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{message}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}"),
            slog::Level::Info => tracing::info!(target: "raft", "{message}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{message}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{message}"),
        }
        Ok(())
    }
}

struct Fields(String);

impl slog::Serializer for Fields {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}
