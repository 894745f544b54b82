#!/usr/bin/env bash
# Differential test: the C kv against the Rust kv, natively, on the same
# operations, comparing every result, error message and snapshot byte.
#
#   bash plugins/kv-c/tools/difftest/run.sh [OPS_PER_SEED] [SEEDS...]
#
# Compiles plugins/kv/src/lib.rs with rustc (against a stub of the guest SDK)
# and src/*.c with cc, feeds both the output of gen_ops.py, plus every
# Unicode code point through encode's error path (Rust's {:?} quoting), and
# diffs. Needs rustc, cc and python3; takes about a minute. A development
# tool, not part of the build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
plugin="$(cd "$here/../.." && pwd)"
root="$(cd "$plugin/../.." && pwd)"
count="${1:-100000}"
shift || true
seeds=("${@:-1 2 3}")
read -r -a seeds <<<"${seeds[*]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# rustc from the project's directory, so rust-toolchain.toml picks the version.
(
  cd "$root"
  rustc --edition 2021 --crate-type rlib --crate-name raftify_guest \
    "$here/raftify_guest_stub.rs" -o "$work/libraftify_guest.rlib"
  rustc -O --edition 2021 --crate-type rlib --crate-name kv "$root/plugins/kv/src/lib.rs" \
    --extern raftify_guest="$work/libraftify_guest.rlib" -o "$work/libkv.rlib"
  rustc -O --edition 2021 "$here/driver.rs" -L "$work" \
    --extern kv="$work/libkv.rlib" --extern raftify_guest="$work/libraftify_guest.rlib" \
    -o "$work/rust-driver"
)
cc -std=c11 -O1 -g -Wall -Wextra -Werror -fsanitize=address,undefined -fno-sanitize-recover=all \
  -I "$plugin/src" "$here/driver.c" "$plugin"/src/{kv,map,text}.c -o "$work/c-driver"

failed=0
compare() {
  local name="$1" ops="$2"
  "$work/rust-driver" <"$ops" >"$work/rust.out"
  "$work/c-driver" <"$ops" >"$work/c.out"
  if cmp -s "$work/rust.out" "$work/c.out"; then
    echo "$name: $(wc -l <"$ops") operations, identical"
  else
    failed=1
    echo "$name: DIFFERENT; first differences (operation, rust, c):"
    paste -d '\n' "$ops" "$work/rust.out" "$work/c.out" |
      awk 'NR%3==1{op=$0} NR%3==2{r=$0} NR%3==0{if(r!=$0){print op; print "  rust " r; print "  c    " $0; if(++n==5) exit}}'
  fi
}

for seed in "${seeds[@]}"; do
  python3 "$here/gen_ops.py" "$seed" "$count" >"$work/ops.txt"
  compare "seed $seed" "$work/ops.txt"
done

# Every code point, 16 at a time, in an unknown verb and in a bad increment:
# the error messages quote them with Rust's {:?}.
python3 - >"$work/codepoints.txt" <<'EOF'
points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
for i in range(0, len(points), 16):
    chunk = "".join(map(chr, points[i:i + 16]))
    print("encode " + ("x" + chunk).encode().hex())
    print("encode " + ("incr a " + chunk).encode().hex())
EOF
compare "all code points" "$work/codepoints.txt"

exit "$failed"
