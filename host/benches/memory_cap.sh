#!/usr/bin/env bash
# The plugin's memory cap, reached (issue 21): fill a 3-node cluster of the
# release build (kv plugin, fsync on, the default 1 GiB --max-memory-bytes
# unless NODE_FLAGS says otherwise) with 100-byte values, STEP_KEYS keys at a
# time, until the space alarm refuses a write (or MAX_KEYS are in). Then, at
# that size:
#   - every node: plugin memory, trapped entries (none expected);
#   - a snapshot (an epoch: every replica restores a fresh instance);
#   - the epoch digest on every node (all the same expected);
#   - a follower killed with SIGKILL, until it applied the commit index;
#   - a new node, until it applied the commit index;
#   - deletes of every key (admitted during the alarm), a snapshot, and the
#     time until the alarm has cleared on every node.
# Prints one line per step and a summary.
#
#   host/benches/memory_cap.sh
#   STEP_KEYS=200000 NODE_FLAGS="--max-memory-bytes 268435456" host/benches/memory_cap.sh
#   STEP_KEYS=200000 MAX_KEYS=1800000 host/benches/memory_cap.sh   # issue 21's 1.8 million keys
set -euo pipefail
default_base_port=7541
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
step_keys="${STEP_KEYS:-500000}"
# On a failure, the nodes' logs are kept in target/memory-cap-logs.
keep_logs() {
  local status=$?
  if [ "$status" != 0 ]; then
    mkdir -p "$root/target/memory-cap-logs"
    cp "$dir"/n*.log "$root/target/memory-cap-logs/" 2>/dev/null || true
    echo "logs: $root/target/memory-cap-logs" >&2
  fi
  cleanup
}
trap keep_logs EXIT
max_keys="${MAX_KEYS:-0}"

memory_mb() { echo $(($(status_field "$1" plugin_memory_bytes) / 1000000)); }
epoch_of() { "$bin" status -o json --addr "$1" | python3 -c 'import json,sys; e=json.load(sys.stdin)["epoch"]; print(e["index"], e["sha256"], e["divergences_total"])'; }
alarms_of() { "$bin" status -o json --addr "$1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["space_alarms"]))'; }

for i in 1 2 3; do start_node "$i" --peers "$peers"; done
wait_for_leader "$(node_addr 1)"
leader_id=$(status_field "$(node_addr 1)" leader_id)
leader=$(node_addr "$leader_id")
follower=$((leader_id % 3 + 1))
value=$(head -c 90 /dev/zero | tr '\0' v)
nodes() { for id in "${!pids[@]}"; do echo "$id"; done | sort -n; }

echo "== leader $leader_id; steps of $step_keys keys until the alarm" >&2
keys=0
acknowledged=0
refusal=""
while [ -z "$refusal" ] && { [ "$max_keys" = 0 ] || [ "$keys" -lt "$max_keys" ]; }; do
  seq "$keys" $((keys + step_keys - 1)) | sed "s/.*/set key& $value/" >"$dir/cmds"
  t0=$(now)
  "$bin" propose --addr "$leader" --timeout-ms 120000 --file "$dir/cmds" >"$dir/out" 2>"$dir/err" || true
  fill_s=$(since "$t0")
  ok=$(grep -c '^OK$' "$dir/out" || true)
  acknowledged=$((acknowledged + ok))
  if [ "$ok" != "$step_keys" ]; then
    refusal=$(cat "$dir/out" "$dir/err" | grep -v '^OK$' | head -1 || true)
    if ! grep -q "no space: the plugin's memory" <<<"$refusal"; then
      echo "a write failed, not for the alarm: $refusal" >&2
      exit 1
    fi
  fi
  keys=$((keys + step_keys))
  echo "keys $acknowledged: ${fill_s}s for the step; plugin memory (MB) $(for id in $(nodes); do echo -n "n$id=$(memory_mb "$(node_addr "$id")") "; done)" >&2
done
state_mb=$((acknowledged * 108 / 1000000))

echo "== $acknowledged keys acknowledged (~$state_mb MB of kv state); refused: ${refusal:-none}" >&2
for id in $(nodes); do
  addr=$(node_addr "$id")
  echo "node $id: plugin memory $(memory_mb "$addr") MB, trapped entries $(status_field "$addr" trapped_entries), alarms $(alarms_of "$addr")" >&2
done

t0=$(now)
"$bin" snapshot --addr "$leader" --timeout-ms 600000 >/dev/null
echo "snapshot at this size: $(since "$t0") s" >&2
commit=$(status_field "$leader" commit_index)
for id in $(nodes); do wait_applied "$(node_addr "$id")" "$commit" >/dev/null; done
sleep 2 # the digests travel in the next batches
for id in $(nodes); do echo "node $id epoch (index sha256 divergences): $(epoch_of "$(node_addr "$id")")" >&2; done

kill -9 "${pids[$follower]}"
wait "${pids[$follower]}" 2>/dev/null || true
start_node "$follower"
echo "restart of node $follower at this size: $(wait_applied "$(node_addr "$follower")" "$commit") s" >&2

start_node 4 --join "$leader"
echo "new node 4 caught up at this size: $(wait_applied "$(node_addr 4)" "$commit") s" >&2
for id in $(nodes); do
  addr=$(node_addr "$id")
  echo "node $id: plugin memory $(memory_mb "$addr") MB, trapped entries $(status_field "$addr" trapped_entries)" >&2
done

seq 0 $((acknowledged - 1)) | sed "s/.*/del key&/" >"$dir/cmds"
"$bin" propose --frees-space --addr "$leader" --timeout-ms 120000 --file "$dir/cmds" >/dev/null
t0=$(now)
"$bin" snapshot --addr "$leader" --timeout-ms 600000 >/dev/null
for _ in $(seq 1 600); do
  cleared=1
  for id in $(nodes); do [ "$(alarms_of "$(node_addr "$id")")" = 0 ] || cleared=0; done
  [ "$cleared" = 1 ] && break
  sleep 0.1
done
[ "$cleared" = 1 ] || { echo "the alarm did not clear" >&2; exit 1; }
echo "deleted everything; snapshot and the alarm cleared everywhere in $(since "$t0") s" >&2
"$bin" propose --addr "$leader" 'set after 1' >&2
