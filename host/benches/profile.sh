#!/usr/bin/env bash
# Where a write's time goes (issue 14): a 3-node release cluster benched at
# CLIENTS (64) closed-loop clients over one connection to the leader, with
# each thread's CPU read from /proc before and after (per write, by node and
# thread), and `perf record` of the leader while it runs (the hottest
# symbols; as root, with linux-perf, installed when missing).
#
#   host/benches/profile.sh                         # 64 clients, 100,000 writes
#   CLIENTS=1 REQUESTS=10000 host/benches/profile.sh
#   PERF=0 host/benches/profile.sh                  # thread CPU only
#   PERF_DATA=/tmp/leader.data host/benches/profile.sh   # keep perf's data for `perf report -i`
set -euo pipefail
default_base_port=7741
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
clients="${CLIENTS:-64}"
requests="${REQUESTS:-100000}"
use_perf="${PERF:-1}"
if [ "$use_perf" = 1 ] && ! command -v perf >/dev/null; then
  apt-get install -y -q linux-perf >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q linux-perf >/dev/null; }
fi
for i in 1 2 3; do start_node "$i" --peers "$peers"; done
wait_for_leader "$(node_addr 1)"
leader=$(status_field "$(node_addr 1)" leader_id)
echo "== leader: node $leader; $clients clients, $requests writes" >&2
# Warm up (connections, the plugin's first calls).
"$bin" bench --addr "$(node_addr "$leader")" --clients "$clients" --requests 5000 >/dev/null 2>&1

# Each thread's CPU ticks (utime + stime), as "node thread-name ticks".
thread_ticks() {
  for i in 1 2 3; do
    for task in /proc/"${pids[$i]}"/task/*; do
      # Fields after the ")" that ends the name: state is 3rd, utime 14th, stime 15th.
      local name stat
      name=$(cat "$task/comm" 2>/dev/null) || continue
      stat=$(sed 's/.*) //' "$task/stat" 2>/dev/null) || continue
      echo "$i ${name// /_} $(awk '{print $12 + $13}' <<<"$stat")"
    done
  done
}
thread_ticks >"$dir/before"
if [ "$use_perf" = 1 ]; then
  perf record -F 999 -g -o "$dir/perf.data" -p "${pids[$leader]}" >/dev/null 2>&1 &
  perf_pid=$!
fi
"$bin" bench --addr "$(node_addr "$leader")" --clients "$clients" --requests "$requests" 2>&1 | grep -E "clients in|latency" >&2 || true
if [ "$use_perf" = 1 ]; then
  kill -INT "$perf_pid"
  wait "$perf_pid" 2>/dev/null || true
fi
thread_ticks >"$dir/after"
python3 - "$dir/before" "$dir/after" "$requests" "$leader" "$(getconf CLK_TCK)" <<'PY'
import collections, sys
before, after, writes, leader, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
def load(path):
    out = collections.Counter()
    for line in open(path):
        node, name, ticks = line.split()
        # Threads of one pool share a name stem (tokio-runtime-w, ...).
        out[(node, name)] += int(ticks)
    return out
b, a = load(before), load(after)
rows = collections.defaultdict(dict)
for key in a:
    rows[key[0]][key[1]] = (a[key] - b.get(key, 0)) / hz * 1e6 / writes
print(f"server CPU per write (us), {writes} writes:")
total = 0
for node in sorted(rows):
    role = "leader" if node == leader else "follower"
    busy = {k: v for k, v in rows[node].items() if v >= 0.5}
    node_total = sum(rows[node].values())
    total += node_total
    print(f"  node {node} ({role}): {node_total:.0f}   " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])))
print(f"  all three: {total:.0f}")
PY
if [ "$use_perf" = 1 ]; then
  if [ -n "${PERF_DATA:-}" ]; then cp "$dir/perf.data" "$PERF_DATA"; fi
  echo "== the leader's hottest symbols (self time)"
  perf report -i "$dir/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
    grep -E '^ +[0-9.]+%' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | cut -c1-110 | head -40
fi
