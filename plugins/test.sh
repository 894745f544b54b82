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
echo "== kv-py (python3 -m unittest)"
(cd "$here/kv-py" && python3 -m unittest discover -s tests)
echo "== stamp-py (python3 -m unittest)"
(cd "$here/stamp-py" && python3 -m unittest discover -s tests)
echo "== kv-c (gcc, ASan + UBSan)"
bash "$here/kv-c/test.sh"
