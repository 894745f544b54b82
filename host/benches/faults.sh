#!/usr/bin/env bash
# A soak run of the fault suite (tests/t80_faults.rs): ROUNDS rounds of
# SECONDS each against a 3-node cluster: kills, pauses, partitions (as root),
# leader moves, member replacement, plugin swaps and snapshots, every
# history checked for linearizability.
#
#   host/benches/faults.sh                    # 20 rounds of 45 s
#   ROUNDS=3 SECONDS_PER_ROUND=20 SEED=7 host/benches/faults.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FAULT_ROUNDS="${ROUNDS:-20}" FAULT_SECONDS="${SECONDS_PER_ROUND:-45}" FAULT_SEED="${SEED:-$(date +%s)}" \
  cargo test --locked --manifest-path "$root/Cargo.toml" -p raftify-host --release --test t80_faults -- --nocapture the_cluster
