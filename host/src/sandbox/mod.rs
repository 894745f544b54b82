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

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use self::wasi::Determinism;

/// Bindings for each plugin ABI the host accepts.
mod bindings {
    /// `raftify:fsm@0.1.0`: whole-state `snapshot()` and `restore()`.
    pub mod v1 {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "raftify:fsm/plugin@0.1.0",
        });
    }

    /// `raftify:fsm@0.2.0`: streamed snapshots.
    pub mod v2 {
        wasmtime::component::bindgen!({
            path: "../wit/0.2.0",
            world: "raftify:fsm/plugin@0.2.0",
        });
    }
}

/// The plugin ABIs, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    V1,
    V2,
}

impl Abi {
    /// The WIT package version.
    pub fn version(self) -> &'static str {
        match self {
            Abi::V1 => "0.1.0",
            Abi::V2 => "0.2.0",
        }
    }
}

enum Pre {
    V1(bindings::v1::PluginPre<GuestState>),
    V2(bindings::v2::PluginPre<GuestState>),
}

enum Bindings {
    V1(bindings::v1::Plugin),
    V2(bindings::v2::Plugin),
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
    /// The most bytes one call may hand back to the host (a result, an
    /// error message, a snapshot chunk), enforced as the guest's data is
    /// copied out: an oversized result traps alike on every replica.
    #[serde(default = "default_max_result_bytes")]
    pub max_result_bytes: usize,
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
            max_result_bytes: default_max_result_bytes(),
            max_output_bytes_per_call: 16 * 1024,
            cache_dir: None,
        }
    }
}

fn default_max_result_bytes() -> usize {
    16 << 20
}

/// The limits every replica must share, since they decide what a call
/// returns: the cluster records them in its log and its snapshots
/// (`HostEntry::Limits`), and every node uses the cluster's values whatever
/// its own flags say. Until a cluster has recorded any, a node uses its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub fuel_per_call: u64,
    pub fuel_per_snapshot: u64,
    pub max_memory_bytes: u64,
    pub max_result_bytes: u64,
}

impl Limits {
    pub fn of(config: &SandboxConfig) -> Limits {
        Limits {
            fuel_per_call: config.fuel_per_call,
            fuel_per_snapshot: config.fuel_per_snapshot,
            max_memory_bytes: config.max_memory_bytes as u64,
            max_result_bytes: config.max_result_bytes as u64,
        }
    }

    /// Why these limits cannot work, if they cannot. Checked before they
    /// are proposed; a committed entry is used as it is on every replica.
    pub fn check(&self) -> Result<(), String> {
        const MIB: u64 = 1 << 20;
        let checks = [
            (
                self.fuel_per_call >= 1_000_000,
                "fuel_per_call must be at least 1000000",
            ),
            (
                self.fuel_per_snapshot >= 1_000_000,
                "fuel_per_snapshot must be at least 1000000",
            ),
            (
                (MIB..=4 << 30).contains(&self.max_memory_bytes),
                "max_memory_bytes must be between 1 MiB and 4 GiB (a 32-bit memory)",
            ),
            (
                (4096..=self.max_memory_bytes).contains(&self.max_result_bytes),
                "max_result_bytes must be at least 4096 and at most max_memory_bytes",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(why.to_string()),
            None => Ok(()),
        }
    }

    fn memory_bytes(&self) -> usize {
        usize::try_from(self.max_memory_bytes).unwrap_or(usize::MAX)
    }

    fn result_bytes(&self) -> usize {
        usize::try_from(self.max_result_bytes).unwrap_or(usize::MAX)
    }
}

/// How much of its data a call may copy out to the host, and which limit
/// that is (for the message when a guest goes past it).
#[derive(Clone, Copy)]
struct ResultLimit {
    bytes: usize,
    name: &'static str,
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
    #[error("the component does not fit the raftify:fsm/plugin world (0.2.0 or 0.1.0): {0}")]
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
        let sha256 = crate::plugin_id::PluginId::of(wasm).0;
        let component = match &self.config.cache_dir {
            Some(dir) => cache::load_or_compile(&self.engine, dir, &sha256, wasm)?,
            None => cache::compile(&self.engine, wasm)?,
        };
        let wrong = |e: wasmtime::Error| LoadError::WrongWorld(format!("{e:#}"));
        let instance_pre = self.linker.instantiate_pre(&component).map_err(wrong)?;
        // The ABI is the version of the state machine the component exports
        // (a component of neither is checked against the newest, whose
        // error then names what it lacks).
        let exports_v1 = component
            .component_type()
            .exports(&self.engine)
            .any(|(name, _)| name == "raftify:fsm/state-machine@0.1.0");
        let pre = if exports_v1 {
            Pre::V1(bindings::v1::PluginPre::new(instance_pre).map_err(wrong)?)
        } else {
            Pre::V2(bindings::v2::PluginPre::new(instance_pre).map_err(wrong)?)
        };
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
    pre: Pre,
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

    /// Which plugin ABI the component exports.
    pub fn abi(&self) -> Abi {
        match self.inner.pre {
            Pre::V1(_) => Abi::V1,
            Pre::V2(_) => Abi::V2,
        }
    }

    /// A fresh instance, in the plugin's initial state.
    pub fn instantiate(&self) -> Result<Instance, LoadError> {
        let config = &self.inner.sandbox.config;
        let limits = Limits::of(config);
        let determinism = Determinism::new(config.max_output_bytes_per_call);
        let state = GuestState {
            wasi: determinism.wasi_ctx(),
            determinism: determinism.clone(),
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max_bytes: limits.memory_bytes(),
                hit: false,
            },
        };
        let mut store = Store::new(&self.inner.sandbox.engine, state);
        store.limiter(|state| &mut state.limiter);
        store
            .set_fuel(config.fuel_per_call)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        determinism.reseed(0);
        let failed = |e: wasmtime::Error| LoadError::WrongWorld(format!("instantiation failed: {e:#}"));
        let bindings = match &self.inner.pre {
            Pre::V1(pre) => Bindings::V1(pre.instantiate(&mut store).map_err(failed)?),
            Pre::V2(pre) => Bindings::V2(pre.instantiate(&mut store).map_err(failed)?),
        };
        Ok(Instance {
            store,
            bindings,
            determinism,
            plugin: self.clone(),
            poisoned: false,
            whole: WholeState::default(),
            limits,
            last_fuel: 0,
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
    bindings: Bindings,
    determinism: Determinism,
    plugin: Plugin,
    poisoned: bool,
    /// A 0.1.0 plugin's whole-state snapshot being handed out, or restore
    /// being collected, in chunks (0.2.0 plugins stream for themselves).
    whole: WholeState,
    /// The replicated limits this instance runs under.
    limits: Limits,
    /// The fuel the latest call used.
    last_fuel: u64,
}

#[derive(Default)]
struct WholeState {
    out: Vec<u8>,
    out_at: usize,
    restoring: Option<Vec<u8>>,
}

/// Calls a function of the state machine, whichever the ABI.
macro_rules! state_machine {
    ($bindings:expr, $store:expr, $method:ident($($arg:expr),*)) => {
        match $bindings {
            Bindings::V1(b) => b.raftify_fsm_state_machine().$method($store $(, $arg)*),
            Bindings::V2(b) => b.raftify_fsm_state_machine().$method($store $(, $arg)*),
        }
    };
}

/// Calls a function only one ABI has (the caller checked which it is).
macro_rules! only {
    ($variant:ident, $bindings:expr, $store:expr, $method:ident($($arg:expr),*)) => {
        match $bindings {
            Bindings::$variant(b) => b.raftify_fsm_state_machine().$method($store $(, $arg)*),
            _ => Err(wasmtime::format_err!(concat!(stringify!($method), " is not in this plugin's ABI"))),
        }
    };
}

/// Calls a function of the codec, whichever the ABI.
macro_rules! codec {
    ($bindings:expr, $store:expr, $method:ident($($arg:expr),*)) => {
        match $bindings {
            Bindings::V1(b) => b.raftify_fsm_codec().$method($store $(, $arg)*),
            Bindings::V2(b) => b.raftify_fsm_codec().$method($store $(, $arg)*),
        }
    };
}

impl Instance {
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Run under `limits` from the next call on (the cluster's, which may
    /// differ from this node's flags). A lower memory cap than the memory
    /// has already stops it growing further.
    /// The fuel the latest call used (all of its budget if it ran out).
    pub fn last_call_fuel(&self) -> u64 {
        self.last_fuel
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.store.data_mut().limiter.max_bytes = limits.memory_bytes();
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A call's results: at most `max_result_bytes`.
    fn result_limit(&self) -> ResultLimit {
        ResultLimit {
            bytes: self.limits.result_bytes(),
            name: "max_result_bytes",
        }
    }

    /// Whether a trap has made this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn apply(&mut self, index: u64, entry: &[u8]) -> Result<Vec<u8>, CallError> {
        let fuel = self.limits.fuel_per_call;
        self.call(index, fuel, |b, s| state_machine!(b, s, call_apply(index, entry)))
    }

    /// `index` is the applied index the query reads at (it seeds the clock).
    pub fn query(&mut self, index: u64, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let fuel = self.limits.fuel_per_call;
        self.call(index, fuel, |b, s| state_machine!(b, s, call_query(request)))
    }

    /// Begin a snapshot of the state as of now (`index`, the applied
    /// index, seeds the clock). Read it with [`Instance::snapshot_next`];
    /// `apply` and `query` may run in between. A 0.1.0 plugin's whole
    /// `snapshot()` is taken here and handed out in pieces.
    pub fn snapshot_begin(&mut self, index: u64) -> Result<(), CallError> {
        let fuel = self.limits.fuel_per_snapshot;
        self.whole.out = Vec::new();
        self.whole.out_at = 0;
        match self.bindings {
            Bindings::V1(_) => {
                // The whole state in one result: the memory cap bounds it.
                let limit = ResultLimit {
                    bytes: self.limits.memory_bytes().saturating_add(1 << 20),
                    name: "a 0.1.0 snapshot: max_memory_bytes + 1 MiB",
                };
                let state = self.call_within(index, fuel, limit, |b, s| only!(V1, b, s, call_snapshot()))?;
                self.whole.out = state;
                Ok(())
            }
            Bindings::V2(_) => self.call(index, fuel, |b, s| only!(V2, b, s, call_snapshot_begin())),
        }
    }

    /// The next at most `max_bytes` of the snapshot begun last; empty once
    /// it is all read. `index` is the applied index now.
    pub fn snapshot_next(&mut self, index: u64, max_bytes: usize) -> Result<Vec<u8>, CallError> {
        let max_bytes = max_bytes.clamp(1, u32::MAX as usize);
        if let Bindings::V1(_) = self.bindings {
            let whole = &mut self.whole;
            let end = whole.out.len().min(whole.out_at + max_bytes);
            let chunk = whole.out[whole.out_at..end].to_vec();
            whole.out_at = end;
            if end == whole.out.len() {
                whole.out = Vec::new();
                whole.out_at = 0;
            }
            return Ok(chunk);
        }
        let fuel = self.limits.fuel_per_snapshot;
        let max = max_bytes as u32;
        // The chunk asked for, or an error message as large as any result.
        let limit = ResultLimit {
            bytes: max_bytes.max(self.limits.result_bytes()),
            name: "the chunk size asked for, or max_result_bytes",
        };
        let chunk = self.call_within(index, fuel, limit, |b, s| only!(V2, b, s, call_snapshot_next(max)))?;
        if chunk.len() > max_bytes {
            return Err(CallError::Guest(format!(
                "snapshot-next returned {} bytes, more than the {max_bytes} asked for",
                chunk.len()
            )));
        }
        Ok(chunk)
    }

    /// The whole snapshot in one buffer (for a hot swap's handover and for
    /// tests; snapshots that are stored stream chunk by chunk).
    pub fn snapshot(&mut self, index: u64) -> Result<Vec<u8>, CallError> {
        self.snapshot_begin(index)?;
        let mut state = Vec::new();
        loop {
            let chunk = self.snapshot_next(index, 1 << 20)?;
            if chunk.is_empty() {
                return Ok(state);
            }
            state.extend_from_slice(&chunk);
        }
    }

    /// Begin replacing the state with a snapshot given in chunks; on any
    /// error from here to [`Instance::restore_finish`], discard the instance.
    pub fn restore_begin(&mut self, index: u64) -> Result<(), CallError> {
        match self.bindings {
            Bindings::V1(_) => {
                self.whole.restoring = Some(Vec::new());
                Ok(())
            }
            Bindings::V2(_) => {
                let fuel = self.limits.fuel_per_snapshot;
                self.call(index, fuel, |b, s| only!(V2, b, s, call_restore_begin()))
            }
        }
    }

    pub fn restore_chunk(&mut self, index: u64, chunk: &[u8]) -> Result<(), CallError> {
        if let Bindings::V1(_) = self.bindings {
            let restoring = self.whole.restoring.as_mut();
            let restoring = restoring.ok_or_else(|| CallError::Guest("restore-chunk without restore-begin".into()))?;
            restoring.extend_from_slice(chunk);
            return Ok(());
        }
        let fuel = self.limits.fuel_per_snapshot;
        self.call(index, fuel, |b, s| only!(V2, b, s, call_restore_chunk(chunk)))
    }

    pub fn restore_finish(&mut self, index: u64) -> Result<(), CallError> {
        let fuel = self.limits.fuel_per_snapshot;
        if let Bindings::V1(_) = self.bindings {
            let state = self.whole.restoring.take();
            let state = state.ok_or_else(|| CallError::Guest("restore-finish without restore-begin".into()))?;
            return self.call(index, fuel, |b, s| only!(V1, b, s, call_restore(&state)));
        }
        self.call(index, fuel, |b, s| only!(V2, b, s, call_restore_finish()))
    }

    /// Restore a whole snapshot held in one buffer.
    pub fn restore(&mut self, index: u64, snapshot: &[u8]) -> Result<(), CallError> {
        self.restore_begin(index)?;
        for chunk in snapshot.chunks(1 << 20) {
            self.restore_chunk(index, chunk)?;
        }
        self.restore_finish(index)
    }

    /// Codec calls may take time in proportion to their input: a fixed
    /// budget plus `CODEC_FUEL_PER_BYTE` for every input byte.
    fn codec_fuel(&self, input_len: usize) -> u64 {
        let base = self.plugin.inner.sandbox.config.fuel_per_codec_call;
        base.saturating_add(CODEC_FUEL_PER_BYTE.saturating_mul(input_len as u64))
    }

    pub fn encode(&mut self, text: &str) -> Result<Vec<u8>, CallError> {
        let fuel = self.codec_fuel(text.len());
        self.call(0, fuel, |b, s| codec!(b, s, call_encode(text)))
    }

    pub fn decode(&mut self, entry: &[u8]) -> Result<String, CallError> {
        let fuel = self.codec_fuel(entry.len());
        self.call(0, fuel, |b, s| codec!(b, s, call_decode(entry)))
    }

    pub fn render(&mut self, response: &[u8]) -> Result<String, CallError> {
        let fuel = self.codec_fuel(response.len());
        self.call(0, fuel, |b, s| codec!(b, s, call_render(response)))
    }

    fn call<T>(
        &mut self,
        index: u64,
        fuel: u64,
        f: impl FnOnce(&Bindings, &mut Store<GuestState>) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, CallError> {
        let limit = self.result_limit();
        self.call_within(index, fuel, limit, f)
    }

    /// [`Instance::call`], with what the call may hand back set by `limit`.
    fn call_within<T>(
        &mut self,
        index: u64,
        fuel: u64,
        limit: ResultLimit,
        f: impl FnOnce(&Bindings, &mut Store<GuestState>) -> wasmtime::Result<Result<T, String>>,
    ) -> Result<T, CallError> {
        if self.poisoned {
            return Err(CallError::Trap("the instance was poisoned by an earlier trap".into()));
        }
        self.store
            .set_fuel(fuel)
            .expect("fuel metering is enabled in the engine config");
        self.store.data_mut().limiter.hit = false;
        // wasmtime counts the bytes of strings and lists copied out of the
        // guest against this, and traps past it: the same data traps alike
        // on every replica, before the host allocates for it.
        self.store.set_hostcall_fuel(limit.bytes);
        self.determinism.reseed(index);
        // A panic in the host while the guest runs (a host function's bug)
        // must not leave a half-run instance in use: it poisons it.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.bindings, &mut self.store)));
        self.last_fuel = fuel.saturating_sub(self.store.get_fuel().unwrap_or(0));
        self.log_output();
        let result = match result {
            Ok(result) => result,
            Err(panic) => {
                self.poisoned = true;
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|m| m.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_string());
                return Err(CallError::Trap(format!("the host failed during the call: {message}")));
            }
        };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(CallError::Guest(message)),
            Err(error) => {
                self.poisoned = true;
                let memory_cap_hit = self.store.data().limiter.hit;
                Err(CallError::Trap(self.describe_trap(&error, fuel, limit, memory_cap_hit)))
            }
        }
    }

    /// A short, deterministic description of a trap: every replica produces
    /// the same text, since it is returned to the proposer and recorded.
    fn describe_trap(&self, error: &wasmtime::Error, fuel: u64, limit: ResultLimit, memory_cap_hit: bool) -> String {
        if memory_cap_hit {
            return format!(
                "out of memory: the plugin tried to grow its memory past the cap of {} bytes (max_memory_bytes)",
                self.limits.max_memory_bytes
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
                        "the result is too large: a call may hand the host at most {} bytes ({})",
                        limit.bytes, limit.name
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
