//! Logging: one `tracing` subscriber for the node, with raft-rs's `slog`
//! output routed into it.

use std::fmt::Write as _;

use slog::{Drain, KV};

/// The target raft-rs's records carry. Not `raft`: `EnvFilter` matches
/// targets by prefix, so a `raft=warn` directive would silence
/// `raftify_host` too.
pub const RAFT_TARGET: &str = "raft_rs";

/// The node's default filter: our own info lines, raft-rs's and the HTTP/2
/// stack's warnings, and tonic's failed TLS handshakes (a plaintext client,
/// a certificate from another CA), which it logs at debug.
pub const DEFAULT_FILTER: &str = "info,raft_rs=warn,h2=warn,tower=warn,tonic::transport::server::io_stream=debug";

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: time, level, spans, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line, with the event's fields and its spans'.
    Json,
}

/// Install the process-wide subscriber. `filter` is an `EnvFilter` directive
/// (e.g. [`DEFAULT_FILTER`]); `RAFTIFY_LOG` overrides it.
pub fn init(filter: &str, format: LogFormat) {
    let filter = std::env::var("RAFTIFY_LOG").unwrap_or_else(|_| filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter(&filter))
        .with_writer(|| LossyStderr)
        .with_target(true);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// stderr, with its failures dropped. A node whose log sits on the disk
/// that filled up (or whose stderr is a closed pipe) must go on: a failed
/// write makes tracing-subscriber report it with `eprintln!`, which panics
/// when stderr itself fails, and that panic stopped the apply worker.
pub struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn env_filter(directives: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_new(directives).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
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
                tracing::error!(target: RAFT_TARGET, "{message}")
            }
            slog::Level::Warning => tracing::warn!(target: RAFT_TARGET, "{message}"),
            slog::Level::Info => tracing::info!(target: RAFT_TARGET, "{message}"),
            slog::Level::Debug => tracing::debug!(target: RAFT_TARGET, "{message}"),
            slog::Level::Trace => tracing::trace!(target: RAFT_TARGET, "{message}"),
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `directives` lets through of an info line from this crate and
    /// an info and a warning from raft-rs (through the slog drain).
    fn logged_under(directives: &str) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(env_filter(directives))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("plugin loaded");
            let raft = raft_logger();
            slog::info!(raft, "became follower");
            slog::warn!(raft, "dropped a message"; "to" => 2);
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_default_filter_keeps_our_info_lines_and_only_raft_warnings() {
        let logged = logged_under(DEFAULT_FILTER);
        assert!(logged.contains("plugin loaded"), "{logged}");
        assert!(!logged.contains("became follower"), "{logged}");
        assert!(logged.contains("dropped a message to=2"), "{logged}");
    }

    #[test]
    fn raft_info_can_be_turned_on_without_touching_the_rest() {
        let logged = logged_under("warn,raft_rs=info");
        assert!(!logged.contains("plugin loaded"), "{logged}");
        assert!(logged.contains("became follower"), "{logged}");
    }
}
