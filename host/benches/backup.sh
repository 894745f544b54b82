#!/usr/bin/env bash
# Backup and restore of a large state (issue 15): fill a 3-node cluster of
# the release build (kv plugin, fsync on) with STATE_MB of kv state in
# 100-byte values, then time
#   - save: `snapshot save` from a follower (it takes a snapshot at the next
#     epoch, then streams it with the plugin to a file, checked whole);
#   - check: `debug snapshot` (reads and checks every byte);
#   - restore: `snapshot restore` into a new data dir;
#   - start: the restored node, until it leads and answers `len`.
#
#   host/benches/backup.sh              # 100 MB
#   STATE_MB=300 host/benches/backup.sh
set -euo pipefail
default_base_port=7601
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
state_mb="${STATE_MB:-100}"

for i in 1 2 3; do
  "$bin" run --id "$i" --listen "$(node_addr "$i")" --data-dir "$dir/n$i" --peers "$peers" >>"$dir/n$i.log" 2>&1 &
  pids[$i]=$!
done
wait_for_leader "$(node_addr 1)"
leader_id=$(status_field "$(node_addr 1)" leader_id)
leader=$(node_addr "$leader_id")
follower=$(node_addr $((leader_id % 3 + 1)))
fill_kv "$leader" "$state_mb"

t0=$(now)
"$bin" snapshot save "$dir/backup" --addr "$follower" --timeout-ms 600000 >&2
save_s=$(since "$t0")
size_mb=$(($(stat -c %s "$dir/backup") / 1000000))
t0=$(now)
"$bin" debug snapshot "$dir/backup" >/dev/null
check_s=$(since "$t0")
for i in 1 2 3; do kill -9 "${pids[$i]}"; done

addr=$(node_addr 4)
t0=$(now)
"$bin" snapshot restore "$dir/backup" --data-dir "$dir/restored" --id 1 --listen "$addr" >&2
restore_s=$(since "$t0")
t0=$(now)
"$bin" run --data-dir "$dir/restored" --listen "$addr" >>"$dir/restored.log" 2>&1 &
pids[restored]=$!
wait_for_leader "$addr"
len=$("$bin" query len --addr "$addr" --timeout-ms 600000)
start_s=$(since "$t0")
if [ "$len" != "$keys" ]; then
  echo "the restored node has $len keys, not $keys" >&2
  exit 1
fi
printf '| state | file | save | check | restore | start until it answers |\n|---|---|---|---|---|---|\n'
printf '| %s MB (%s keys) | %s MB | %.1f s | %.1f s | %.1f s | %.1f s |\n' \
  "$state_mb" "$keys" "$size_mb" "$save_s" "$check_s" "$restore_s" "$start_s"
