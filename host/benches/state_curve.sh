#!/usr/bin/env bash
# The cost curve against state size (issue 21): fill a 3-node cluster of the
# release build (kv plugin, fsync on) with 100-byte values, STEP_MB of kv
# state at a time, up to MAX_MB, and after each step measure:
#   - fill rate: keys/s of `propose --file` (one pipelined stream);
#   - writes: a closed-loop bench at 64 clients (throughput and p99);
#   - snapshot: time of a forced `snapshot` on the leader, and the leader's
#     private resident memory (RssAnon) before and at its peak while it is
#     taken;
#   - restart: a follower killed with SIGKILL and started again, until it
#     has applied the leader's commit index (restore + replay);
#   - join: a new node, until it has applied the commit index (snapshot
#     transfer, install, restore); it is removed again afterwards.
# Writes CSV to OUT (default target/state-curve.csv) and, if gnuplot is
# there (apt-get install gnuplot-nox), a PNG next to it.
#
#   host/benches/state_curve.sh                    # 100 MB steps to 600 MB
#   STEP_MB=50 MAX_MB=200 host/benches/state_curve.sh
#   NODE_FLAGS="--snapshot-every-entries 1000000" host/benches/state_curve.sh
set -euo pipefail
default_base_port=7501
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
step_mb="${STEP_MB:-100}"
max_mb="${MAX_MB:-600}"
out="${OUT:-$root/target/state-curve.csv}"

# Private (anonymous) resident memory: the plugin's linear memory, buffers,
# heaps; not LMDB's file-backed map, which the kernel reclaims at will.
rss_mb() { echo $(($(sed -n 's/^RssAnon:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status") / 1024)); }

for i in 1 2 3; do start_node "$i" --peers "$peers"; done
addr=$(node_addr 1)
wait_for_leader "$addr"
leader_id=$(status_field "$addr" leader_id)
leader=$(node_addr "$leader_id")
follower=$((leader_id % 3 + 1))
value=$(head -c 90 /dev/zero | tr '\0' v)
# kv state per key: 4+len(key) + 4+len(value) bytes in RKV1.
keys_per_step=$((step_mb * 1000000 / 108))

echo "state_mb,keys,fill_keys_per_s,writes_per_s,p99_ms,snapshot_s,leader_rss_before_mb,leader_rss_peak_mb,restart_s,join_s" >"$out"
echo "== leader $leader_id; steps of $step_mb MB ($keys_per_step keys) to $max_mb MB; results in $out" >&2
keys=0
state=0
next_id=4
while [ "$state" -lt "$max_mb" ]; do
  seq "$keys" $((keys + keys_per_step - 1)) | sed "s/.*/set key& $value/" >"$dir/cmds"
  t0=$(now)
  "$bin" propose --addr "$leader" --timeout-ms 120000 --file "$dir/cmds" >"$dir/out"
  fill_s=$(since "$t0")
  if [ "$(grep -vc '^OK$' "$dir/out")" != 0 ]; then
    echo "not every write was acknowledged:" >&2
    grep -v '^OK$' "$dir/out" | head -3 >&2
    exit 1
  fi
  keys=$((keys + keys_per_step))
  state=$((state + step_mb))
  fill_rate=$(echo "$keys_per_step / $fill_s" | bc)

  bench=$("$bin" bench --addr "$leader" --clients 64 --requests 20000 -o json \
    --command-template "set probe{n} {v}" --value-size 100)
  writes=$(echo "$bench" | sed -n 's/.*"throughput_per_second":\([0-9.]*\).*/\1/p')
  p99=$(echo "$bench" | sed -n 's/.*"p99":\([0-9.]*\).*/\1/p')

  # Snapshot, sampling the leader's RSS meanwhile.
  before=$(rss_mb "${pids[$leader_id]}")
  peak=$before
  t0=$(now)
  "$bin" snapshot --addr "$leader" --timeout-ms 600000 >/dev/null &
  snap=$!
  while kill -0 "$snap" 2>/dev/null; do
    r=$(rss_mb "${pids[$leader_id]}")
    [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.05
  done
  wait "$snap"
  snapshot_s=$(since "$t0")

  commit=$(status_field "$leader" commit_index)
  kill -9 "${pids[$follower]}"
  wait "${pids[$follower]}" 2>/dev/null || true
  start_node "$follower"
  restart_s=$(wait_applied "$(node_addr "$follower")" "$commit")

  join_port=$((base_port + next_id - 1))
  start_node "$next_id" --join "$leader"
  commit=$(status_field "$leader" commit_index)
  join_s=$(wait_applied "127.0.0.1:$join_port" "$commit")
  "$bin" member remove "$next_id" --addr "$leader" >/dev/null
  kill -9 "${pids[$next_id]}"
  wait "${pids[$next_id]}" 2>/dev/null || true
  unset "pids[$next_id]"
  rm -rf "$dir/n$next_id"
  next_id=$((next_id + 1))

  line="$state,$keys,$fill_rate,$writes,$p99,$snapshot_s,$before,$peak,$restart_s,$join_s"
  echo "$line" >>"$out"
  echo "$line" >&2
done

if command -v gnuplot >/dev/null; then
  png="${out%.csv}.png"
  gnuplot <<EOF
set terminal pngcairo size 1200,800 noenhanced
set output "$png"
set datafile separator ","
set key autotitle columnhead
set multiplot layout 2,2 title "raftify-host, 3 nodes, kv plugin, 100-byte values: cost against state size"
set xlabel "kv state (MB)"
set grid
set ylabel "writes/s (64 clients)"
plot "$out" using 1:4 with linespoints title "writes/s", "$out" using 1:(\$3/10) with linespoints title "fill keys/s / 10"
set ylabel "ms"
plot "$out" using 1:5 with linespoints title "p99 write latency (64 clients)"
set ylabel "seconds"
plot "$out" using 1:6 with linespoints title "snapshot", "$out" using 1:9 with linespoints title "restart", "$out" using 1:10 with linespoints title "join"
set ylabel "MB (RssAnon)"
plot "$out" using 1:7 with linespoints title "leader before a snapshot", "$out" using 1:8 with linespoints title "leader peak during it"
unset multiplot
EOF
  echo "plot: $png" >&2
fi
