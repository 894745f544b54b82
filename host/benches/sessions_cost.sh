#!/usr/bin/env bash
# The cost of sessions on the write path (issue 16): one 3-node cluster of
# the release build, benched at 1 and 64 clients in sessions (the bench's
# default: each client opens one and proposes exactly once in it) and
# with `--no-session`,
# rounds alternated (ABBA); each line is the median of ROUNDS (4) rounds,
# with the range.
#
#   host/benches/sessions_cost.sh
#   CLIENTS="64" ROUNDS=5 host/benches/sessions_cost.sh
set -euo pipefail
default_base_port=7951
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
clients_list="${CLIENTS:-1 64}"
rounds="${ROUNDS:-4}"
requests="${REQUESTS:-20000}"
for i in 1 2 3; do
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/n$i" --peers "$peers" >"$dir/n$i.log" 2>&1 &
  pids[n$i]=$!
done
wait_for_leader "$(node_addr 1)"
bench() { # clients, extra flags: "writes/s p99_ms"
  local clients="$1"
  shift
  bench_rate "$(node_addr 1)" "$clients" "$requests" "$@"
}
printf '| clients | in sessions | without | ratio |\n|---|---|---|---|\n'
for clients in $clients_list; do
  with=() without=()
  # ABBA: the cluster's state and log grow as it goes, which would favour
  # whichever always ran first.
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) = 1 ]; then
      with+=("$(bench "$clients")")
      without+=("$(bench "$clients" --no-session)")
    else
      without+=("$(bench "$clients" --no-session)")
      with+=("$(bench "$clients")")
    fi
  done
  compare_row "$clients" "$rounds" "" "${with[@]}" "${without[@]}"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
