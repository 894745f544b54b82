//! On-disk cache of compiled components, so a restart does not recompile.
//!
//! A cached file is keyed by the component's SHA-256 and by the engine's
//! compatibility hash (wasmtime version and every codegen setting), so a
//! different engine never loads it. The file ends with the SHA-256 of its own
//! contents: a torn or corrupted file is detected before wasmtime sees it,
//! then recompiled and rewritten. Files are written to a temporary name and
//! renamed into place, so readers never see half a file.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::LoadError;

pub fn compile(engine: &Engine, wasm: &[u8]) -> Result<Component, LoadError> {
    // wasmparser's own messages for these dump byte arrays; say it plainly.
    if !wasm.starts_with(b"\0asm") {
        return Err(LoadError::Invalid(
            "this is not a WebAssembly file (it does not start with \\0asm)".into(),
        ));
    }
    if wasm.get(4..8) == Some(&[1, 0, 0, 0]) {
        return Err(LoadError::Invalid(
            "this is a core WebAssembly module, not a component; \
             make one of it with `wasm-tools component new`"
                .into(),
        ));
    }
    Component::new(engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))
}

/// The cache file for a component on this engine.
pub fn path_for(engine: &Engine, dir: &Path, sha256: &[u8; 32]) -> PathBuf {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{}-{:016x}.cwasm", hex::encode(sha256), hasher.finish()))
}

pub fn load_or_compile(engine: &Engine, dir: &Path, sha256: &[u8; 32], wasm: &[u8]) -> Result<Component, LoadError> {
    let path = path_for(engine, dir, sha256);
    if let Some(component) = load(engine, &path) {
        return Ok(component);
    }
    let component = compile(engine, wasm)?;
    if let Err(error) = store(&component, dir, &path) {
        // The cache is an optimisation: failing to write it costs a compile
        // on the next start, nothing more.
        tracing::warn!(path = %path.display(), %error, "could not write the compiled-component cache");
    }
    Ok(component)
}

fn load(engine: &Engine, path: &Path) -> Option<Component> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 32 {
        tracing::warn!(path = %path.display(), "compiled-component cache file is truncated; recompiling");
        return None;
    }
    let (payload, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(payload).as_slice() != digest {
        tracing::warn!(path = %path.display(), "compiled-component cache file is corrupt; recompiling");
        return None;
    }
    // SAFETY: `deserialize` trusts its input to be a component this engine
    // serialized. The file name carries the engine's compatibility hash, the
    // checksum above proves the bytes are the ones a node wrote, and only
    // this node (or, for a shared --compile-cache-dir, the operator's other
    // nodes) writes the directory.
    match unsafe { Component::deserialize(engine, payload) } {
        Ok(component) => Some(component),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot use the cached component; recompiling");
            None
        }
    }
}

fn store(component: &Component, dir: &Path, path: &Path) -> std::io::Result<()> {
    let mut bytes = component.serialize().map_err(std::io::Error::other)?;
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)
}
