# Shared by the benchmark scripts (sourced, not run): the binary, a scratch
# dir removed at exit with every process started, and a 3-node cluster's
# addresses.
#
#   BIN=/path/to/raftify-host   another build (nothing is built then)
#   BASE_PORT=7501              node i listens on BASE_PORT + i - 1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --manifest-path "$root/Cargo.toml" -p raftify-host >&2
fi
bin="${BIN:-$root/target/release/raftify-host}"
dir="$(mktemp -d)"
base_port="${BASE_PORT:-$default_base_port}"
peers=""
for i in 1 2 3; do peers="$peers${peers:+,}$i=127.0.0.1:$((base_port + i - 1))"; done
# Every process a script starts, by name: killed at exit.
declare -A pids
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# The address of node `id`.
node_addr() { echo "127.0.0.1:$((base_port + $1 - 1))"; }

# A number from `status -o json` of the node at `addr`.
status_field() { # addr, field, extra client flags...
  local addr="$1" name="$2"
  shift 2
  "$bin" status -o json --addr "$addr" "$@" 2>/dev/null | sed -n "s/.*\"$name\":\([0-9]*\).*/\1/p"
}

# Wait (up to 30 s) until the node at `addr` knows a leader.
wait_for_leader() { # addr, extra client flags...
  local addr="$1"
  shift
  for _ in $(seq 1 300); do
    if grep -q '"leader_id":[1-9]' <<<"$("$bin" status -o json --addr "$addr" "$@" 2>/dev/null)"; then return; fi
    sleep 0.1
  done
  echo "no leader at $addr within 30 s" >&2
  exit 1
}
