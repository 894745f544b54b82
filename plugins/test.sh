#!/usr/bin/env bash
# Unit tests of the plugins not written in Rust (the Rust ones run with
# `cargo test --manifest-path plugins/Cargo.toml`). Each checks its plugin's
# logic natively, every line of tests/conformance/kv.cases included; the
# components themselves are tested in a live cluster by tests/t60_conformance.rs.
# Run after `plugins/build.sh kv-ts kv-py kv-c stamp-py`, which installs the tools.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

echo "== kv-ts (node --test)"
(cd "$here/kv-ts" && npm test --silent)
# `unittest discover` exits 0 when it finds no test (before Python 3.12):
# insist that it ran some.
unittests() {
  local out
  out="$(cd "$1" && python3 -m unittest discover -s tests 2>&1)" || { echo "$out"; return 1; }
  echo "$out" | tail -n 3
  # A here-string, not a pipe: under pipefail, `echo | grep -q` fails when
  # grep exits before echo has written everything (SIGPIPE), which a busy
  # machine makes happen.
  if ! grep -Eq '^Ran [1-9][0-9]* tests?' <<<"$out"; then
    echo "$1: unittest found no tests" >&2
    return 1
  fi
}
echo "== kv-py (python3 -m unittest)"
unittests "$here/kv-py"
echo "== stamp-py (python3 -m unittest)"
unittests "$here/stamp-py"
echo "== kv-c (gcc, ASan + UBSan)"
bash "$here/kv-c/test.sh"
