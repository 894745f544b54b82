#!/usr/bin/env bash
# Build the TypeScript kv plugin into a WebAssembly component.
#
#   bash ./build.sh OUT.wasm        # from plugins/kv-ts (plugins/build.sh kv-ts does this)
#
# Steps: `npm ci` (only when node_modules is missing or older than
# package-lock.json), `tsc` (src/ -> dist/), then componentize-qjs, which
# embeds dist/ in the QuickJS engine, runs its top-level code and snapshots
# the result into a component for the WIT world raftify:fsm/plugin@0.2.0.
#
# Needs Node >= 18 and npm, and the npm registry the first time.
set -euo pipefail

out="${1:?usage: build.sh OUT.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$here/../../wit/0.2.0"
cd "$here"

fail() {
  echo "kv-ts/build.sh: $*" >&2
  exit 1
}

command -v node >/dev/null || fail "node is not installed (Node >= 18 and npm are needed)"
command -v npm >/dev/null || fail "npm is not installed (Node >= 18 and npm are needed)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 18 ] || fail "Node $(node --version) is too old: need >= 18"
[ -d "$wit" ] || fail "no WIT directory at $wit"

# Install exactly what package-lock.json pins, unless that is already done.
# The stamp records which lockfile node_modules was installed from.
stamp="node_modules/.kv-ts-lock.sha256"
lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_hash" ]; then
  echo "kv-ts: npm ci" >&2
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error ||
    fail "npm ci failed (is the npm registry reachable?)"
  echo "$lock_hash" >"$stamp"
fi

# TypeScript -> JavaScript (ES modules) in dist/.
rm -rf dist
node_modules/.bin/tsc -p . || fail "tsc failed"

# JavaScript -> component.
#   --sync       a plain (non-async) component: the host does not enable the
#                component-model async ABI.
#   --stub-wasi  no WASI imports at all: the component imports nothing, as the
#                plugin world says. Date.now() and friends trap (README.md).
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
node_modules/.bin/componentize-qjs \
  --wit "$wit" --world plugin --js dist/index.js \
  --sync --stub-wasi -o "$tmp" >/dev/null ||
  fail "componentize-qjs failed"
mv -f "$tmp" "$out"
echo "kv-ts: $out ($(stat -c %s "$out") bytes)" >&2
