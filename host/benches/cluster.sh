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
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --manifest-path "$root/Cargo.toml" -p raftify-host >&2
fi
bin="${BIN:-$root/target/release/raftify-host}"
dir="$(mktemp -d)"
base_port="${BASE_PORT:-7401}"
peers=""
for i in 1 2 3; do peers="$peers${peers:+,}$i=127.0.0.1:$((base_port + i - 1))"; done
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
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
  "$bin" run --id "$i" --listen "127.0.0.1:$((base_port + i - 1))" --data-dir "$dir/n$i" --peers "$peers" \
    "${node_tls[@]}" >"$dir/n$i.log" 2>&1 &
  pids+=("$!")
done
addr="127.0.0.1:$base_port"
for _ in $(seq 1 300); do
  if "$bin" status -o json --addr "$addr" "${client_tls[@]}" 2>/dev/null | grep -q '"leader_id":[1-9]'; then break; fi
  sleep 0.1
done
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
  rss_kb=$(ps -o rss= -p "${pids[$((i - 1))]}" | tr -d ' ')
  echo "node $i RSS: $((rss_kb / 1024)) MiB"
done
