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
mod instance;
pub mod wasi;

use instance::GuestState;
pub use instance::Instance;

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::Linker;

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

/// Limits on what a plugin may use: `run`'s flags of that heading, the
/// same names in a `--config` file, and `RAFTIFY_*` variables. The fuel,
/// memory and result limits must be identical on every replica of a
/// cluster: a smaller budget on one node would make it trap where others
/// do not, and the replicas would diverge (so the cluster records them, see
/// [`Limits`]).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Sandbox")]
#[serde(default)]
pub struct SandboxConfig {
    /// Fuel for one `apply` or `query` call (about one unit per Wasm
    /// instruction): stops runaway loops deterministically.
    #[arg(long, env = "RAFTIFY_FUEL_PER_CALL", default_value_t = SandboxConfig::DEFAULT.fuel_per_call)]
    pub fuel_per_call: u64,
    /// Fuel for one codec call (`encode`, `decode`, `render`), plus 2000 per
    /// input byte: these run on request handlers, so the budget keeps them
    /// short (about a second for a 1 MiB proposal).
    #[arg(long, env = "RAFTIFY_FUEL_PER_CODEC_CALL", default_value_t = SandboxConfig::DEFAULT.fuel_per_codec_call)]
    pub fuel_per_codec_call: u64,
    /// Fuel for one `snapshot` or `restore`, which touch the whole state.
    #[arg(long, env = "RAFTIFY_FUEL_PER_SNAPSHOT", default_value_t = SandboxConfig::DEFAULT.fuel_per_snapshot)]
    pub fuel_per_snapshot: u64,
    /// The most linear memory one plugin instance may have, in bytes.
    #[arg(long, env = "RAFTIFY_MAX_MEMORY_BYTES", default_value_t = SandboxConfig::DEFAULT.max_memory_bytes)]
    pub max_memory_bytes: usize,
    /// The most bytes one plugin call may hand back (a result, an error
    /// message, a snapshot chunk): an oversized result traps alike on every
    /// replica.
    #[arg(long, env = "RAFTIFY_MAX_RESULT_BYTES", default_value_t = SandboxConfig::DEFAULT.max_result_bytes)]
    pub max_result_bytes: usize,
    /// The most stdout/stderr bytes kept from one plugin call for the log.
    #[arg(
        long,
        env = "RAFTIFY_MAX_OUTPUT_BYTES_PER_CALL",
        default_value_t = SandboxConfig::DEFAULT.max_output_bytes_per_call
    )]
    pub max_output_bytes_per_call: usize,
    /// Where compiled plugins are cached [default: DATA_DIR/compiled]. Nodes
    /// on one machine may share it; only trusted users may write it, since
    /// compiled code is loaded as is (each file is checksummed).
    #[arg(
        long = "compile-cache-dir",
        id = "compile_cache_dir",
        env = "RAFTIFY_COMPILE_CACHE_DIR"
    )]
    #[serde(rename = "compile_cache_dir")]
    pub cache_dir: Option<PathBuf>,
}

impl SandboxConfig {
    pub const DEFAULT: SandboxConfig = SandboxConfig {
        fuel_per_call: 1_000_000_000,
        fuel_per_codec_call: 10_000_000,
        fuel_per_snapshot: 50_000_000_000,
        max_memory_bytes: 1 << 30,
        max_result_bytes: 16 << 20,
        max_output_bytes_per_call: 16 * 1024,
        cache_dir: None,
    };
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig::DEFAULT
    }
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

/// How the trap of a plugin that reached its memory cap begins.
pub(crate) const OUT_OF_MEMORY: &str = "out of memory: ";

impl CallError {
    /// A trap at the memory cap: unlike a panic, its outcome can depend on
    /// how the instance's memory was laid out by calls before it.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CallError::Trap(message) if is_out_of_memory(message))
    }
}

/// Whether a trap's message says the plugin reached its memory cap.
pub fn is_out_of_memory(trap: &str) -> bool {
    trap.starts_with(OUT_OF_MEMORY)
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
        Instance::new(self)
    }
}

#[cfg(test)]
mod tests;
