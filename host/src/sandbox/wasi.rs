//! The deterministic WASI shim.
//!
//! The plugin world imports nothing, but toolchains add WASI imports anyway
//! (Rust's std on wasm32-wasip2 imports `wasi:cli`, `wasi:io`, `wasi:clocks`,
//! `wasi:random` and `wasi:filesystem`; Python and JS runtimes more). Those
//! imports are served by wasmtime-wasi configured so nothing a guest sees can
//! differ between replicas:
//!
//! - no filesystem (no preopens), no network, no environment, no arguments,
//!   empty stdin;
//! - clocks that start at a fixed point for every call, derived from the log
//!   index being applied, and advance by one nanosecond per reading;
//! - randomness from a generator reseeded for every call from the same index;
//! - stdout and stderr captured (up to a limit) and written to the node's log.
//!
//! Reseeding per call (rather than per instance) matters: a replica that
//! restarted, or rebuilt its instance after a trap, has made fewer calls than
//! one that ran all along, yet both must see the same values for entry N.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// The wall clock every guest sees at index 0: 2024-01-01T00:00:00Z.
const EPOCH_SECS: u64 = 1_704_067_200;

/// The per-call deterministic inputs: set by the host before every call.
#[derive(Debug, Default)]
struct CallSeed {
    /// Nanoseconds since the epoch at the start of the call.
    base_ns: u64,
    /// Readings taken so far in this call.
    clock_readings: u64,
    /// SplitMix64 state.
    rng_state: u64,
}

/// Shared handle the host uses to reseed clocks and randomness per call, and
/// to collect the guest's output.
#[derive(Clone, Default)]
pub struct Determinism {
    seed: Arc<Mutex<CallSeed>>,
    output: Output,
}

impl Determinism {
    pub fn new(max_output_bytes: usize) -> Determinism {
        Determinism {
            seed: Arc::default(),
            output: Output {
                inner: Arc::new(Mutex::new(OutputBuffer {
                    bytes: Vec::new(),
                    limit: max_output_bytes,
                    dropped: 0,
                })),
            },
        }
    }

    /// Reset clocks and randomness for a call made at log index `index`.
    pub fn reseed(&self, index: u64) {
        let mut seed = lock(&self.seed);
        // One simulated millisecond per log index: time moves forward with
        // the log, identically on every replica.
        seed.base_ns = EPOCH_SECS * 1_000_000_000 + index.saturating_mul(1_000_000);
        seed.clock_readings = 0;
        seed.rng_state = index ^ 0x5241_4654_4946_5921; // "RAFTIFY!"
    }

    /// Take what the guest wrote since the last call, and how many bytes were
    /// dropped over the limit.
    pub fn take_output(&self) -> (Vec<u8>, usize) {
        let mut out = lock(&self.output.inner);
        let dropped = std::mem::take(&mut out.dropped);
        (std::mem::take(&mut out.bytes), dropped)
    }

    /// A WASI context wired to this shim.
    pub fn wasi_ctx(&self) -> WasiCtx {
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdout(self.output.clone())
            .stderr(self.output.clone())
            .wall_clock(Clock(self.seed.clone()))
            .monotonic_clock(Clock(self.seed.clone()))
            .secure_random(Rng(self.seed.clone()))
            .insecure_random(Rng(self.seed.clone()))
            .insecure_random_seed(0x5241_4654_4946_5921)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        builder.build()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is plain numbers and bytes; a panic elsewhere cannot leave it
    // inconsistent, so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Clock(Arc<Mutex<CallSeed>>);

impl Clock {
    fn tick(&self) -> u64 {
        let mut seed = lock(&self.0);
        seed.clock_readings += 1;
        seed.base_ns + seed.clock_readings
    }
}

impl HostWallClock for Clock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.tick())
    }
}

impl HostMonotonicClock for Clock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.tick()
    }
}

struct Rng(Arc<Mutex<CallSeed>>);

impl Rng {
    /// SplitMix64: tiny, fast and plenty for a deterministic stream.
    fn next(&self) -> u64 {
        let mut seed = lock(&self.0);
        seed.rng_state = seed.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed.rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for Rng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.next() as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.next())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }
}

struct OutputBuffer {
    bytes: Vec<u8>,
    limit: usize,
    dropped: usize,
}

/// stdout/stderr of a guest: kept up to a limit per call, the rest counted
/// and dropped. Writes never fail, so a chatty guest cannot trap by printing.
#[derive(Clone)]
struct Output {
    inner: Arc<Mutex<OutputBuffer>>,
}

impl Default for Output {
    fn default() -> Self {
        Determinism::new(0).output
    }
}

impl IsTerminal for Output {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Output {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests use this; they are not linked.
        Box::new(tokio::io::sink())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Output {
    async fn ready(&mut self) {}
}

impl OutputStream for Output {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut out = lock(&self.inner);
        let room = out.limit.saturating_sub(out.bytes.len());
        let kept = bytes.len().min(room);
        out.bytes.extend_from_slice(&bytes[..kept]);
        out.dropped += bytes.len() - kept;
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}
