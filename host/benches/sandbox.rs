//! The cost of one kv apply through the sandbox, next to a native no-op, so
//! a regression in the call path shows as a number.
//!
//! cargo bench -p raftify-host --bench sandbox
//!
//! The `by_language` benches compare the kv plugins of every language; build
//! them first with `plugins/build.sh kv-ts kv-py kv-c`.

use std::hint::black_box;

use raftify_host::daemon::EMBEDDED_KV;
use raftify_host::sandbox::{Instance, Sandbox, SandboxConfig};

fn main() {
    divan::main();
}

fn kv() -> Instance {
    kv_named("kv").expect("the Rust kv is embedded")
}

/// The floor: a native call that does nothing.
#[divan::bench]
fn native_noop(bencher: divan::Bencher) {
    let mut index = 0u64;
    bencher.bench_local(|| {
        index += 1;
        black_box((black_box(index), black_box(b"set k v".as_slice())))
    });
}

/// `incr` of one key: the smallest state change.
#[divan::bench]
fn kv_apply_incr(bencher: divan::Bencher) {
    let mut kv = kv();
    let mut index = 0u64;
    bencher.bench_local(|| {
        index += 1;
        kv.apply(index, b"incr n 1").unwrap()
    });
}

#[divan::bench]
fn kv_query_get(bencher: divan::Bencher) {
    let mut kv = kv();
    kv.apply(1, b"set a 1").unwrap();
    bencher.bench_local(|| kv.query(1, b"get a").unwrap());
}

/// A fresh instance, as after a trap.
#[divan::bench(sample_count = 20)]
fn kv_instantiate(bencher: divan::Bencher) {
    let plugin = Sandbox::new(SandboxConfig::default())
        .unwrap()
        .load(EMBEDDED_KV)
        .unwrap();
    bencher.bench_local(|| plugin.instantiate().unwrap());
}

/// The kv plugins, by name: the Rust one is embedded, the others are read
/// from `target/plugins/`.
const KV_PLUGINS: &[&str] = &["kv", "kv-ts", "kv-py", "kv-c"];

/// The kv plugin `name`, or `None` (with a note) if it has not been built.
fn kv_named(name: &str) -> Option<Instance> {
    let wasm = if name == "kv" {
        EMBEDDED_KV.to_vec()
    } else {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/plugins")
            .join(format!("{name}.wasm"));
        match std::fs::read(&path) {
            Ok(wasm) => wasm,
            Err(error) => {
                eprintln!(
                    "skipping {name}: {}: {error}; build it with `plugins/build.sh {name}`",
                    path.display()
                );
                return None;
            }
        }
    };
    let plugin = Sandbox::new(SandboxConfig::default()).unwrap().load(&wasm).unwrap();
    Some(plugin.instantiate().unwrap())
}

/// `set` of a fresh key per call through the sandbox (fuel reset, clock and
/// RNG reseed, canonical ABI copy in and out), for the kv of each language.
#[divan::bench(args = KV_PLUGINS)]
fn by_language_apply_set(bencher: divan::Bencher, name: &str) {
    let Some(mut kv) = kv_named(name) else { return };
    let entries: Vec<Vec<u8>> = (0..100_000).map(|i| format!("set k{i} v{i}").into_bytes()).collect();
    let mut index = 0usize;
    bencher.bench_local(|| {
        let entry = &entries[index % entries.len()];
        index += 1;
        kv.apply(index as u64, entry).unwrap()
    });
}

/// `encode` of a short command (the codec runs once per client request).
#[divan::bench(args = KV_PLUGINS)]
fn by_language_encode(bencher: divan::Bencher, name: &str) {
    let Some(mut kv) = kv_named(name) else { return };
    bencher.bench_local(|| kv.encode("set key value").unwrap());
}
