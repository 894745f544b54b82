#!/usr/bin/env bash
# Build stamp-py (kv-py plus `stamp K`) as a WebAssembly component.
#
#   plugins/build.sh stamp-py                       # -> target/plugins/stamp-py.wasm
#   cd plugins/stamp-py && bash ./build.sh OUT.wasm # what plugins/build.sh runs
#
# The kv language comes from ../kv-py/src, put on the Python path next to
# src/; the toolchain and the build steps are kv-py's (../kv-py/componentize.sh).
set -euo pipefail
out="${1:?usage: build.sh OUT.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")"
exec bash ../kv-py/componentize.sh stamp "$out" src ../kv-py/src
