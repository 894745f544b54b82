#!/usr/bin/env bash
# The cost of metrics on the write path (issue 15): two 3-node clusters of
# the release build side by side, one run with --metrics-listen on every
# node and scraped once a second (a busy Prometheus; the default interval
# is 15 s), the other without. Rounds alternate between them; each line is
# the median of ROUNDS rounds, with the range. The node records its
# histograms and counters either way (they are cheap atomic adds); this
# measures what serving and scraping them add.
#
#   host/benches/metrics_cost.sh                # 1 and 64 clients, 3 rounds
#   CLIENTS="64" ROUNDS=5 host/benches/metrics_cost.sh
set -euo pipefail
default_base_port=7801
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
clients_list="${CLIENTS:-1 64}"
rounds="${ROUNDS:-3}"
requests="${REQUESTS:-20000}"

# Cluster "m" (metrics) on BASE_PORT.., cluster "p" (plain) on BASE_PORT+10..
for i in 1 2 3; do
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/m$i" --peers "$peers" \
    --metrics-listen "127.0.0.1:$((base_port + 19 + i))" >"$dir/m$i.log" 2>&1 &
  pids[m$i]=$!
  "$bin" run --id "$i" --listen "$(other_addr "$i")" --data-dir "$dir/p$i" --peers "$other_peers" \
    >"$dir/p$i.log" 2>&1 &
  pids[p$i]=$!
done
leader_of() { "$bin" status -o json --addr "$1" | sed -n 's/.*"leader_addr":"\([^"]*\)".*/\1/p'; }
wait_for_leader "$(node_addr 1)"
wait_for_leader "$(other_addr 1)"
m_leader=$(leader_of "$(node_addr 1)")
p_leader=$(leader_of "$(other_addr 1)")
# The scraper: every node of cluster m, once a second, for the whole run.
(
  while true; do
    for i in 1 2 3; do curl -sf "http://127.0.0.1:$((base_port + 19 + i))/metrics" >/dev/null || true; done
    sleep 1
  done
) &
pids[scraper]=$!
echo "== with metrics: leader $m_leader; without: leader $p_leader; $rounds rounds of $requests requests" >&2

bench() { bench_rate "$1" "$2" "$requests"; } # leader, clients
cpu_ms() { # user+system CPU ms of the named processes so far
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat") * 1000 / $(getconf CLK_TCK)))
  done
  echo "$total"
}
printf '| clients | with --metrics-listen, scraped 1/s | without | ratio | server CPU per write |\n|---|---|---|---|---|\n'
for clients in $clients_list; do
  m=() p=()
  m_cpu=0 p_cpu=0
  for _ in $(seq 1 "$rounds"); do
    before=$(cpu_ms "${pids[m1]}" "${pids[m2]}" "${pids[m3]}")
    m+=("$(bench "$m_leader" "$clients")")
    m_cpu=$((m_cpu + $(cpu_ms "${pids[m1]}" "${pids[m2]}" "${pids[m3]}") - before))
    before=$(cpu_ms "${pids[p1]}" "${pids[p2]}" "${pids[p3]}")
    p+=("$(bench "$p_leader" "$clients")")
    p_cpu=$((p_cpu + $(cpu_ms "${pids[p1]}" "${pids[p2]}" "${pids[p3]}") - before))
  done
  cpu="$((1000 * m_cpu / (rounds * requests))) vs $((1000 * p_cpu / (rounds * requests))) us"
  compare_row "$clients" "$rounds" "$cpu" "${m[@]}" "${p[@]}"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
