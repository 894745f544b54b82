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
//! - virtual time for sleeps: a `wasi:clocks/monotonic-clock` pollable
//!   (`subscribe-duration`, `subscribe-instant`) is ready at once, and when
//!   the guest sees it ready both clocks jump to its deadline (if they are
//!   not past it already). A guest that sleeps 25 s, or loops until
//!   `now() >= deadline` around a sleep, finishes at once on every replica,
//!   with the same readings everywhere; no call ever waits on real time
//!   ([`add_to_linker`]);
//! - randomness from a generator reseeded for every call from the same index;
//! - stdout and stderr captured (up to a limit) and written to the node's log.
//!
//! No other pollable a guest can get waits either: stdin is closed (its
//! pollable is ready and reads report end of stream), stdout and stderr are
//! always writable, there are no files, and sockets and name lookups are
//! refused before any socket or lookup exists.
//!
//! Reseeding per call (rather than per instance) matters: a replica that
//! restarted, or rebuilt its instance after a trap, has made fewer calls than
//! one that ran all along, yet both must see the same values for entry N.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::sync;
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, DynPollable, OutputStream, Pollable, SocketError, StreamError, StreamResult,
    UdpSocket, subscribe,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiView};
use wasmtime_wasi_io::bindings::wasi::io::{poll as async_poll, streams as async_streams};

/// The wall clock every guest sees at index 0: 2024-01-01T00:00:00Z.
const EPOCH_SECS: u64 = 1_704_067_200;

/// The per-call deterministic inputs: set by the host before every call.
#[derive(Debug, Default)]
struct CallSeed {
    /// Nanoseconds since the epoch at the start of the call.
    base_ns: u64,
    /// Readings taken so far in this call.
    clock_readings: u64,
    /// Virtual nanoseconds the guest slept in this call.
    slept_ns: u64,
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
        seed.slept_ns = 0;
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

/// Adds the WASI imports to `linker`: wasmtime-wasi's synchronous WASIp2
/// set, with `wasi:clocks/monotonic-clock` replaced by virtual time.
///
/// wasmtime-wasi's own `subscribe-duration` sleeps on tokio's real clock
/// whatever the context's [`HostMonotonicClock`] says (and
/// `subscribe-instant` sleeps for the deadline minus that clock's reading),
/// so a guest's sleep blocked the apply thread of every replica for real.
/// Here the interface is defined a second time over wasmtime-wasi's (name
/// shadowing, for this interface only), by [`VirtualTime`]: its pollables are
/// ready at once and, when seen ready, move the call's clocks to their
/// deadline. `view` gives the instance's [`Determinism`] and resource table.
///
/// The interfaces whose synchronous bindings wrap an async call in
/// wasmtime-wasi's `in_tokio` (a `block_on`) are shadowed too, by
/// [`NoWait`]: `wasi:io/poll`, `wasi:io/streams` and
/// `wasi:sockets/udp-create-socket`. `block_on` panics on a tokio runtime
/// thread, where the host runs codec calls, and a plugin that printed there
/// (a Rust panic message does) took the host down. Every stream and pollable
/// a guest can hold here is ready at once, so [`NoWait`] polls each future
/// once, on the calling thread, and never blocks; a future that would wait
/// is a trap, not a hang. The other `in_tokio` users (filesystem
/// descriptors, TCP binds) need a resource no guest can obtain here.
pub fn add_to_linker<T: WasiView + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> VirtualTime<'_>,
) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    let added = (|| {
        monotonic_clock::add_to_linker::<T, HasVirtualTime>(linker, view)?;
        fn table<T: WasiView>(t: &mut T) -> NoWait<'_> {
            NoWait(t.ctx().table)
        }
        let table = table::<T>;
        sync::io::poll::add_to_linker::<T, HasNoWait>(linker, table)?;
        sync::io::streams::add_to_linker::<T, HasNoWait>(linker, table)?;
        sync::sockets::udp_create_socket::add_to_linker::<T, HasNoWait>(linker, table)
    })();
    linker.allow_shadowing(false);
    added
}

/// Runs a future that must be ready at once: every WASI resource a guest
/// can hold is. One poll, on this thread, with no runtime and no waiting.
fn at_once<F: Future>(future: F) -> wasmtime::Result<F::Output> {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => Ok(value),
        Poll::Pending => wasmtime::bail!("the plugin waited on a WASI stream or pollable that is never ready here"),
    }
}

/// The blocking parts of `wasi:io` without `block_on`: see [`add_to_linker`].
pub struct NoWait<'a>(&'a mut ResourceTable);

struct HasNoWait;

impl HasData for HasNoWait {
    type Data<'a> = NoWait<'a>;
}

impl sync::io::poll::Host for NoWait<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        at_once(async_poll::Host::poll(self.0, pollables))?
    }
}

impl sync::io::poll::HostPollable for NoWait<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        at_once(async_poll::HostPollable::ready(self.0, pollable))?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        at_once(async_poll::HostPollable::block(self.0, pollable))?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl sync::io::streams::Host for NoWait<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<sync::io::streams::StreamError> {
        sync::io::streams::Host::convert_stream_error(self.0, err)
    }
}

/// A stream call that must not wait: a future still pending is a trap.
fn stream_at_once<T>(future: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    at_once(future).map_err(StreamError::Trap)?
}

impl sync::io::streams::HostOutputStream for NoWait<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        at_once(async_streams::HostOutputStream::drop(self.0, stream))?
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        async_streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        async_streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        stream_at_once(async_streams::HostOutputStream::blocking_write_and_flush(
            self.0, stream, bytes,
        ))
    }

    fn blocking_write_zeroes_and_flush(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        stream_at_once(async_streams::HostOutputStream::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
    }

    fn subscribe(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        async_streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        async_streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        async_streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        stream_at_once(async_streams::HostOutputStream::blocking_flush(self.0, stream))
    }

    fn splice(&mut self, dst: Resource<DynOutputStream>, src: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        async_streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_at_once(async_streams::HostOutputStream::blocking_splice(self.0, dst, src, len))
    }
}

impl sync::io::streams::HostInputStream for NoWait<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        at_once(async_streams::HostInputStream::drop(self.0, stream))?
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        async_streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        stream_at_once(async_streams::HostInputStream::blocking_read(self.0, stream, len))
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        async_streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        stream_at_once(async_streams::HostInputStream::blocking_skip(self.0, stream, len))
    }

    fn subscribe(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<Resource<DynPollable>> {
        async_streams::HostInputStream::subscribe(self.0, stream)
    }
}

impl sync::sockets::network::Host for NoWait<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<sync::sockets::network::ErrorCode> {
        error.downcast()
    }

    fn network_error_code(
        &mut self,
        _error: Resource<sync::sockets::network::Error>,
    ) -> wasmtime::Result<Option<sync::sockets::network::ErrorCode>> {
        // No socket exists here, so no error comes from one.
        Ok(None)
    }
}

impl sync::sockets::network::HostNetwork for NoWait<'_> {
    fn drop(&mut self, network: Resource<sync::sockets::network::Network>) -> wasmtime::Result<()> {
        self.0.delete(network)?;
        Ok(())
    }
}

impl sync::sockets::udp_create_socket::Host for NoWait<'_> {
    /// Refused, as TCP's `create-tcp-socket` is: the sandbox has no network.
    fn create_udp_socket(
        &mut self,
        _family: sync::sockets::udp_create_socket::IpAddressFamily,
    ) -> Result<Resource<UdpSocket>, SocketError> {
        Err(sync::sockets::network::ErrorCode::AccessDenied.into())
    }
}

/// The host side of `wasi:clocks/monotonic-clock` for one instance.
pub struct VirtualTime<'a> {
    seed: &'a Arc<Mutex<CallSeed>>,
    table: &'a mut ResourceTable,
}

impl<'a> VirtualTime<'a> {
    pub fn new(determinism: &'a Determinism, table: &'a mut ResourceTable) -> VirtualTime<'a> {
        VirtualTime {
            seed: &determinism.seed,
            table,
        }
    }

    fn deadline(&mut self, deadline_ns: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let deadline = self.table.push(Deadline {
            seed: self.seed.clone(),
            deadline_ns,
        })?;
        subscribe(self.table, deadline)
    }
}

struct HasVirtualTime;

impl HasData for HasVirtualTime {
    type Data<'a> = VirtualTime<'a>;
}

impl monotonic_clock::Host for VirtualTime<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        Ok(lock(self.seed).tick())
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        Ok(1)
    }

    fn subscribe_instant(&mut self, when: monotonic_clock::Instant) -> wasmtime::Result<Resource<DynPollable>> {
        self.deadline(when)
    }

    fn subscribe_duration(&mut self, duration: monotonic_clock::Duration) -> wasmtime::Result<Resource<DynPollable>> {
        // Reading the time to subscribe is not one of the guest's readings.
        let now = lock(self.seed).now_ns();
        self.deadline(now.saturating_add(duration))
    }
}

/// A virtual sleep's pollable: ready at once. Being seen ready (`poll`,
/// `block` or `ready`) is when the sleep ends, so the clocks move to the
/// deadline then; a deadline already past changes nothing. Several sleeps
/// polled together all end, and time moves to the latest deadline; a sleep
/// "forever" ends too, leaving the clocks at their last value. Only the
/// guest's own calls move time, so it moves alike on every replica.
struct Deadline {
    seed: Arc<Mutex<CallSeed>>,
    deadline_ns: u64,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Deadline {
    async fn ready(&mut self) {
        let mut seed = lock(&self.seed);
        let behind = self.deadline_ns.saturating_sub(seed.now_ns());
        seed.slept_ns = seed.slept_ns.saturating_add(behind);
    }
}

impl CallSeed {
    /// The call's current virtual time: what the last reading returned (or
    /// the start), plus any sleeps since.
    fn now_ns(&self) -> u64 {
        self.base_ns
            .saturating_add(self.slept_ns)
            .saturating_add(self.clock_readings)
    }

    /// One reading of either clock.
    fn tick(&mut self) -> u64 {
        self.clock_readings += 1;
        self.now_ns()
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
        lock(&self.0).tick()
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
