//! The first phase of a hot swap: every node compiles the new component in
//! the background, and tells the leader when it is ready.
//!
//! A swap used to compile the component when its swap entry applied, on
//! every node's apply thread: 12–20 s for an 18 MB Python component, with
//! every write waiting. Now the component's chunks are followed by a
//! `HostEntry::PreparePlugin`; applying it hands the bytes to a [`Preparer`]
//! thread, which stores and compiles them while entries keep applying. Each
//! node's batches to its peers carry what it has prepared
//! ([`PluginReadiness`], `RaftBatch.plugins`), and the leader proposes the
//! swap entry only once every voter reports the component ready. Applying
//! the swap then takes the compiled plugin from the preparer.
//!
//! The preparer is a cache, not a source of truth: a node that never
//! prepared (it restarted, or the swap came from elsewhere) compiles when
//! the swap applies, as before, with the same bytes and the same result.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use crate::sandbox::{Plugin, Sandbox};

/// How far one node is with one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Compiling,
    Ready,
    Failed(String),
}

/// Components a node keeps a word on (the newest), and senders kept.
const MAX_TRACKED: usize = 4;
const MAX_SENDERS: usize = 1024;
/// The longest failure text carried in a batch.
const MAX_ERROR_BYTES: usize = 1024;

/// What one node said of the components it prepares.
type Said = Vec<([u8; 32], Readiness)>;

/// Compiles per component, and the signal that one finished.
type Slots = (Mutex<HashMap<[u8; 32], Slot>>, Condvar);

/// This node's readiness per component, and what peers' batches said of
/// theirs. Shared by the apply worker (which prepares), the transport
/// (which reports) and the server (which waits on the voters).
#[derive(Debug, Default)]
pub struct PluginReadiness {
    own: Mutex<VecDeque<([u8; 32], Readiness)>>,
    reported: Mutex<HashMap<u64, Said>>,
}

impl PluginReadiness {
    pub fn set(&self, sha256: [u8; 32], readiness: Readiness) {
        let mut own = lock(&self.own);
        own.retain(|(sha, _)| *sha != sha256);
        own.push_back((sha256, readiness));
        while own.len() > MAX_TRACKED {
            own.pop_front();
        }
    }

    /// Forget a component (it is active now, or superseded).
    pub fn forget(&self, sha256: &[u8; 32]) {
        lock(&self.own).retain(|(sha, _)| sha != sha256);
    }

    pub fn own(&self, sha256: &[u8; 32]) -> Option<Readiness> {
        lock(&self.own)
            .iter()
            .find(|(sha, _)| sha == sha256)
            .map(|(_, readiness)| readiness.clone())
    }

    /// What this node's batches say.
    pub fn to_proto(&self) -> Vec<crate::proto::PluginState> {
        lock(&self.own)
            .iter()
            .map(|(sha, readiness)| {
                let (state, error) = match readiness {
                    Readiness::Compiling => (0, String::new()),
                    Readiness::Ready => (1, String::new()),
                    Readiness::Failed(error) => (2, truncate(error, MAX_ERROR_BYTES)),
                };
                crate::proto::PluginState {
                    sha256: sha.to_vec(),
                    state,
                    error,
                }
            })
            .collect()
    }

    /// A member's batch said this. Malformed or excess entries are ignored,
    /// and the map stays bounded whatever ids a peer claims.
    pub fn report(&self, member: u64, states: &[crate::proto::PluginState]) {
        let mut parsed = Vec::new();
        for state in states.iter().take(MAX_TRACKED) {
            let Ok(sha) = <[u8; 32]>::try_from(state.sha256.as_slice()) else {
                continue;
            };
            let readiness = match state.state {
                0 => Readiness::Compiling,
                1 => Readiness::Ready,
                2 => Readiness::Failed(truncate(&state.error, MAX_ERROR_BYTES)),
                _ => continue,
            };
            parsed.push((sha, readiness));
        }
        let mut reported = lock(&self.reported);
        if parsed.is_empty() {
            reported.remove(&member);
        } else if reported.len() < MAX_SENDERS || reported.contains_key(&member) {
            reported.insert(member, parsed);
        }
    }

    /// What `member` last said of a component (`None`: nothing yet).
    pub fn reported(&self, member: u64, sha256: &[u8; 32]) -> Option<Readiness> {
        lock(&self.reported)
            .get(&member)?
            .iter()
            .find(|(sha, _)| sha == sha256)
            .map(|(_, readiness)| readiness.clone())
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

enum Slot {
    Compiling,
    Ready(Plugin),
    Failed,
}

/// Compiles components off the apply thread, one thread per component.
pub struct Preparer {
    sandbox: Sandbox,
    readiness: Arc<PluginReadiness>,
    slots: Arc<Slots>,
}

impl Preparer {
    pub fn new(sandbox: Sandbox, readiness: Arc<PluginReadiness>) -> Preparer {
        Preparer {
            sandbox,
            readiness,
            slots: Arc::default(),
        }
    }

    /// Start compiling `wasm` (whose SHA-256 the caller checked), after
    /// `store` keeps its bytes; a component already prepared or being
    /// prepared is not started again.
    pub fn start(
        &self,
        sha256: [u8; 32],
        wasm: Arc<Vec<u8>>,
        store: impl FnOnce(&[u8]) -> Result<(), String> + Send + 'static,
    ) {
        {
            let mut slots = lock(&self.slots.0);
            if matches!(slots.get(&sha256), Some(Slot::Compiling | Slot::Ready(_))) {
                return;
            }
            // A few components at most: drop failed ones first.
            if slots.len() >= MAX_TRACKED {
                slots.retain(|_, slot| !matches!(slot, Slot::Failed));
            }
            slots.insert(sha256, Slot::Compiling);
        }
        self.readiness.set(sha256, Readiness::Compiling);
        let (sandbox, readiness, slots) = (self.sandbox.clone(), self.readiness.clone(), self.slots.clone());
        let started = std::time::Instant::now();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name("prepare-plugin".into())
            .spawn(move || {
                let _enter = span.enter();
                crate::background::lower_priority();
                let outcome = store(&wasm).and_then(|()| sandbox.load(&wasm).map_err(|e| e.to_string()));
                let (slot, state) = match outcome {
                    Ok(plugin) => {
                        tracing::info!(
                            plugin = %plugin.sha256_hex(),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "prepared a plugin for its swap"
                        );
                        (Slot::Ready(plugin), Readiness::Ready)
                    }
                    Err(error) => {
                        tracing::warn!(plugin = %hex::encode(sha256), %error, "cannot prepare a plugin for its swap");
                        (Slot::Failed, Readiness::Failed(error))
                    }
                };
                readiness.set(sha256, state);
                lock(&slots.0).insert(sha256, slot);
                slots.1.notify_all();
            });
        if let Err(error) = spawned {
            let error = format!("cannot start the compile thread: {error}");
            self.readiness.set(sha256, Readiness::Failed(error));
            lock(&self.slots.0).insert(sha256, Slot::Failed);
        }
    }

    /// The compiled plugin, waiting for a compile under way; `None` when it
    /// was never started or failed (the caller compiles it itself, and gets
    /// the same outcome).
    pub fn take(&self, sha256: &[u8; 32]) -> Option<Plugin> {
        let (slots, compiled) = &*self.slots;
        let mut slots = lock(slots);
        while matches!(slots.get(sha256), Some(Slot::Compiling)) {
            slots = compiled.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
        match slots.remove(sha256) {
            Some(Slot::Ready(plugin)) => Some(plugin),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PluginState;

    #[test]
    fn own_readiness_is_bounded_and_newest_wins() {
        let readiness = PluginReadiness::default();
        for i in 0..10u8 {
            readiness.set([i; 32], Readiness::Compiling);
        }
        readiness.set([9; 32], Readiness::Ready);
        let states = readiness.to_proto();
        assert_eq!(states.len(), MAX_TRACKED);
        assert_eq!(readiness.own(&[9; 32]), Some(Readiness::Ready));
        assert_eq!(readiness.own(&[0; 32]), None);
        readiness.forget(&[9; 32]);
        assert_eq!(readiness.own(&[9; 32]), None);
    }

    #[test]
    fn reports_round_trip_and_hostile_ones_are_bounded() {
        let ours = PluginReadiness::default();
        ours.set([1; 32], Readiness::Ready);
        ours.set([2; 32], Readiness::Failed("x".repeat(5000)));
        let leader = PluginReadiness::default();
        leader.report(7, &ours.to_proto());
        assert_eq!(leader.reported(7, &[1; 32]), Some(Readiness::Ready));
        let Some(Readiness::Failed(error)) = leader.reported(7, &[2; 32]) else {
            panic!("a failure is reported");
        };
        assert_eq!(error.len(), MAX_ERROR_BYTES);
        // Wrong lengths, unknown states, too many entries: ignored.
        let hostile: Vec<PluginState> = (0..100)
            .map(|i| PluginState {
                sha256: vec![3; 31 + (i % 3)],
                state: 3 + i as u32,
                error: String::new(),
            })
            .collect();
        leader.report(8, &hostile);
        assert_eq!(leader.reported(8, &[3; 32]), None);
        for member in 0..5000 {
            leader.report(member, &ours.to_proto());
        }
        assert!(lock(&leader.reported).len() <= MAX_SENDERS);
        // An empty report clears what a member said.
        leader.report(7, &[]);
        assert_eq!(leader.reported(7, &[1; 32]), None);
    }
}
