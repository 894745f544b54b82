#!/usr/bin/env bash
# Check a kv plugin against the shared command language on one local node.
#
#   plugins/conformance.sh target/plugins/kv-py.wasm
#
# Starts `raftify-host run --plugin FILE` on a free port with a temporary data
# dir, runs the `propose` and `query` lines of tests/conformance/kv.cases
# through the CLI, prints every mismatch and exits non-zero if there was one.
# The `raw-*` lines (bytes that skip encode) need the Rust client; the full
# suite, in a 3-node cluster with hot-swaps, is `cargo test --test t60_conformance`.
# RAFTIFY_HOST overrides the binary (default: target/debug/raftify-host).
set -euo pipefail

plugin="${1:?usage: plugins/conformance.sh FILE.wasm}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${RAFTIFY_HOST:-$root/target/debug/raftify-host}"
[ -x "$bin" ] || { echo "no $bin: run 'cargo build' first" >&2; exit 2; }

dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
addr="127.0.0.1:$port"
"$bin" run --plugin "$plugin" --listen "$addr" --data-dir "$dir/data" >"$dir/node.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT

# Ready once the plugin answers a query: a large plugin (the Python kv is
# 18 MB) compiles for a while first. RAFTIFY_COMPILE_CACHE_DIR keeps the
# compiled code between runs.
deadline=$((SECONDS + 600))
until "$bin" query --addr "$addr" --timeout-ms 2000 len >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || { cat "$dir/node.log" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "the node did not answer within 600 s" >&2; exit 1; }
  sleep 0.2
done

failures=0
checked=0
while IFS= read -r line; do
  [[ -z "$line" || "$line" == \#* ]] && continue
  kind="${line%% *}"
  rest="${line#* }"
  command="${rest% => *}"
  expected="${line##* => }"
  case "$kind" in propose | query) ;; *) continue ;; esac
  if got="$("$bin" "$kind" --addr "$addr" -- "$command" 2>&1)"; then
    :
  else
    got="${got#error: }"
    got="err: ${got#cannot encode the command: }"
  fi
  checked=$((checked + 1))
  if [ "$got" != "$expected" ]; then
    failures=$((failures + 1))
    printf 'MISMATCH  %s\n      got  %s\n' "$line" "$got"
  fi
done <"$root/tests/conformance/kv.cases"

echo "$checked checked, $failures mismatched"
[ "$failures" -eq 0 ]
