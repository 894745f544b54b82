//! The codec: command text to entry bytes and back, through the plugin's
//! `codec` exports, on an instance of its own.
//!
//! The codec is pure, so it need not share the apply worker's instance (and
//! must not wait behind a long apply). Calls are blocking; async callers use
//! `spawn_blocking`. A trapped codec instance is simply replaced: it holds no
//! state.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::sandbox::{CallError, Instance, LoadError, Plugin};

/// Follows the active plugin: after a hot-swap the next call instantiates
/// the new plugin's codec.
pub struct Codec {
    active: watch::Receiver<Plugin>,
    instance: Mutex<Option<Instance>>,
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
        Codec {
            active,
            instance: Mutex::new(None),
        }
    }

    /// The active plugin.
    pub fn plugin(&self) -> Plugin {
        self.active.borrow().clone()
    }

    fn with_instance<T>(&self, f: impl FnOnce(&mut Instance) -> Result<T, CallError>) -> Result<T, CodecError> {
        let plugin = self.plugin();
        let mut slot = self.instance.lock().unwrap_or_else(|e| e.into_inner());
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
