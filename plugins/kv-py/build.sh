#!/usr/bin/env bash
# Build kv-py, the kv state machine in Python, as a WebAssembly component.
#
#   plugins/build.sh kv-py                       # -> target/plugins/kv-py.wasm
#   cd plugins/kv-py && bash ./build.sh OUT.wasm # what plugins/build.sh runs
#
# Needs python3 (with venv and pip) and PyPI on first use; see README.md.
set -euo pipefail
out="${1:?usage: build.sh OUT.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")"
exec bash ./componentize.sh app "$out" src
