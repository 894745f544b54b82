#!/usr/bin/env bash
# Test the C kv plugin.
#
#   bash plugins/kv-c/test.sh            # native unit test only
#   bash plugins/kv-c/test.sh --wasm     # and the built component on a real node
#
# 1. The native unit test: src/kv.c, map.c and text.c compiled with the
#    host's C compiler (under AddressSanitizer and UndefinedBehaviorSanitizer
#    when the compiler has them) and run on tests/conformance/kv.cases (every
#    line, raw-* included) plus the snapshot format, restore's errors, Rust's
#    {:?} quoting and a 100k-key state.
# 2. With --wasm: builds target/plugins/kv-c.wasm and runs
#    plugins/conformance.sh on it (needs target/debug/raftify-host).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cc="${CC:-cc}"
command -v "$cc" >/dev/null || { echo "kv-c test: no C compiler ($cc); apt-get install gcc" >&2; exit 1; }

bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
flags=(-std=c11 -O1 -g -Wall -Wextra -Werror -I "$here/src")
sources=("$here/src/kv.c" "$here/src/map.c" "$here/src/text.c" "$here/test/kv_test.c")
sanitize=(-fsanitize=address,undefined -fno-sanitize-recover=all)
if ! echo 'int main(void){return 0;}' | "$cc" "${sanitize[@]}" -x c - -o "$bin/probe" 2>/dev/null; then
  # Without them the test would pass over memory errors: refuse, unless asked.
  if [ "${KV_C_NO_SANITIZERS:-0}" != 1 ]; then
    echo "kv-c test: $cc has no ASan/UBSan (apt-get install gcc, or set KV_C_NO_SANITIZERS=1 to test without)" >&2
    exit 1
  fi
  echo "kv-c test: KV_C_NO_SANITIZERS=1: testing without sanitizers" >&2
  sanitize=()
fi
"$cc" "${flags[@]}" "${sanitize[@]}" "${sources[@]}" -o "$bin/kv_test"
"$bin/kv_test" "$root/tests/conformance/kv.cases"

if [ "${1:-}" = --wasm ]; then
  (cd "$here" && bash ./build.sh "$root/target/plugins/kv-c.wasm")
  bash "$root/plugins/conformance.sh" "$root/target/plugins/kv-c.wasm"
fi
