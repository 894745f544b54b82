//! What `status`, `status --cluster`, `member list` and `limits` print.

use std::time::Duration;

use serde_json::json;

use super::{ClientArgs, Output, connect};
use crate::client::Client;
use crate::proto;

pub(super) fn print_members(members: &[proto::Member], leader_id: u64, output: Output) {
    for m in members {
        let role = if m.voter { "voter" } else { "learner" };
        let leader = m.id == leader_id;
        match output {
            Output::Text => println!("{}\t{}\t{}{}", m.id, m.addr, role, if leader { "\tleader" } else { "" }),
            Output::Json => println!(
                "{}",
                json!({ "id": m.id, "addr": m.addr, "role": role, "leader": leader })
            ),
        }
    }
}

/// `status --cluster`: every member's view, one row each. Exits 1 when a
/// member is unhealthy (did not answer, or knows no leader).
pub(super) async fn cluster_status(args: &ClientArgs) -> anyhow::Result<i32> {
    let mut client = connect(args).await?;
    let first = client.status().await?;
    let timeout = Duration::from_millis(args.timeout_ms.min(3_000));
    let dialer = args.security.dialer()?;
    let mut rows = Vec::new();
    for member in &first.members {
        let status = match Client::connect_with(&member.addr, timeout, &dialer).await {
            Ok(mut c) => c.status().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        rows.push((member, status));
    }
    let leader_last = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .find(|s| s.role == "leader")
        .map(|s| s.last_index);
    let mut healthy_all = true;
    let mut json_rows = Vec::new();
    if args.output == Output::Text {
        println!(
            "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:<12} {:>8}  healthy",
            "id", "address", "role", "term", "commit", "applied", "plugin", "lag"
        );
    }
    for (member, status) in &rows {
        let healthy = status.as_ref().is_ok_and(|s| s.leader_id != 0);
        healthy_all &= healthy;
        match status {
            Ok(s) => {
                let lag = leader_last.map(|last| last.saturating_sub(s.applied_index));
                let plugin: String = s.plugin_sha256.chars().take(12).collect();
                json_rows.push(json!({
                    "id": member.id, "addr": member.addr, "role": s.role, "term": s.term,
                    "commit_index": s.commit_index, "applied_index": s.applied_index,
                    "plugin_sha256": s.plugin_sha256, "lag": lag, "healthy": healthy,
                }));
                if args.output == Output::Text {
                    let lag = lag.map_or("?".to_string(), |l| l.to_string());
                    println!(
                        "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:<12} {:>8}  {}",
                        member.id, member.addr, s.role, s.term, s.commit_index, s.applied_index, plugin, lag, healthy
                    );
                }
            }
            Err(error) => {
                json_rows.push(json!({ "id": member.id, "addr": member.addr, "healthy": false, "error": error }));
                if args.output == Output::Text {
                    println!("{:>4}  {:<22} unreachable: {error}", member.id, member.addr);
                }
            }
        }
    }
    if args.output == Output::Json {
        println!("{}", serde_json::Value::Array(json_rows));
    }
    Ok(if healthy_all { 0 } else { 1 })
}

pub(super) fn print_status(status: &proto::StatusResponse, output: Output) {
    let members: Vec<_> = status
        .members
        .iter()
        .map(|m| json!({ "id": m.id, "addr": m.addr, "role": if m.voter { "voter" } else { "learner" } }))
        .collect();
    let mut value = json!({
        "id": status.id,
        "role": status.role,
        "leader_id": status.leader_id,
        "leader_addr": status.leader_addr,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "first_index": status.first_index,
        "last_index": status.last_index,
        "plugin_sha256": status.plugin_sha256,
        "plugin_size": status.plugin_size,
        "trapped_entries": status.trapped_entries,
        "sessions": status.sessions,
        "session_kept_bytes": status.session_kept_bytes,
        "listen": status.listen,
        "members": members,
        "snapshot_index": status.snapshot_index,
        "cluster_id": format!("{:016x}", status.cluster_id),
        "snapshot_error": status.snapshot_error,
        "reads_served": status.reads_served,
        "reads_retried": status.reads_retried,
        "space_alarms": status.space_alarms,
        "store_file_bytes": status.store_file_bytes,
        "store_live_bytes": status.store_live_bytes,
        "quota_bytes": status.quota_bytes,
        "fs_free_bytes": status.fs_free_bytes,
        "min_free_bytes": status.min_free_bytes,
        "out_of_space": status.out_of_space,
        "limits": status.limits.as_ref().map(limits_json),
        "limits_recorded": status.limits_recorded,
        "longest_apply_ms": status.longest_apply_ms,
        "apply_error": status.apply_error,
        "refused": status.refused.iter().map(|r| (r.reason.clone(), r.count)).collect::<std::collections::BTreeMap<_, _>>(),
        "progress": status.progress.iter().map(|p| json!({
            "id": p.id, "matched": p.matched, "next_index": p.next_index,
            "state": p.state, "recent_active": p.recent_active,
        })).collect::<Vec<_>>(),
    });
    // Beside the rest: one more field inside `json!` passes its recursion limit.
    value["plugin_memory_bytes"] = json!(status.plugin_memory_bytes);
    value["out_of_plugin_memory"] = json!(status.out_of_plugin_memory);
    value["epoch"] = json!({
        "index": status.epoch_index,
        "sha256": status.epoch_sha256,
        "divergences": status.divergences,
        "divergences_total": status.divergences_total,
    });
    match output {
        Output::Json => println!("{value}"),
        Output::Text => {
            println!("id:              {}", status.id);
            println!("listen:          {}", status.listen);
            println!("role:            {}", status.role);
            println!("leader:          {} {}", status.leader_id, status.leader_addr);
            println!("term:            {}", status.term);
            println!("commit index:    {}", status.commit_index);
            println!("applied index:   {}", status.applied_index);
            println!("log:             {}..={}", status.first_index, status.last_index);
            println!(
                "plugin:          {} ({} bytes)",
                status.plugin_sha256, status.plugin_size
            );
            println!("trapped entries: {}", status.trapped_entries);
            println!(
                "sessions:        {} ({} bytes of results kept)",
                status.sessions, status.session_kept_bytes
            );
            println!("cluster id:      {:016x}", status.cluster_id);
            println!(
                "reads:           {} served, {} retried",
                status.reads_served, status.reads_retried
            );
            println!(
                "store:           {} bytes in use of a {} byte quota; file {} bytes; {} bytes free on disk (reserve {}){}",
                status.store_live_bytes,
                status.quota_bytes,
                status.store_file_bytes,
                status.fs_free_bytes,
                status.min_free_bytes,
                if status.out_of_space { "; OUT OF SPACE" } else { "" }
            );
            if let Some(limits) = &status.limits {
                println!(
                    "plugin memory:   {} bytes of a {} byte cap{}",
                    status.plugin_memory_bytes,
                    limits.max_memory_bytes,
                    if status.out_of_plugin_memory {
                        "; NEAR THE CAP"
                    } else {
                        ""
                    }
                );
            }
            if !status.space_alarms.is_empty() {
                let members: Vec<String> = status.space_alarms.iter().map(u64::to_string).collect();
                println!(
                    "space alarm:     on for node {}: writes are refused",
                    members.join(", ")
                );
            }
            if !status.apply_error.is_empty() {
                println!("apply error:     {}", status.apply_error);
            }
            if !status.snapshot_error.is_empty() {
                println!("snapshot error:  {}", status.snapshot_error);
            }
            if status.epoch_index > 0 {
                println!("epoch:           {} {}", status.epoch_index, status.epoch_sha256);
            }
            for divergence in &status.divergences {
                println!("DIVERGED:        {divergence}");
            }
            for r in &status.refused {
                println!("refused:         {} {}", r.reason, r.count);
            }
            for m in &status.members {
                let role = if m.voter { "voter" } else { "learner" };
                println!("member:          {} {} {}", m.id, m.addr, role);
            }
        }
    }
}

pub(super) fn limits_json(limits: &crate::proto::SandboxLimits) -> serde_json::Value {
    json!({
        "fuel_per_call": limits.fuel_per_call,
        "fuel_per_snapshot": limits.fuel_per_snapshot,
        "max_memory_bytes": limits.max_memory_bytes,
        "max_result_bytes": limits.max_result_bytes,
    })
}

/// One line per limit; where this node's flag differs, it says so.
pub(super) fn print_limits(limits: &crate::proto::SandboxLimits, local: &crate::proto::SandboxLimits) {
    let rows = [
        ("fuel_per_call", limits.fuel_per_call, local.fuel_per_call),
        ("fuel_per_snapshot", limits.fuel_per_snapshot, local.fuel_per_snapshot),
        ("max_memory_bytes", limits.max_memory_bytes, local.max_memory_bytes),
        ("max_result_bytes", limits.max_result_bytes, local.max_result_bytes),
    ];
    for (name, value, flag) in rows {
        if value == flag {
            println!("  {name:<18} {value}");
        } else {
            println!("  {name:<18} {value}   (this node's flag says {flag}, unused)");
        }
    }
}
