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
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --manifest-path "$root/Cargo.toml" -p raftify-host >&2
fi
bin="${BIN:-$root/target/release/raftify-host}"
plugin="${PLUGIN:-$root/target/plugins/kv-py.wasm}"
[ -f "$plugin" ] || { echo "no $plugin: run plugins/build.sh kv-py first" >&2; exit 1; }
clients="${CLIENTS:-16}"
load_secs="${SECONDS_OF_LOAD:-40}"
dir="$(mktemp -d)"
base_port="${BASE_PORT:-7501}"
peers=""
for i in 1 2 3; do peers="$peers${peers:+,}$i=127.0.0.1:$((base_port + i - 1))"; done
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for i in 1 2 3; do
  # Each node compiles for itself, into an empty cache of its own.
  RAFTIFY_COMPILE_CACHE_DIR="$dir/n$i-compiled" "$bin" run --id "$i" \
    --listen "127.0.0.1:$((base_port + i - 1))" --data-dir "$dir/n$i" --peers "$peers" \
    >"$dir/n$i.log" 2>&1 &
  pids+=("$!")
done
addr="127.0.0.1:$base_port"
for _ in $(seq 1 300); do
  if "$bin" status -o json --addr "$addr" 2>/dev/null | grep -q '"leader_id":[1-9]'; then break; fi
  sleep 0.1
done
leader=$("$bin" status -o json --addr "$addr" | sed -n 's/.*"leader_addr":"\([^"]*\)".*/\1/p')
echo "== leader at $leader; $clients clients writing for ${load_secs} s; swap to $(basename "$plugin") ($(stat -c %s "$plugin") bytes), cold caches"
# A closed loop bounded in time: about what the machine does in load_secs.
"$bin" bench --addr "$leader" --clients "$clients" --requests $((clients * 300 * load_secs)) \
  >"$dir/bench.txt" 2>&1 &
bench=$!
pids+=("$bench")
sleep 3
started=$(date +%s.%N)
"$bin" plugin swap "$plugin" --addr "$leader" --timeout-ms 120000 2>&1 | sed 's/^/   swap: /'
ended=$(date +%s.%N)
echo "== swap took $(echo "$ended - $started" | bc) s"
wait "$bench" || true
sed 's/^/   bench: /' "$dir/bench.txt"
for i in 1 2 3; do
  longest=$("$bin" status -o json --addr "127.0.0.1:$((base_port + i - 1))" |
    sed -n 's/.*"longest_apply_ms":\([0-9]*\).*/\1/p')
  echo "node $i: longest apply batch ${longest:-?} ms"
done
