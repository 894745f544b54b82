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
# The address of node `id`; of node `id` of a second cluster beside it
# (for the scripts that compare two), on BASE_PORT + 10...
node_addr() { echo "127.0.0.1:$((base_port + $1 - 1))"; }
other_addr() { echo "127.0.0.1:$((base_port + 9 + $1))"; }
peers="" other_peers=""
for i in 1 2 3; do
  peers="$peers${peers:+,}$i=$(node_addr "$i")"
  other_peers="$other_peers${other_peers:+,}$i=$(other_addr "$i")"
done
# Every process a script starts, by name: killed at exit.
declare -A pids
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# Start node `id` of the cluster on node_addr(id), its data in $dir/n$id and
# its log in $dir/n$id.log, with NODE_FLAGS and `extra` flags.
start_node() { # id, extra flags...
  local id="$1"
  shift
  # shellcheck disable=SC2086
  "$bin" run --id "$id" --listen "$(node_addr "$id")" --data-dir "$dir/n$id" ${NODE_FLAGS:-} "$@" \
    >>"$dir/n$id.log" 2>&1 &
  pids[$id]=$!
}
# Seconds since the epoch, and since a time taken with now.
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
# Wait (up to 10 min) until the node at `addr` applied `index`: prints the seconds.
wait_applied() { # addr, index: seconds waited
  local t0 applied
  t0=$(now)
  for _ in $(seq 1 6000); do
    applied=$(status_field "$1" applied_index)
    if [ -n "$applied" ] && [ "$applied" -ge "$2" ]; then
      since "$t0"
      return
    fi
    sleep 0.1
  done
  echo "node at $1 did not reach $2" >&2
  exit 1
}

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

# Fill the cluster through `addr` with `mb` MB of kv state in 100-byte
# values (keys key0, key1, ...), every write acknowledged; sets `keys`.
fill_kv() { # addr, mb
  local addr="$1" mb="$2" value
  value=$(head -c 90 /dev/zero | tr '\0' v)
  # kv state per key: 4+len(key) + 4+len(value) bytes in RKV1.
  keys=$((mb * 1000000 / 108))
  echo "== filling $mb MB ($keys keys) through $addr" >&2
  seq 0 $((keys - 1)) | sed "s/.*/set key& $value/" >"$dir/cmds"
  "$bin" propose --addr "$addr" --timeout-ms 120000 --file "$dir/cmds" >"$dir/out"
  if [ "$(grep -vc '^OK$' "$dir/out")" != 0 ]; then
    echo "not every write was acknowledged:" >&2
    grep -v '^OK$' "$dir/out" | head -3 >&2
    exit 1
  fi
  rm "$dir/cmds" "$dir/out"
}

# One closed-loop bench round: "writes/s p99_ms" (fails on any error).
bench_rate() { # addr, clients, requests, extra bench flags...
  local addr="$1" clients="$2" requests="$3"
  shift 3
  "$bin" bench --addr "$addr" --clients "$clients" --requests "$requests" -o json "$@" 2>/dev/null |
    python3 -c 'import json,sys
r=json.load(sys.stdin)
assert r["errors"]==0, r["first_error"]
print(r["throughput_per_second"], r["latency_ms"]["p99"])'
}

# A markdown row comparing two sets of N `bench_rate` rounds, A then B:
# "| LABEL | A median (range), p99 | B ... | ratio |" and EXTRA as a last
# column if given.
compare_row() { # label, n, extra, A rounds..., B rounds...
  python3 - "$@" <<'PY'
import statistics, sys
label, n, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [tuple(map(float, x.split())) for x in sys.argv[4:]]
def show(rows):
    rates, p99 = [x[0] for x in rows], [x[1] for x in rows]
    text = f"{statistics.median(rates):,.0f}/s ({min(rates):,.0f}-{max(rates):,.0f}), p99 {statistics.median(p99):.1f} ms"
    return statistics.median(rates), text
(ar, at), (br, bt) = show(rows[:n]), show(rows[n:])
print(f"| {label} | {at} | {bt} | {ar / br:.2f} |" + (f" {extra} |" if extra else ""))
PY
}
