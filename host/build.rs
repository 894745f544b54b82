//! Build script: generates the gRPC code from proto/ with a vendored protoc,
//! and builds the embedded plugins for wasm32-wasip2 so the binary carries
//! them: plugins/kv (the default plugin), and for the tests plugins/kv-v2,
//! plugins/chaos (hostile) and plugins/hello (a component of another world).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("host/ has a parent").to_path_buf();
    generate_grpc(&root);
    build_plugins(&root);
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name}"))
}

fn generate_grpc(root: &Path) {
    let proto = root.join("proto/raftify.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .compile_with_config(config, &[proto], &[root.join("proto")])
        .expect("compile proto/raftify.proto");
}

/// Builds the Rust plugins with a nested cargo, into a target directory of
/// their own (sharing the outer one would deadlock on its lock).
fn build_plugins(root: &Path) {
    let plugins = root.join("plugins");
    for path in ["Cargo.toml", "Cargo.lock", "kv", "kv-v1", "kv-v2", "chaos", "hello"] {
        println!("cargo:rerun-if-changed={}", plugins.join(path).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("guest-sdk").display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let out_dir = PathBuf::from(env("OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one plugin
    // build directory across profiles (and with plugins/build.sh).
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("plugin-build"))
        .unwrap_or_else(|| out_dir.join("plugin-build"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .current_dir(&plugins)
        .args(["build", "--release", "--locked", "--target", "wasm32-wasip2"])
        .args(["-p", "kv", "-p", "kv-v1", "-p", "kv-v2", "-p", "chaos", "-p", "hello"])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings (rustflags for the host, clippy's wrapper,
    // coverage instrumentation) must not leak into the Wasm build.
    for (key, _) in std::env::vars() {
        let leaks = key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_NET_OFFLINE"
            || key == "RUSTFLAGS"
            || key.starts_with("RUSTC");
        if leaks {
            command.env_remove(&key);
        }
    }
    let status = command.status().expect("run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the embedded plugins failed. Is the wasm32-wasip2 target installed? \
             Run `rustup target add wasm32-wasip2`."
        );
    }
    for name in ["kv", "kv_v1", "kv_v2", "chaos", "hello"] {
        let wasm = target_dir.join(format!("wasm32-wasip2/release/{name}.wasm"));
        let dest = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&wasm, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", wasm.display()));
    }
}
