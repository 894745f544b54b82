#!/usr/bin/env bash
# Start a 3-node cluster on 127.0.0.1 (release build, fsync on), run the
# bench tool against it at several client counts, then stop every node.
#
#   host/benches/cluster.sh                 # 1, 16, 64 and 256 clients
#   CLIENTS="64" REQUESTS=100000 host/benches/cluster.sh
#   EXTRA="--queries --consistency stale" host/benches/cluster.sh
#   EXTRA="--stream" host/benches/cluster.sh     # proposals over ProposeStream
#   TLS=1 host/benches/cluster.sh                # mutual TLS between peers, TLS to clients
#   BIN=/tmp/old/raftify-host host/benches/cluster.sh   # another build, for a side by side
#
# The bench drives the leader (found through node 1) over one shared
# connection, as an application would.
set -euo pipefail
default_base_port=7401
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
client_tls=()
if [ "${TLS:-0}" = 1 ]; then
  "$bin" tls init "$dir/certs" >/dev/null
  for i in 1 2 3; do "$bin" tls issue "$dir/certs" "n$i" --san 127.0.0.1 >/dev/null; done
  client_tls=(--tls-ca "$dir/certs/ca.pem")
fi
for i in 1 2 3; do
  node_tls=()
  if [ "${TLS:-0}" = 1 ]; then
    node_tls=(--tls-ca "$dir/certs/ca.pem" --tls-cert "$dir/certs/n$i.pem" --tls-key "$dir/certs/n$i-key.pem")
  fi
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/n$i" --peers "$peers" \
    "${node_tls[@]}" >"$dir/n$i.log" 2>&1 &
  pids[$i]=$!
done
addr=$(node_addr 1)
wait_for_leader "$addr" "${client_tls[@]}"
leader_addr=$("$bin" status -o json --addr "$addr" "${client_tls[@]}" | sed -n 's/.*"leader_addr":"\([^"]*\)".*/\1/p')
echo "== leader at $leader_addr; TLS ${TLS:-0}; one shared connection"
addr="$leader_addr"
for clients in ${CLIENTS:-1 16 64 256}; do
  requests="${REQUESTS:-$((clients * 500 < 2000 ? 2000 : clients * 500))}"
  echo "== $clients clients, $requests requests"
  # shellcheck disable=SC2086
  "$bin" bench --addr "$addr" --clients "$clients" --requests "$requests" "${client_tls[@]}" ${EXTRA:-}
done
for i in 1 2 3; do
  rss_kb=$(ps -o rss= -p "${pids[$i]}" | tr -d ' ')
  echo "node $i RSS: $((rss_kb / 1024)) MiB"
done
