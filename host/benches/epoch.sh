#!/usr/bin/env bash
# The cost of an instance epoch (issue 13): fill a 3-node cluster of the
# release build (kv plugin, fsync on) with SIZE_MB of kv state in 100-byte
# values, then take epochs (a `snapshot` on the leader, which every replica
# takes at the same index and then restarts its plugin instance from):
#   - quiet: nothing else running; the time until `snapshot` answers, and
#     from each node's log the snapshot's time and the fresh instance's
#     take-over (restore + catch-up);
#   - loaded: the same while a closed-loop bench writes at CLIENTS clients;
#     the bench's p99 and max beside a bench of the same length with no
#     epoch, and the longest apply batch any node saw.
#
#   host/benches/epoch.sh                       # 100 MB
#   SIZE_MB=200 CLIENTS=64 host/benches/epoch.sh
#   BIN=/path/to/raftify-host host/benches/epoch.sh
set -euo pipefail
default_base_port=7601
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
size_mb="${SIZE_MB:-100}"
clients="${CLIENTS:-16}"
requests="${REQUESTS:-60000}"

for i in 1 2 3; do
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/n$i" --peers "$peers" \
    >>"$dir/n$i.log" 2>&1 &
  pids[$i]=$!
done
addr=$(node_addr 1)
wait_for_leader "$addr"
leader_id=$(status_field "$addr" leader_id)
leader=$(node_addr "$leader_id")
fill_kv "$leader" "$size_mb"

# The last "took over" line of a node's log: its elapsed_ms and caught_up.
took_over() {
  grep 'instance epoch: a fresh instance' "$dir/n$1.log" | tail -1 |
    sed 's/\x1b\[[0-9;]*m//g' | sed -n 's/.*caught_up=\([0-9]*\).*elapsed_ms=\([0-9]*\).*/\2 ms, \1 entries caught up/p'
}
snapshot_ms() {
  grep 'took a snapshot' "$dir/n$1.log" | tail -1 |
    sed 's/\x1b\[[0-9;]*m//g' | sed -n 's/.*plugin_ms=\([0-9]*\) elapsed_ms=\([0-9]*\).*/\2 ms (plugin \1 ms)/p'
}
# A build from before epochs (BIN=) only snapshots: wait for that instead.
done_line='instance epoch: a fresh instance'
grep -q '"epoch"' <<<"$("$bin" status -o json --addr "$leader")" || done_line='took a snapshot'
epoch() { # label
  local t0 t1 i
  local -A before
  for i in 1 2 3; do before[$i]=$(grep -c "$done_line" "$dir/n$i.log" || true); done
  t0=$(date +%s%N)
  "$bin" snapshot --addr "$leader" --timeout-ms 600000 >/dev/null
  t1=$(date +%s%N)
  # Every node's fresh instance takes over (bounded: 10 minutes); a build
  # from before epochs snapshots on the leader only.
  for i in 1 2 3; do
    for _ in $(seq 1 6000); do
      [ "$(grep -c "$done_line" "$dir/n$i.log" || true)" -gt "${before[$i]}" ] && break
      [ "$done_line" = 'took a snapshot' ] && [ "$i" != "$leader_id" ] && break
      sleep 0.1
    done
  done
  echo "$1: snapshot answered in $(((t1 - t0) / 1000000)) ms" >&2
  for i in 1 2 3; do
    echo "  node $i: snapshot $(snapshot_ms "$i"); fresh instance took over after $(took_over "$i")" >&2
  done
}
json_number() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
bench() {
  local out
  out=$("$bin" bench --addr "$leader" --clients "$clients" --requests "$requests" -o json \
    --command-template "set probe{n} {v}" --value-size 100)
  echo "$(echo "$out" | json_number throughput_per_second) writes/s, p99 $(echo "$out" | json_number p99) ms, max $(echo "$out" | json_number max) ms"
}

epoch "quiet"
echo "loaded, no epoch: $(bench)" >&2
bench >"$dir/bench" &
load=$!
sleep 1
epoch "loaded"
wait "$load"
echo "loaded, with the epoch: $(cat "$dir/bench")" >&2
for i in 1 2 3; do
  echo "  node $i: longest apply batch $(status_field "$(node_addr "$i")" longest_apply_ms) ms; RssAnon $(sed -n 's/^RssAnon:[[:space:]]*//p' "/proc/${pids[$i]}/status")" >&2
done
