//! Sandbox tests against the real kv plugin and the hostile chaos plugin
//! (both built from plugins/ by build.rs).

use super::*;
use crate::daemon::{EMBEDDED_CHAOS, EMBEDDED_HELLO, EMBEDDED_KV, EMBEDDED_KV_V1};
use std::time::Duration;

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig {
        fuel_per_call: 20_000_000,
        max_memory_bytes: 64 << 20,
        ..SandboxConfig::default()
    })
    .unwrap()
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

#[test]
fn kv_applies_queries_and_encodes_through_the_sandbox() {
    let plugin = sandbox().load(EMBEDDED_KV).unwrap();
    let mut kv = plugin.instantiate().unwrap();
    let entry = kv.encode("set  a   1").unwrap();
    assert_eq!(entry, b"set a 1");
    assert_eq!(text(kv.apply(1, &entry).unwrap()), "OK");
    assert_eq!(text(kv.query(1, b"get a").unwrap()), "1");
    assert_eq!(kv.decode(b"set a 1").unwrap(), "set a 1");
    assert_eq!(kv.render(b"OK").unwrap(), "OK");
    assert!(matches!(kv.encode("frob"), Err(CallError::Guest(m)) if m.contains("unknown command")));
}

#[test]
fn a_guest_error_is_an_ordinary_result_and_the_instance_lives_on() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    chaos.apply(1, b"set a 1").unwrap();
    assert_eq!(
        chaos.apply(2, b"fail"),
        Err(CallError::Guest("chaos: asked to fail".into()))
    );
    assert!(!chaos.is_poisoned());
    assert_eq!(text(chaos.query(2, b"get a").unwrap()), "1");
}

#[test]
fn a_panic_traps_and_poisons_the_instance() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    let error = chaos.apply(1, b"panic").unwrap_err();
    assert!(
        matches!(&error, CallError::Trap(m) if m.contains("panicked")),
        "{error:?}"
    );
    assert!(chaos.is_poisoned());
    assert!(matches!(chaos.query(1, b"get a"), Err(CallError::Trap(_))));
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    let error = chaos.apply(1, b"spin").unwrap_err();
    assert_eq!(
        error,
        CallError::Trap("out of fuel: the call used up its budget of 20000000 fuel".into())
    );
    let error = sandbox()
        .load(EMBEDDED_CHAOS)
        .unwrap()
        .instantiate()
        .unwrap()
        .query(1, b"spin");
    assert!(matches!(error, Err(CallError::Trap(m)) if m.starts_with("out of fuel")));
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    let sandbox = Sandbox::new(SandboxConfig {
        fuel_per_call: 10_000_000_000,
        max_memory_bytes: 32 << 20,
        ..SandboxConfig::default()
    })
    .unwrap();
    let mut chaos = sandbox.load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    let error = chaos.apply(1, b"hog").unwrap_err();
    assert!(
        matches!(&error, CallError::Trap(m) if m.starts_with("out of memory")),
        "{error:?}"
    );
}

#[test]
fn clocks_and_randomness_depend_only_on_the_index() {
    let plugin = sandbox().load(EMBEDDED_CHAOS).unwrap();
    let stamp = |calls_before: u64, index: u64| {
        let mut chaos = plugin.instantiate().unwrap();
        // A replica that ran longer has made more calls; it must not matter.
        for i in 0..calls_before {
            chaos.apply(i + 1, b"stamp warmup").unwrap();
        }
        chaos.apply(index, b"stamp t").unwrap();
        text(chaos.query(index, b"get t").unwrap())
    };
    let first = stamp(0, 7);
    assert_eq!(first, stamp(5, 7));
    assert_ne!(first, stamp(0, 8));
}

#[test]
fn guest_output_is_captured_not_fatal() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    assert_eq!(text(chaos.apply(1, b"print").unwrap()), "OK");
}

#[test]
fn nans_come_out_canonical() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    // The canonical quiet NaNs of f64 and f32: no payload survives, so
    // every replica's CPU gives the same bits.
    assert_eq!(text(chaos.apply(1, b"nan").unwrap()), "7ff8000000000000 7fc00000");
}

/// What chaos's `reach-out` finds in the sandbox: nothing, and stdin empty.
const REACHED_NOTHING: &str =
    "vars 0 args 0 read false write false stdin 0 connect false bind false udp false lookup false";

/// The server runs codec calls inline on its tokio runtime threads, and the
/// node restores at start on one. wasmtime-wasi's blocking WASI calls go
/// through `block_on`, which panics there: a codec that printed (a panic
/// message does), slept or read stdin took the whole host down. Nothing a
/// plugin does may reach it, and a panic in the guest poisons only its
/// instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn plugin_calls_on_a_runtime_thread_print_sleep_and_reach_out_safely() {
    let plugin = sandbox().load(EMBEDDED_CHAOS).unwrap();
    let mut codec = plugin.instantiate().unwrap();
    assert_eq!(codec.encode("encode-print  hi").unwrap(), b"encode-print hi");
    let started = std::time::Instant::now();
    assert_eq!(codec.encode("encode-sleep 600000").unwrap(), b"encode-sleep 600000");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a virtual sleep waited for real"
    );
    assert_eq!(text(codec.encode("encode-reach-out").unwrap()), REACHED_NOTHING);
    assert!(!codec.is_poisoned());

    let error = codec.encode("encode-panic now").unwrap_err();
    assert!(
        matches!(&error, CallError::Trap(m) if m.contains("panicked")),
        "{error:?}"
    );
    assert!(codec.is_poisoned());

    // A restore that prints, as a node restarting from its snapshot runs it.
    let mut chaos = plugin.instantiate().unwrap();
    chaos.apply(1, b"set a 1").unwrap();
    chaos.apply(2, b"print-on-restore").unwrap();
    let snapshot = chaos.snapshot(2).unwrap();
    let mut restored = plugin.instantiate().unwrap();
    restored.restore(2, &snapshot).unwrap();
    assert_eq!(text(restored.query(2, b"get a").unwrap()), "1");
    assert_eq!(text(restored.apply(3, b"reach-out").unwrap()), REACHED_NOTHING);
}

#[test]
fn a_guest_finds_no_environment_filesystem_or_network() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    assert_eq!(text(chaos.apply(1, b"reach-out").unwrap()), REACHED_NOTHING);
}

#[test]
fn garbage_is_rejected_with_a_clear_error() {
    let error = sandbox().load(b"definitely not wasm").err().unwrap();
    assert!(matches!(error, LoadError::Invalid(_)), "{error}");
    assert!(error.to_string().contains("not a WebAssembly file"), "{error}");
    // A core module is not a component, and the error says how to make one.
    let error = sandbox().load(b"\0asm\x01\0\0\0").err().unwrap();
    assert!(error.to_string().contains("wasm-tools component new"), "{error}");
    // A truncated component: wasmparser's message, with no byte dumps.
    let error = sandbox().load(&EMBEDDED_KV[..EMBEDDED_KV.len() / 2]).err().unwrap();
    assert!(matches!(error, LoadError::Invalid(_)), "{error}");
}

#[test]
fn compiled_components_are_cached_and_a_corrupt_cache_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..SandboxConfig::default()
    })
    .unwrap();
    let plugin = sandbox.load(EMBEDDED_KV).unwrap();
    let cached = cache::path_for(&sandbox.engine, dir.path(), &plugin.sha256());
    assert!(cached.exists(), "no cache file at {}", cached.display());

    let from_cache = sandbox.load(EMBEDDED_KV).unwrap();
    assert_eq!(
        text(from_cache.instantiate().unwrap().apply(1, b"set a 1").unwrap()),
        "OK"
    );

    std::fs::write(&cached, b"torn write").unwrap();
    let recompiled = sandbox.load(EMBEDDED_KV).unwrap();
    assert_eq!(
        text(recompiled.instantiate().unwrap().apply(1, b"set a 1").unwrap()),
        "OK"
    );
    assert!(
        std::fs::read(&cached).unwrap().len() > 1000,
        "the cache file was rewritten"
    );
}

/// wasmtime lets a call hand back at most 128 MiB to the host by default:
/// `snapshot()` of a state past that trapped on every replica alike
/// (issue 21's cliff at ~1.3 million kv keys). The budget follows the
/// memory cap now.
#[test]
fn a_snapshot_larger_than_128_mib_round_trips() {
    let sandbox = Sandbox::new(SandboxConfig {
        max_memory_bytes: 1 << 30,
        max_result_bytes: 256 << 20,
        ..SandboxConfig::default()
    })
    .unwrap();
    let plugin = sandbox.load(EMBEDDED_CHAOS).unwrap();
    let mut chaos = plugin.instantiate().unwrap();
    let size = 140 << 20;
    assert_eq!(
        text(chaos.apply(1, format!("fill big {size}").as_bytes()).unwrap()),
        "OK"
    );
    let snapshot = chaos.snapshot(1).unwrap();
    assert!(snapshot.len() > size, "{} bytes", snapshot.len());
    let mut restored = plugin.instantiate().unwrap();
    restored.restore(1, &snapshot).unwrap();
    assert_eq!(restored.query(1, b"get big").unwrap().len(), size);
}

/// Issue 13: a result's size was bounded only by the memory cap, and the
/// host copied all of it before anything checked. `max_result_bytes` stops
/// the copy as it runs: the same trap on every replica, with the limit.
#[test]
fn a_result_over_max_result_bytes_traps_with_the_limit_and_the_limit_can_change() {
    let plugin = sandbox().load(EMBEDDED_CHAOS).unwrap();
    let mut chaos = plugin.instantiate().unwrap();
    let limits = chaos.limits();
    chaos.set_limits(Limits {
        max_result_bytes: 1 << 20,
        ..limits
    });
    chaos.apply(1, format!("fill big {}", 2 << 20).as_bytes()).unwrap();
    chaos.apply(2, format!("fill small {}", 1 << 20).as_bytes()).unwrap();
    assert_eq!(
        chaos.query(2, b"get small").unwrap().len(),
        1 << 20,
        "exactly the limit passes"
    );
    let error = chaos.query(2, b"get big").unwrap_err();
    assert_eq!(
        error,
        CallError::Trap(
            "the result is too large: a call may hand the host at most 1048576 bytes (max_result_bytes)".into()
        )
    );
    // A snapshot is not a result: it streams in chunks of the size asked.
    let mut fresh = plugin.instantiate().unwrap();
    fresh.set_limits(Limits {
        max_result_bytes: 1 << 20,
        ..limits
    });
    fresh.apply(1, format!("fill big {}", 2 << 20).as_bytes()).unwrap();
    assert!(fresh.snapshot(1).unwrap().len() > 2 << 20);
    // A raised limit lets it through, and so does a cap set the other way.
    fresh.set_limits(Limits {
        max_result_bytes: 4 << 20,
        ..limits
    });
    assert_eq!(fresh.query(1, b"get big").unwrap().len(), 2 << 20);
}

/// Issue 13: a guest's sleep on a WASI clock pollable slept for real on
/// every replica's apply thread. Time is virtual now: the sleep ends at once,
/// and the instance lives on.
#[test]
fn a_sleep_ends_at_once_in_virtual_time() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    let started = std::time::Instant::now();
    assert_eq!(text(chaos.apply(1, b"sleep 30000").unwrap()), "OK");
    // A bound on a hang, not a speed claim.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!chaos.is_poisoned());
    assert_eq!(text(chaos.apply(2, b"set a 1").unwrap()), "OK");
    assert_eq!(text(chaos.query(2, b"get a").unwrap()), "1");
}

/// After a sleep the clock reads at least the deadline, the same on every
/// replica, and the next call starts again from its index.
#[test]
fn a_sleep_moves_the_virtual_clock_deterministically() {
    let plugin = sandbox().load(EMBEDDED_CHAOS).unwrap();
    let elapsed = |calls_before: u64| {
        let mut chaos = plugin.instantiate().unwrap();
        for i in 0..calls_before {
            chaos.apply(i + 1, b"sleep-elapsed 1000").unwrap();
        }
        text(chaos.apply(9, b"sleep-elapsed 30000").unwrap())
    };
    let first = elapsed(0);
    let nanos: u64 = first.parse().unwrap();
    assert!((30_000_000_000..30_000_001_000).contains(&nanos), "{nanos} ns");
    assert_eq!(first, elapsed(3));
}

/// A busy wait on the clock alone: time moves one nanosecond per reading,
/// and every reading costs fuel, so a budget of F fuel covers less than F ns
/// of waiting: this one runs out of fuel (deterministically), at once.
#[test]
fn a_busy_wait_on_the_clock_runs_out_of_fuel() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    let error = chaos.apply(1, b"sleep-until-later 30000").unwrap_err();
    assert!(
        matches!(&error, CallError::Trap(m) if m.starts_with("out of fuel")),
        "{error:?}"
    );
}

#[test]
fn a_stack_overflow_is_named_as_such_and_only_once() {
    let mut chaos = sandbox().load(EMBEDDED_CHAOS).unwrap().instantiate().unwrap();
    let error = chaos.apply(1, b"recurse").unwrap_err();
    let CallError::Trap(message) = &error else {
        panic!("{error:?}")
    };
    assert!(message.contains("stack overflow"), "{message}");
    assert!(!message.contains("wasm trap: wasm trap"), "{message}");
}

/// Read a snapshot to its end in chunks of `max` bytes, checking each fits.
fn read_snapshot(instance: &mut Instance, index: u64, max: usize) -> Vec<u8> {
    instance.snapshot_begin(index).unwrap();
    let mut out = Vec::new();
    loop {
        let chunk = instance.snapshot_next(index, max).unwrap();
        if chunk.is_empty() {
            return out;
        }
        assert!(chunk.len() <= max, "a chunk of {} bytes for max {max}", chunk.len());
        out.extend_from_slice(&chunk);
    }
}

fn restore_in_pieces(instance: &mut Instance, index: u64, state: &[u8], piece: usize) -> Result<(), CallError> {
    instance.restore_begin(index)?;
    for chunk in state.chunks(piece) {
        instance.restore_chunk(index, chunk)?;
    }
    instance.restore_finish(index)
}

#[test]
fn both_abis_load_and_say_which_they_are() {
    let sandbox = sandbox();
    assert_eq!(sandbox.load(EMBEDDED_KV).unwrap().abi(), Abi::V2);
    assert_eq!(sandbox.load(EMBEDDED_KV_V1).unwrap().abi(), Abi::V1);
    let wrong = sandbox
        .load(EMBEDDED_HELLO)
        .err()
        .expect("hello exports no state machine");
    assert!(wrong.to_string().contains("0.2.0 or 0.1.0"), "{wrong}");
}

/// ABI 0.2.0 streams snapshots; 0.1.0 plugins still work, chunked by the
/// host, and the two read each other's snapshots (the bytes are the same).
#[test]
fn a_streamed_snapshot_moves_between_abis_in_pieces() {
    let sandbox = sandbox();
    let mut v2 = sandbox.load(EMBEDDED_KV).unwrap().instantiate().unwrap();
    for i in 0..1000 {
        v2.apply(i + 1, format!("set key{i:04} value-{i}").as_bytes()).unwrap();
    }
    let whole = v2.snapshot(1000).unwrap();
    assert_eq!(read_snapshot(&mut v2, 1000, 4096), whole);
    assert_eq!(read_snapshot(&mut v2, 1000, 1), whole[..]);

    let mut v1 = sandbox.load(EMBEDDED_KV_V1).unwrap().instantiate().unwrap();
    restore_in_pieces(&mut v1, 1000, &whole, 777).unwrap();
    assert_eq!(text(v1.query(1000, b"get key0999").unwrap()), "value-999");
    assert_eq!(
        read_snapshot(&mut v1, 1000, 4096),
        whole,
        "0.1.0's snapshot, chunked by the host"
    );

    v1.apply(1001, b"set key0000 changed").unwrap();
    let mut fresh = sandbox.load(EMBEDDED_KV).unwrap().instantiate().unwrap();
    restore_in_pieces(&mut fresh, 1001, &v1.snapshot(1001).unwrap(), 333).unwrap();
    assert_eq!(text(fresh.query(1001, b"get key0000").unwrap()), "changed");
    assert_eq!(text(fresh.query(1001, b"len").unwrap()), "1000");
}

/// A snapshot being read does not stop applying: its chunks show the state
/// as of `snapshot_begin`, whatever is applied between them.
#[test]
fn entries_apply_while_a_snapshot_is_read() {
    let mut kv = sandbox().load(EMBEDDED_KV).unwrap().instantiate().unwrap();
    for i in 0..500 {
        kv.apply(i + 1, format!("set key{i:03} v{i}").as_bytes()).unwrap();
    }
    let at_begin = kv.snapshot(500).unwrap();
    kv.snapshot_begin(500).unwrap();
    let mut streamed = Vec::new();
    let mut index = 500;
    loop {
        let chunk = kv.snapshot_next(index, 100).unwrap();
        if chunk.is_empty() {
            break;
        }
        streamed.extend_from_slice(&chunk);
        index += 1;
        let key = (index * 37) % 600;
        kv.apply(index, format!("set key{key:03} new{index}").as_bytes())
            .unwrap();
    }
    assert!(index > 560, "the snapshot was read in {} chunks", index - 500);
    assert_eq!(streamed, at_begin);
    assert_ne!(kv.snapshot(index).unwrap(), at_begin, "the entries did apply");
}

#[test]
fn a_corrupt_streamed_restore_is_an_error() {
    let sandbox = sandbox();
    let mut kv = sandbox.load(EMBEDDED_KV).unwrap().instantiate().unwrap();
    kv.apply(1, b"set a 1").unwrap();
    let state = kv.snapshot(1).unwrap();
    for plugin in [EMBEDDED_KV, EMBEDDED_KV_V1] {
        let plugin = sandbox.load(plugin).unwrap();
        let truncated = restore_in_pieces(&mut plugin.instantiate().unwrap(), 1, &state[..state.len() - 1], 3);
        assert!(
            matches!(&truncated, Err(CallError::Guest(m)) if m.contains("truncated")),
            "{truncated:?}"
        );
        let mut bad = state.clone();
        bad[0] = b'X';
        let bad = restore_in_pieces(&mut plugin.instantiate().unwrap(), 1, &bad, 3);
        assert!(
            matches!(&bad, Err(CallError::Guest(m)) if m.contains("magic")),
            "{bad:?}"
        );
    }
    let mut kv = sandbox.load(EMBEDDED_KV).unwrap().instantiate().unwrap();
    assert!(kv.restore_finish(1).is_err(), "a restore needs restore_begin");
}

/// Issue 21: a kv state past wasmtime's 128 MiB per-call copy streams out
/// and back in chunks of 1 MiB.
#[test]
fn a_kv_state_larger_than_128_mib_streams_in_chunks() {
    let sandbox = Sandbox::new(SandboxConfig {
        max_memory_bytes: 1 << 30,
        ..SandboxConfig::default()
    })
    .unwrap();
    let plugin = sandbox.load(EMBEDDED_KV).unwrap();
    let mut kv = plugin.instantiate().unwrap();
    let value = "v".repeat(1 << 20);
    for i in 0..140u64 {
        kv.apply(i + 1, format!("set key{i:03} {value}").as_bytes()).unwrap();
    }
    kv.snapshot_begin(140).unwrap();
    let mut restored = plugin.instantiate().unwrap();
    restored.restore_begin(140).unwrap();
    let (mut chunks, mut bytes) = (0, 0);
    loop {
        let chunk = kv.snapshot_next(140, 1 << 20).unwrap();
        if chunk.is_empty() {
            break;
        }
        chunks += 1;
        bytes += chunk.len();
        restored.restore_chunk(140, &chunk).unwrap();
    }
    restored.restore_finish(140).unwrap();
    assert!(bytes > 140 << 20 && chunks > 140, "{chunks} chunks, {bytes} bytes");
    assert_eq!(text(restored.query(140, b"len").unwrap()), "140");
    assert_eq!(restored.query(140, b"get key139").unwrap().len(), 1 << 20);
}
