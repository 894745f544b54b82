//! Plugin hot swaps on the apply worker: the component's bytes, the
//! prepare entry that compiles them off this thread (see `readiness`), and
//! the switch at the swap entry's index.

use std::sync::Arc;

use super::epoch::{Handover, handover};
use super::{Fsm, FsmError};
use crate::plugin_id::PluginId;
use crate::readiness::Readiness;
use crate::sandbox::{CallError, Plugin};
use crate::storage::LogStore;

impl<S: LogStore> Fsm<S> {
    /// The bytes of the component a swap entry names: assembled from its
    /// chunks in the log, or already stored, or (for a node that started
    /// from a snapshot taken between the chunks and the swap) fetched from a
    /// member. Content-addressing makes all three the same bytes; a node
    /// that can obtain them nowhere stops rather than diverge.
    pub(super) fn component_for_swap(&mut self, index: u64, sha256: &[u8; 32], len: u64) -> Result<Vec<u8>, FsmError> {
        if let Some(wasm) = self.prepared_wasm.remove(sha256) {
            return Ok(Arc::unwrap_or_clone(wasm));
        }
        let staged = self.staged.remove(sha256).unwrap_or_default();
        let mut wasm = Vec::with_capacity(len.min(1 << 30) as usize);
        for (offset, bytes) in staged {
            if offset != wasm.len() as u64 {
                break;
            }
            wasm.extend_from_slice(&bytes);
        }
        if wasm.len() as u64 == len && PluginId(*sha256).matches(&wasm) {
            return Ok(wasm);
        }
        if let Some(stored) = self.store.plugin_blob(sha256)? {
            return Ok(stored);
        }
        match self.fetch_plugin(PluginId(*sha256)) {
            Some(fetched) => Ok(fetched),
            // Every replica has the same chunks before this entry; if they do
            // not add up here they did not anywhere, and the swap is refused
            // alike (apply_swap checks the hash).
            _ if wasm.len() as u64 == len => Ok(wasm),
            _ => Err(FsmError::MissingPlugin(format!(
                "{} (for the swap at index {index})",
                hex::encode(sha256)
            ))),
        }
    }

    /// The first phase of a swap (see `readiness`): assemble the component
    /// from its chunks and compile it on another thread, so that applying
    /// the swap entry later does not stop this one for the compile.
    pub(super) fn prepare_plugin(&mut self, index: u64, sha256: [u8; 32], len: u64) -> Result<String, FsmError> {
        let hex = hex::encode(sha256);
        if self.plugin.sha256() == sha256 {
            // Nothing to compile: the swap entry will say it is active.
            self.staged.remove(&sha256);
            self.readiness.set(sha256, Readiness::Ready);
            return Ok(format!("plugin {hex} is already active"));
        }
        let wasm = match self.component_for_swap(index, &sha256, len) {
            Ok(wasm) => wasm,
            Err(FsmError::MissingPlugin(what)) => {
                let error = format!("its chunks do not add up, and no member has it: {what}");
                self.readiness.set(sha256, Readiness::Failed(error.clone()));
                return Ok(format!("plugin {hex} cannot be prepared: {error}"));
            }
            Err(error) => return Err(error),
        };
        if wasm.len() as u64 != len || !PluginId(sha256).matches(&wasm) {
            let error = "its chunks do not match its SHA-256 and length".to_string();
            self.readiness.set(sha256, Readiness::Failed(error.clone()));
            return Ok(format!("plugin {hex} cannot be prepared: {error}"));
        }
        // A few at most wait for their swap; an older one is read back
        // from the store if its swap ever comes.
        if self.prepared_wasm.len() >= 4 {
            self.prepared_wasm.clear();
        }
        let wasm = Arc::new(wasm);
        self.prepared_wasm.insert(sha256, wasm.clone());
        let store = self.store.clone();
        self.preparer.start(sha256, wasm, move |wasm| {
            store.put_plugin_blob(&sha256, wasm).map_err(|e| e.to_string())
        });
        Ok(format!("plugin {hex} is being prepared"))
    }

    /// Switch plugins at `index`, atomically on every replica: validate and
    /// compile the new component, `snapshot()` the old instance, `restore()`
    /// into the new one, switch. Any failure rejects the swap alike on every
    /// replica (all steps are deterministic) and the old plugin stays.
    /// `prepared`: the plugin compiled ahead from these bytes (checked
    /// against the hash when they were assembled).
    pub(super) fn apply_swap(
        &mut self,
        index: u64,
        sha256: &[u8; 32],
        wasm: &[u8],
        prepared: Option<Plugin>,
    ) -> Result<Result<Vec<u8>, CallError>, FsmError> {
        let reject = |reason: String| Ok(Err(CallError::Guest(format!("plugin swap rejected: {reason}"))));
        if prepared.is_none() && !PluginId(*sha256).matches(wasm) {
            return reject("the entry's component does not match its SHA-256".into());
        }
        let hex = hex::encode(sha256);
        if self.plugin.sha256() == *sha256 {
            return Ok(Ok(format!("plugin {hex} is already active").into_bytes()));
        }
        let started = std::time::Instant::now();
        let plugin = match prepared.map_or_else(|| self.sandbox.load(wasm), Ok) {
            Ok(plugin) => plugin,
            Err(error) => return reject(error.to_string()),
        };
        let mut fresh = match self.instantiate(&plugin) {
            Ok(instance) => instance,
            Err(error) => return reject(error.to_string()),
        };
        // An epoch in progress completes first (its catch-up cannot repeat
        // a swap). The old instance's state streams into the new one, a
        // chunk at a time.
        self.complete_epoch()?;
        self.abandon_snapshot()?;
        let state_bytes = match handover(index, &mut self.instance, &mut fresh, Default::default()) {
            Ok((state_bytes, _)) => state_bytes,
            Err(Handover::OldTrapped(message)) => {
                self.rebuild(index - 1)?;
                return reject(format!("the old plugin trapped in snapshot(): {message}"));
            }
            Err(Handover::OldRefused(message)) => {
                return reject(format!("the old plugin's snapshot() failed: {message}"));
            }
            Err(Handover::NewFailed(error)) => return reject(format!("the new plugin's restore() failed: {error}")),
        };
        self.store.activate_plugin(index, sha256, wasm)?;
        tracing::info!(
            index,
            from = %self.plugin.sha256_hex(),
            to = %hex,
            state_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "swapped the plugin"
        );
        self.plugin = plugin;
        self.instance = fresh;
        self.metrics.swaps.inc();
        Ok(Ok(format!("plugin {hex} is active from index {index}").into_bytes()))
    }
}
