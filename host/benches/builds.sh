#!/usr/bin/env bash
# Two builds side by side: a 3-node cluster of this tree's release build
# beside one of OTHER (another build of raftify-host, e.g. of the commit
# before a redesign), benched at 1 and 64 clients by this build's bench,
# rounds alternated (ABBA); each line is the median of ROUNDS (4) rounds,
# with the range. Both clusters run at once (the idle one only
# heartbeats), so both see the same machine.
#
#   git worktree add /tmp/before REV && cargo build --release --manifest-path /tmp/before/Cargo.toml -p raftify-host
#   OTHER=/tmp/before/target/release/raftify-host host/benches/builds.sh
#   EXTRA=--no-session OTHER=...   # an OTHER from before client sessions
set -euo pipefail
default_base_port=7701
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
other="${OTHER:?set OTHER to the other build of raftify-host}"
clients_list="${CLIENTS:-1 64}"
rounds="${ROUNDS:-4}"
requests="${REQUESTS:-20000}"
# shellcheck disable=SC2206
extra=(${EXTRA:-})
for i in 1 2 3; do
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/a$i" --peers "$peers" >"$dir/a$i.log" 2>&1 &
  pids[a$i]=$!
  "$other" run --id "$i" --listen "$(other_addr "$i")" --data-dir "$dir/b$i" --peers "$other_peers" \
    >"$dir/b$i.log" 2>&1 &
  pids[b$i]=$!
done
wait_for_leader "$(node_addr 1)"
wait_for_leader "$(other_addr 1)"
printf '| clients | this build | OTHER | ratio |\n|---|---|---|---|\n'
for clients in $clients_list; do
  this=() that=()
  # ABBA: each cluster's state and log grow as it goes, which would favour
  # whichever always ran first.
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) = 1 ]; then
      this+=("$(bench_rate "$(node_addr 1)" "$clients" "$requests" "${extra[@]}")")
      that+=("$(bench_rate "$(other_addr 1)" "$clients" "$requests" "${extra[@]}")")
    else
      that+=("$(bench_rate "$(other_addr 1)" "$clients" "$requests" "${extra[@]}")")
      this+=("$(bench_rate "$(node_addr 1)" "$clients" "$requests" "${extra[@]}")")
    fi
  done
  compare_row "$clients" "$rounds" "" "${this[@]}" "${that[@]}"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
