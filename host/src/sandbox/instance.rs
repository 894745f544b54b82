//! One live plugin instance: its store (the deterministic WASI context,
//! the memory cap), the calls into it under fresh fuel each, and what a
//! trap is called.

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::wasi::Determinism;
use super::{Bindings, CODEC_FUEL_PER_BYTE, CallError, Limits, LoadError, OUT_OF_MEMORY, Plugin, Pre, ResultLimit};

pub(super) struct GuestState {
    wasi: WasiCtx,
    /// The same handle as [`Instance::determinism`], for the virtual
    /// monotonic clock (which wasmtime-wasi's context cannot reach).
    pub(super) determinism: Determinism,
    pub(super) table: ResourceTable,
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
    /// The largest memory's size: wasmtime asks here when a memory is
    /// created and each time it grows, and linear memory never shrinks.
    largest: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            wasmtime::bail!("memory cap reached");
        }
        self.largest = self.largest.max(desired);
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
    /// A fresh instance of `plugin`, in its initial state.
    pub(super) fn new(plugin: &Plugin) -> Result<Instance, LoadError> {
        let config = &plugin.inner.sandbox.config;
        let limits = Limits::of(config);
        let determinism = Determinism::new(config.max_output_bytes_per_call);
        let state = GuestState {
            wasi: determinism.wasi_ctx(),
            determinism: determinism.clone(),
            table: ResourceTable::new(),
            limiter: MemoryCap {
                max_bytes: limits.memory_bytes(),
                hit: false,
                largest: 0,
            },
        };
        let mut store = Store::new(&plugin.inner.sandbox.engine, state);
        store.limiter(|state| &mut state.limiter);
        store
            .set_fuel(config.fuel_per_call)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        determinism.reseed(0);
        let failed = |e: wasmtime::Error| LoadError::WrongWorld(format!("instantiation failed: {e:#}"));
        let bindings = match &plugin.inner.pre {
            Pre::V1(pre) => Bindings::V1(pre.instantiate(&mut store).map_err(failed)?),
            Pre::V2(pre) => Bindings::V2(pre.instantiate(&mut store).map_err(failed)?),
        };
        Ok(Instance {
            store,
            bindings,
            determinism,
            plugin: plugin.clone(),
            poisoned: false,
            whole: WholeState::default(),
            limits,
            last_fuel: 0,
        })
    }

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

    /// The bytes of linear memory the instance holds (its largest memory):
    /// what the memory cap is measured against.
    pub fn memory_bytes(&self) -> u64 {
        self.store.data().limiter.largest as u64
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
                "{OUT_OF_MEMORY}the plugin tried to grow its memory past the cap of {} bytes (max_memory_bytes)",
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
