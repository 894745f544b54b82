#!/usr/bin/env bash
# How big the LMDB file grows against the data it holds, while the same
# KEYS keys (100,000) are overwritten ROUNDS times (10: a million writes of
# 100-byte values) on one node with a snapshot every 5,000 entries; then
# how long `defrag` takes for an environment of DEFRAG_MB megabytes
# (1024; 0 skips it).
#
#   host/benches/space.sh                      # the release build of this tree
#   BIN=/tmp/old/raftify-host host/benches/space.sh   # another build, side by side
#
# Prints CSV: writes, LMDB file bytes, bytes in use (blank for builds that
# do not report it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --quiet --manifest-path "$root/Cargo.toml" -p raftify-host
  BIN="$root/target/release/raftify-host"
fi
ROUNDS="${ROUNDS:-10}"
KEYS="${KEYS:-100000}"
DEFRAG_MB="${DEFRAG_MB:-1024}"

dir="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Start a node on $1 (data dir) with the rest as flags; wait (bounded) until it answers.
start() {
  local data="$1"; shift
  addr="127.0.0.1:$(free_port)"
  "$BIN" run --listen "$addr" --data-dir "$data" "$@" >"$data.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    if "$BIN" status --addr "$addr" --timeout-ms 1000 >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "the node did not start; log:" >&2; cat "$data.log" >&2; exit 1
}

stop() { kill -TERM "$pid"; wait "$pid" || true; pid=""; }

live_bytes() {
  "$BIN" status --addr "$addr" -o json | python3 -c 'import json, sys; print(json.load(sys.stdin).get("store_live_bytes", ""))'
}

echo "== $BIN: $ROUNDS x $KEYS overwrites of 100-byte values, snapshot every 5000 entries"
start "$dir/n1" --snapshot-every-entries 5000 --snapshot-keep-entries 1000 --snapshot-log-percent 0
echo "writes,file_bytes,live_bytes"
for round in $(seq 1 "$ROUNDS"); do
  "$BIN" bench --addr "$addr" --clients 64 --requests "$KEYS" --value-size 100 >/dev/null 2>&1
  # Let the snapshot due by now be stored.
  sleep 2
  echo "$((round * KEYS)),$(stat -c %s "$dir/n1/lmdb/data.mdb"),$(live_bytes)"
done
stop
if "$BIN" defrag --help >/dev/null 2>&1; then
  "$BIN" defrag --data-dir "$dir/n1"
fi

if [ "$DEFRAG_MB" -gt 0 ] && "$BIN" defrag --help >/dev/null 2>&1; then
  echo "== defrag of a ${DEFRAG_MB} MB environment"
  start "$dir/big" --snapshot-every-entries 1000000000 --quota-bytes $(( (DEFRAG_MB + 512) << 20 ))
  python3 - "$dir/big.txt" "$DEFRAG_MB" <<'EOF'
import sys
path, mb = sys.argv[1], int(sys.argv[2])
value = "x" * 1_000_000
with open(path, "w") as f:
    for i in range(mb):
        f.write(f"set big{i} {value}\n")
EOF
  "$BIN" propose --file "$dir/big.txt" --addr "$addr" --timeout-ms 600000 | sort | uniq -c | sed 's/^/   /'
  stop
  "$BIN" defrag --data-dir "$dir/big"
fi
