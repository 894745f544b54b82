#!/usr/bin/env bash
# raftify-host against etcd, side by side (issue 14): a 3-node etcd
# (Debian's etcd-server, installed when missing, as root) and a 3-node
# raftify-host (release build, kv plugin) on 127.0.0.1, both with fsync on,
# driven by the same closed loop (`raftify-host bench`, which speaks etcd's
# KV API with --etcd): every client over one shared connection to the
# leader, 100-byte values. Rounds alternate between the two systems; each
# line is the median of ROUNDS rounds, with the range.
#
#   host/benches/vs_etcd.sh                           # 1, 16, 64, 256 clients, 3 rounds
#   CLIENTS="64" ROUNDS=5 REQUESTS=40000 host/benches/vs_etcd.sh
#   BIN=/path/to/raftify-host host/benches/vs_etcd.sh
set -euo pipefail
default_base_port=7701
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
clients_list="${CLIENTS:-1 16 64 256}"
rounds="${ROUNDS:-3}"
requests="${REQUESTS:-20000}"

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "etcd is missing; as root, run: apt-get install etcd-server etcd-client" >&2
    exit 1
  fi
  echo "== installing etcd (apt: etcd-server etcd-client)" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server etcd-client >/dev/null
fi
echo "== $(etcd --version | head -1); $("$bin" --version)" >&2

# etcd: client ports 23791-3, peer ports 23801-3.
cluster=""
for i in 1 2 3; do cluster="$cluster${cluster:+,}e$i=http://127.0.0.1:$((23800 + i))"; done
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$dir/e$i" \
    --listen-client-urls "http://127.0.0.1:$((23790 + i))" --advertise-client-urls "http://127.0.0.1:$((23790 + i))" \
    --listen-peer-urls "http://127.0.0.1:$((23800 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((23800 + i))" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token vs-raftify \
    --log-level error >"$dir/e$i.log" 2>&1 &
  pids[e$i]=$!
done
# raftify-host
for i in 1 2 3; do
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/n$i" --peers "$peers" >"$dir/n$i.log" 2>&1 &
  pids[n$i]=$!
done
wait_for_leader "$(node_addr 1)"
leader="$("$bin" status -o json --addr "$(node_addr 1)" | sed -n 's/.*"leader_addr":"\([^"]*\)".*/\1/p')"
etcd_endpoints="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
etcd_leader=""
for _ in $(seq 1 300); do
  etcd_leader=$(ETCDCTL_API=3 etcdctl --endpoints "$etcd_endpoints" endpoint status -w json 2>/dev/null |
    python3 -c 'import json,sys
for e in json.load(sys.stdin):
    if e["Status"]["header"]["member_id"] == e["Status"]["leader"]: print(e["Endpoint"])' || true)
  [ -n "$etcd_leader" ] && break
  sleep 0.1
done
[ -n "$etcd_leader" ] || { echo "etcd elected no leader" >&2; exit 1; }
echo "== raftify-host leader $leader; etcd leader $etcd_leader; $rounds rounds of $requests requests each" >&2

# bench SYSTEM CLIENTS [--queries]: "writes/s p99_ms"
bench() {
  local system="$1" clients="$2"
  shift 2
  local out
  if [ "$system" = etcd ]; then
    out=$("$bin" bench --etcd --addr "$etcd_leader" --clients "$clients" --requests "$requests" -o json "$@" 2>/dev/null)
  else
    out=$("$bin" bench --addr "$leader" --clients "$clients" --requests "$requests" -o json "$@" 2>/dev/null)
  fi
  echo "$out" | python3 -c 'import json,sys
r=json.load(sys.stdin)
assert r["errors"]==0, r["first_error"]
print(r["throughput_per_second"], r["latency_ms"]["p99"])'
}
cpu_ms() { # total user+system CPU ms of the named processes so far
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat") * 1000 / $(getconf CLK_TCK)))
  done
  echo "$total"
}
printf '%-28s %-52s %-52s %s\n' "load" "raftify-host" "etcd" "ratio (writes/s, p99)"
run_case() { # label, clients, extra bench flags...
  local label="$1" clients="$2"
  shift 2
  local r=() e=() i
  local r_cpu=0 e_cpu=0 r_ops=0 e_ops=0 before line
  for i in $(seq 1 "$rounds"); do
    before=$(cpu_ms "${pids[n1]}" "${pids[n2]}" "${pids[n3]}")
    line=$(bench raftify "$clients" "$@")
    r+=("$line")
    r_cpu=$((r_cpu + $(cpu_ms "${pids[n1]}" "${pids[n2]}" "${pids[n3]}") - before))
    r_ops=$((r_ops + requests))
    before=$(cpu_ms "${pids[e1]}" "${pids[e2]}" "${pids[e3]}")
    line=$(bench etcd "$clients" "$@")
    e+=("$line")
    e_cpu=$((e_cpu + $(cpu_ms "${pids[e1]}" "${pids[e2]}" "${pids[e3]}") - before))
    e_ops=$((e_ops + requests))
  done
  python3 - "$label" "$r_cpu" "$r_ops" "$e_cpu" "$e_ops" "${#r[@]}" "${r[@]}" "${e[@]}" <<'EOF'
import statistics, sys
label, r_cpu, r_ops, e_cpu, e_ops, n = sys.argv[1], *map(float, sys.argv[2:6]), int(sys.argv[6])
rows = [tuple(map(float, x.split())) for x in sys.argv[7:]]
r, e = rows[:n], rows[n:]
def show(rows):
    rates, p99 = [x[0] for x in rows], [x[1] for x in rows]
    return (statistics.median(rates), statistics.median(p99),
            f"{statistics.median(rates):>7,.0f}/s ({min(rates):,.0f}-{max(rates):,.0f}) p99 {statistics.median(p99):.1f} ms ({min(p99):.1f}-{max(p99):.1f})")
rr, rp, rt = show(r)
er, ep, et = show(e)
cpu = f"server CPU per op {1000 * r_cpu / r_ops:.0f} vs {1000 * e_cpu / e_ops:.0f} us"
print(f"{label:<28} {rt:<52} {et:<52} {rr / er:.2f}x, {rp / ep:.2f}x; {cpu}")
EOF
}
for c in $clients_list; do
  run_case "$c clients, writes" "$c"
done
run_case "64 clients, linearizable reads" 64 --queries
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
