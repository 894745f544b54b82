#!/usr/bin/env bash
# A cold hot swap under write load: start a 3-node cluster (release build,
# fsync on) whose nodes have empty compile caches, drive writes at the
# leader, swap kv for kv-py (an 18 MB component, 12-20 s to compile), and
# report how long the swap took, the write latencies around it, and the
# longest any node spent applying one batch of entries.
#
#   plugins/build.sh kv-py && host/benches/swap.sh
#   CLIENTS=16 SECONDS_OF_LOAD=40 host/benches/swap.sh
#   BIN=/tmp/old/raftify-host host/benches/swap.sh    # another build, side by side
set -euo pipefail
default_base_port=7501
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
plugin="${PLUGIN:-$root/target/plugins/kv-py.wasm}"
[ -f "$plugin" ] || { echo "no $plugin: run plugins/build.sh kv-py first" >&2; exit 1; }
clients="${CLIENTS:-16}"
load_secs="${SECONDS_OF_LOAD:-40}"
for i in 1 2 3; do
  # Each node compiles for itself, into an empty cache of its own.
  RAFTIFY_COMPILE_CACHE_DIR="$dir/n$i-compiled" "$bin" run --id "$i" \
    --listen "$(node_addr "$i")" --data-dir "$dir/n$i" --peers "$peers" \
    >"$dir/n$i.log" 2>&1 &
  pids[$i]=$!
done
addr=$(node_addr 1)
wait_for_leader "$addr"
leader=$("$bin" status -o json --addr "$addr" | sed -n 's/.*"leader_addr":"\([^"]*\)".*/\1/p')
echo "== leader at $leader; $clients clients writing for ${load_secs} s; swap to $(basename "$plugin") ($(stat -c %s "$plugin") bytes), cold caches"
# Closed-loop writes in short rounds, from before the swap until a few
# seconds after it is active; each round reports its own latencies.
: >"$dir/bench.txt"
(
  while [ ! -e "$dir/stop" ]; do
    "$bin" bench --addr "$leader" --clients "$clients" --requests $((clients * 200)) 2>&1 |
      grep -E "latency|errors|proposals from" >>"$dir/bench.txt" || true
  done
) &
bench=$!
pids[bench]=$bench
sleep "${LEAD_IN_SECS:-5}"
started=$(date +%s.%N)
"$bin" plugin swap "$plugin" --addr "$leader" --timeout-ms 120000 2>&1 | uniq | sed 's/^/   swap: /'
ended=$(date +%s.%N)
echo "== swap took $(echo "$ended - $started" | bc) s"
sleep "${LEAD_OUT_SECS:-5}"
touch "$dir/stop"
wait "$bench" || true
rounds=$(grep -c "proposals from" "$dir/bench.txt" || true)
errors=$(grep -E "^errors" "$dir/bench.txt" | awk '{s += $2} END {print s + 0}')
worst=$(grep latency "$dir/bench.txt" | sed 's/.*max \([0-9.]*\).*/\1/' | sort -n | tail -1)
worst_p99=$(grep latency "$dir/bench.txt" | sed 's/.*p99 \([0-9.]*\).*/\1/' | sort -n | tail -1)
rates=$(grep "proposals from" "$dir/bench.txt" | sed 's/.*: \([0-9]*\)\/s/\1/' | sort -n | tr '\n' ' ')
echo "== writes: $rounds rounds of $((clients * 200)); errors $errors; worst round p99 ${worst_p99} ms; longest write ${worst} ms"
echo "   writes/s per round, sorted: $rates"
for i in 1 2 3; do
  grep -h -E "prepared a plugin|swapped the plugin" "$dir/n$i.log" | sed 's/\x1b\[[0-9;]*m//g' |
    sed -n 's/.*\(prepared a plugin\|swapped the plugin\).*elapsed_ms=\([0-9]*\).*/\1 \2/p; s/.*elapsed_ms=\([0-9]*\).*\(prepared a plugin for its swap\|swapped the plugin\).*/\2 \1/p' |
    sed "s/^/   node $i: /; s/\$/ ms/"
done
for i in 1 2 3; do
  longest=$("$bin" status -o json --addr "$(node_addr "$i")" |
    sed -n 's/.*"longest_apply_ms":\([0-9]*\).*/\1/p')
  echo "node $i: longest apply batch ${longest:-?} ms"
done
