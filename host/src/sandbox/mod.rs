//! The Wasm sandbox: loads plugin components and calls them deterministically.
//!
//! - [`Sandbox`]: the wasmtime engine with the deterministic configuration
//!   (NaN canonicalization, no threads, no relaxed SIMD, fuel metering, never
//!   wall-clock interruption) and a linker holding only the deterministic
//!   WASI shim ([`wasi`]), whose clocks and sleeps are virtual.
//! - [`Plugin`]: a validated, compiled component (content-addressed by
//!   SHA-256, compiled once and cached on disk by [`cache`]).
//! - [`Instance`]: one live instance with its own store. Every call gets a
//!   fresh fuel budget and runs under the memory cap; a trap poisons the
//!   instance, which the caller must then throw away.

pub mod cache;
pub mod wasi;

use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use self::wasi::Determinism;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "raftify:fsm/plugin@0.1.0",
    });
}

/// Limits on what a plugin may use. These must be identical on every replica
/// of a cluster: a smaller budget on one node would make it trap where others
/// do not, and the replicas would diverge.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxConfig {
    /// Fuel for one `apply`, `query` or codec call (about one unit per Wasm
    /// instruction). Stops runaway loops deterministically.
    pub fuel_per_call: u64,
    /// Fuel for one codec call (`encode`, `decode`, `render`), plus
    /// `CODEC_FUEL_PER_BYTE` per input byte: these run on request handlers,
    /// so the budget keeps them short (about a second for a 1 MiB proposal).
    pub fuel_per_codec_call: u64,
    /// Fuel for one `snapshot` or `restore`, which touch the whole state.
    pub fuel_per_snapshot: u64,
    /// The most linear memory one instance may have, in bytes.
    pub max_memory_bytes: usize,
    /// The most stdout/stderr bytes kept from one call for the node's log.
    pub max_output_bytes_per_call: usize,
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            fuel_per_call: 1_000_000_000,
            fuel_per_codec_call: 10_000_000,
            fuel_per_snapshot: 50_000_000_000,
            max_memory_bytes: 1 << 30,
            max_output_bytes_per_call: 16 * 1024,
            cache_dir: None,
        }
    }
}

/// Extra codec fuel per input byte. A compiled plugin's linear pass costs a
/// few dozen instructions per byte; an interpreted one's (QuickJS, CPython)
/// hundreds, up to about 800 for non-ASCII text in kv-ts.
pub const CODEC_FUEL_PER_BYTE: u64 = 2_000;

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component does not fit the raftify:fsm/plugin@0.1.0 world: {0}")]
    WrongWorld(String),
    #[error("could not set up the sandbox: {0}")]
    Engine(String),
}

/// How a call into a plugin failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin returned `err`: an ordinary, deterministic outcome.
    #[error("{0}")]
    Guest(String),
    /// The call trapped; the instance is poisoned and must be replaced.
    #[error("plugin trapped: {0}")]
    Trap(String),
}

/// The engine and linker shared by every plugin on a node.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<GuestState>>,
    config: Arc<SandboxConfig>,
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Result<Sandbox, LoadError> {
        let engine = Engine::new(&engine_config()).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker, |state: &mut GuestState| {
            wasi::VirtualTime::new(&state.determinism, &mut state.table)
        })
        .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        Ok(Sandbox {
            engine,
            linker: Arc::new(linker),
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Validate and compile `wasm`, checking it fits the plugin world.
    pub fn load(&self, wasm: &[u8]) -> Result<Plugin, LoadError> {
        let sha256: [u8; 32] = Sha256::digest(wasm).into();
        let component = match &self.config.cache_dir {
            Some(dir) => cache::load_or_compile(&self.engine, dir, &sha256, wasm)?,
            None => cache::compile(&self.engine, wasm)?,
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                pre,
                sha256,
                size: wasm.len(),
                sandbox: self.clone(),
            }),
        })
    }
}

/// The deterministic engine configuration (wasmtime's deterministic
/// execution checklist). Threads are off because wasmtime is built without
/// its `threads` feature (see host/Cargo.toml), so no shared memory exists.
fn engine_config() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config
        .wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(false)
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        .max_wasm_stack(1 << 20);
    config
}

/// A compiled, validated plugin. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    pre: bindings::PluginPre<GuestState>,
    sha256: [u8; 32],
    size: usize,
    sandbox: Sandbox,
}

impl Plugin {
    pub fn sha256(&self) -> [u8; 32] {
        self.inner.sha256
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.inner.sha256)
    }

    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// A fresh instance, in the plugin's initial state.
    pub fn instantiate(&self) -> Result<Instance, LoadError> {
        let config = &self.inner.sandbox.config;
        let determinism = Determinism::new(config.max_output_bytes_per_call);
        let state = GuestState {
            wasi: determinism.wasi_ctx(),
            determinism: determinism.clone(),
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max_bytes: config.max_memory_bytes,
                hit: false,
            },
        };
        let mut store = Store::new(&self.inner.sandbox.engine, state);
        store.limiter(|state| &mut state.limiter);
        // What one call may hand back to the host (a snapshot() of the whole
        // state among them): wasmtime's default is 128 MiB, which a kv
        // state of ~1.3 million keys outgrows while memory has room to
        // spare. The memory cap already bounds what a guest can return.
        store.set_hostcall_fuel(config.max_memory_bytes.saturating_add(1 << 20));
        store
            .set_fuel(config.fuel_per_call)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        determinism.reseed(0);
        let bindings = self
            .inner
            .pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::WrongWorld(format!("instantiation failed: {e:#}")))?;
        Ok(Instance {
            store,
            bindings,
            determinism,
            plugin: self.clone(),
            poisoned: false,
        })
    }
}

struct GuestState {
    wasi: WasiCtx,
    /// The same handle as [`Instance::determinism`], for the virtual
    /// monotonic clock (which wasmtime-wasi's context cannot reach).
    determinism: Determinism,
    table: ResourceTable,
    limiter: MemoryCap,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory, and remembers that it did so the trap can be named.
struct MemoryCap {
    max_bytes: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            wasmtime::bail!("memory cap reached");
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A live plugin instance. Not `Sync`: one call at a time.
pub struct Instance {
    store: Store<GuestState>,
    bindings: bindings::Plugin,
    determinism: Determinism,
    plugin: Plugin,
    poisoned: bool,
}

impl Instance {
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Whether a trap has made this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn apply(&mut self, index: u64, entry: &[u8]) -> Result<Vec<u8>, CallError> {
        let fuel = self.plugin.inner.sandbox.config.fuel_per_call;
        self.call(index, fuel, |b, s| {
            b.raftify_fsm_state_machine().call_apply(s, index, entry)
        })
    }

    /// `index` is the applied index the query reads at (it seeds the clock).
    pub fn query(&mut self, index: u64, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let fuel = self.plugin.inner.sandbox.config.fuel_per_call;
        self.call(index, fuel, |b, s| b.raftify_fsm_state_machine().call_query(s, request))
    }

    pub fn snapshot(&mut self, index: u64) -> Result<Vec<u8>, CallError> {
        let fuel = self.plugin.inner.sandbox.config.fuel_per_snapshot;
        self.call(index, fuel, |b, s| b.raftify_fsm_state_machine().call_snapshot(s))
    }

    pub fn restore(&mut self, index: u64, snapshot: &[u8]) -> Result<(), CallError> {
        let fuel = self.plugin.inner.sandbox.config.fuel_per_snapshot;
        self.call(index, fuel, |b, s| {
            b.raftify_fsm_state_machine().call_restore(s, snapshot)
        })
    }

    /// Codec calls may take time in proportion to their input: a fixed
    /// budget plus `CODEC_FUEL_PER_BYTE` for every input byte.
    fn codec_fuel(&self, input_len: usize) -> u64 {
        let base = self.plugin.inner.sandbox.config.fuel_per_codec_call;
        base.saturating_add(CODEC_FUEL_PER_BYTE.saturating_mul(input_len as u64))
    }

    pub fn encode(&mut self, text: &str) -> Result<Vec<u8>, CallError> {
        let fuel = self.codec_fuel(text.len());
        self.call(0, fuel, |b, s| b.raftify_fsm_codec().call_encode(s, text))
    }

    pub fn decode(&mut self, entry: &[u8]) -> Result<String, CallError> {
        let fuel = self.codec_fuel(entry.len());
        self.call(0, fuel, |b, s| b.raftify_fsm_codec().call_decode(s, entry))
    }

    pub fn render(&mut self, response: &[u8]) -> Result<String, CallError> {
        let fuel = self.codec_fuel(response.len());
        self.call(0, fuel, |b, s| b.raftify_fsm_codec().call_render(s, response))
    }

    fn call<T>(
        &mut self,
        index: u64,
        fuel: u64,
        f: impl FnOnce(&bindings::Plugin, &mut Store<GuestState>) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, CallError> {
        if self.poisoned {
            return Err(CallError::Trap("the instance was poisoned by an earlier trap".into()));
        }
        self.store
            .set_fuel(fuel)
            .expect("fuel metering is enabled in the engine config");
        self.store.data_mut().limiter.hit = false;
        self.determinism.reseed(index);
        let result = f(&self.bindings, &mut self.store);
        self.log_output();
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(CallError::Guest(message)),
            Err(error) => {
                self.poisoned = true;
                let memory_cap_hit = self.store.data().limiter.hit;
                Err(CallError::Trap(self.describe_trap(&error, fuel, memory_cap_hit)))
            }
        }
    }

    /// A short, deterministic description of a trap: every replica produces
    /// the same text, since it is returned to the proposer and recorded.
    fn describe_trap(&self, error: &wasmtime::Error, fuel: u64, memory_cap_hit: bool) -> String {
        let config = &self.plugin.inner.sandbox.config;
        if memory_cap_hit {
            return format!(
                "out of memory: the plugin tried to grow its memory past the cap of {} bytes",
                config.max_memory_bytes
            );
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => {
                format!("out of fuel: the call used up its budget of {fuel} fuel")
            }
            Some(Trap::UnreachableCodeReached) => "the plugin panicked (wasm `unreachable` reached)".to_string(),
            Some(Trap::StackOverflow) => "stack overflow: the plugin recursed too deep".to_string(),
            // Rust and C keep their stack in linear memory: overflowing it
            // shows as an access below address 0.
            Some(Trap::MemoryOutOfBounds) => {
                "out-of-bounds memory access (for a Rust or C plugin, most often a stack overflow: \
                 deep recursion or large locals)"
                    .to_string()
            }
            Some(trap) => {
                let text = trap.to_string();
                text.strip_prefix("wasm trap: ").unwrap_or(&text).to_string()
            }
            None => {
                let text = format!("{error:#}");
                if text.contains("fuel allocated for hostcalls has been exhausted") {
                    return format!(
                        "the result is too large: a call may hand the host at most {} bytes (max_memory_bytes + 1 MiB)",
                        config.max_memory_bytes.saturating_add(1 << 20)
                    );
                }
                format!("{error}").lines().next().unwrap_or("unknown error").to_string()
            }
        }
    }

    fn log_output(&mut self) {
        let (bytes, dropped) = self.determinism.take_output();
        if bytes.is_empty() && dropped == 0 {
            return;
        }
        let plugin = &self.plugin.sha256_hex()[..12];
        for line in String::from_utf8_lossy(&bytes).lines() {
            tracing::info!(target: "plugin", plugin, "{line}");
        }
        if dropped > 0 {
            tracing::warn!(target: "plugin", plugin, dropped, "plugin output over the per-call limit was dropped");
        }
    }
}

#[cfg(test)]
mod tests;
