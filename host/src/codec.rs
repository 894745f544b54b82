//! The codec: command text to entry bytes and back, through the plugin's
//! `codec` exports, on an instance of its own.
//!
//! The codec is pure, so it need not share the apply worker's instance (and
//! must not wait behind a long apply). A small pool of instances serves
//! concurrent requests; each call runs under `fuel_per_codec_call` plus a
//! per-byte allowance. Request handlers call it inline, or under
//! `block_in_place` for large inputs (`Services::codec_call`). A trapped
//! codec instance is simply replaced: it holds no state.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::sandbox::{CallError, Instance, LoadError, Plugin};

/// Follows the active plugin: after a hot-swap the next call instantiates
/// the new plugin's codec.
pub struct Codec {
    active: watch::Receiver<Plugin>,
    instances: Vec<Mutex<Option<Instance>>>,
    next: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("{0}")]
    Load(#[from] LoadError),
}

impl Codec {
    pub fn new(active: watch::Receiver<Plugin>) -> Codec {
        // Enough instances that request handlers on every core rarely wait.
        let size = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        Codec {
            active,
            instances: (0..size).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The active plugin.
    pub fn plugin(&self) -> Plugin {
        self.active.borrow().clone()
    }

    fn with_instance<T>(&self, f: impl FnOnce(&mut Instance) -> Result<T, CallError>) -> Result<T, CodecError> {
        let plugin = self.plugin();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let slots = self.instances.len();
        // A free instance if there is one; otherwise wait for ours.
        let mut slot = (0..slots)
            .find_map(|i| self.instances[(start + i) % slots].try_lock().ok())
            .unwrap_or_else(|| self.instances[start % slots].lock().unwrap_or_else(|e| e.into_inner()));
        let instance = match slot.as_mut() {
            Some(instance) if !instance.is_poisoned() && instance.plugin().sha256() == plugin.sha256() => instance,
            _ => slot.insert(plugin.instantiate()?),
        };
        Ok(f(instance)?)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u8>, CodecError> {
        self.with_instance(|i| i.encode(text))
    }

    pub fn decode(&self, entry: &[u8]) -> Result<String, CodecError> {
        self.with_instance(|i| i.decode(entry))
    }

    pub fn render(&self, response: &[u8]) -> Result<String, CodecError> {
        self.with_instance(|i| i.render(response))
    }
}
