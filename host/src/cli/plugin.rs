//! `plugin swap`, `plugin list` and `plugin check` (offline: does a
//! component load, and what does it cost to compile and instantiate).

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::json;

use super::{Output, PluginCommand, connect};
use crate::sandbox::{Sandbox, SandboxConfig};

pub(super) async fn run(command: PluginCommand) -> anyhow::Result<i32> {
    match command {
        PluginCommand::Swap { file, client: args } => {
            let wasm = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let mut client = connect(&args).await?;
            let text = args.output == Output::Text;
            let response = client
                .swap_plugin_with_progress(wasm, |update| {
                    if text {
                        show_swap_progress(update);
                    }
                })
                .await?;
            match args.output {
                Output::Text => println!("{}", response.message),
                Output::Json => println!(
                    "{}",
                    json!({ "index": response.index, "sha256": response.sha256, "message": response.message })
                ),
            }
            Ok(0)
        }
        PluginCommand::List(args) => {
            let mut client = connect(&args).await?;
            let response = client.list_plugins().await?;
            for p in &response.plugins {
                match args.output {
                    Output::Text => println!(
                        "{}\t{}\tfrom index {}{}",
                        p.sha256,
                        // 0: its bytes were freed once no snapshot or entry needed them.
                        if p.size == 0 {
                            "freed".to_string()
                        } else {
                            format!("{} bytes", p.size)
                        },
                        p.active_from_index,
                        if p.current { "\tcurrent" } else { "" }
                    ),
                    Output::Json => println!(
                        "{}",
                        json!({ "sha256": p.sha256, "size": p.size, "active_from_index": p.active_from_index, "current": p.current })
                    ),
                }
            }
            Ok(0)
        }
        PluginCommand::Check {
            file,
            compile_cache_dir,
            output,
        } => {
            let wasm = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let report = tokio::task::spawn_blocking(move || check_plugin(&wasm, compile_cache_dir)).await??;
            match output {
                Output::Text => println!(
                    "ok: {} implements raftify:fsm/plugin@{}\nsha256 {}\nsize {} bytes\ncompiled in {} ms\ninstantiated in {} us",
                    file.display(),
                    report.abi,
                    report.sha256,
                    report.size,
                    report.compile_ms,
                    report.instantiate_us
                ),
                Output::Json => println!(
                    "{}",
                    json!({ "abi": report.abi, "sha256": report.sha256, "size": report.size, "compile_ms": report.compile_ms, "instantiate_us": report.instantiate_us })
                ),
            }
            Ok(0)
        }
    }
}

/// One line on stderr per step of a swap (stdout keeps the result).
fn show_swap_progress(update: &crate::proto::SwapProgress) {
    match update.stage.as_str() {
        "validating" => eprintln!("validating and compiling the component on the leader..."),
        "sent" => eprintln!(
            "sent {} bytes ({}) to the log, up to index {}",
            update.bytes,
            // From the node: never sliced where it might not split.
            update.sha256.get(..12).unwrap_or(&update.sha256),
            update.index
        ),
        "compiling" if update.waiting.is_empty() => {
            eprintln!("compiled on {} of {} voters", update.ready, update.voters)
        }
        "compiling" => {
            let waiting: Vec<String> = update.waiting.iter().map(u64::to_string).collect();
            eprintln!(
                "compiled on {} of {} voters (waiting on node {})",
                update.ready,
                update.voters,
                waiting.join(", ")
            );
        }
        "activated" => eprintln!("activated at index {}", update.index),
        _ => {}
    }
}

struct CheckReport {
    abi: &'static str,
    sha256: String,
    size: usize,
    compile_ms: u128,
    instantiate_us: u128,
}

/// `plugin check`: everything a node does with a new plugin short of
/// running a cluster on it, with the default sandbox limits.
fn check_plugin(wasm: &[u8], cache_dir: Option<PathBuf>) -> anyhow::Result<CheckReport> {
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir,
        ..SandboxConfig::default()
    })?;
    let started = std::time::Instant::now();
    let plugin = sandbox.load(wasm)?;
    let compile_ms = started.elapsed().as_millis();
    let started = std::time::Instant::now();
    let mut instance = plugin.instantiate()?;
    let instantiate_us = started.elapsed().as_micros();
    let state = instance
        .snapshot(0)
        .map_err(|e| anyhow::anyhow!("snapshot() of the empty state failed: {e}"))?;
    let mut fresh = plugin.instantiate()?;
    fresh
        .restore(0, &state)
        .map_err(|e| anyhow::anyhow!("restore() of its own empty snapshot failed: {e}"))?;
    Ok(CheckReport {
        abi: plugin.abi().version(),
        sha256: plugin.sha256_hex(),
        size: plugin.size(),
        compile_ms,
        instantiate_us,
    })
}
