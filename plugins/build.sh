#!/usr/bin/env bash
# Build sample plugins into target/plugins/NAME.wasm.
#
#   plugins/build.sh            # every plugin
#   plugins/build.sh kv chaos   # just these
#
# Rust plugins (a Cargo.toml in their folder) are built with cargo for
# wasm32-wasip2. A plugin folder with its own build.sh is built by it, called
# as `build.sh OUT.wasm` from inside the folder.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="$root/target/plugins"
mkdir -p "$out"

all_plugins() {
  for dir in "$here"/*/; do
    name="$(basename "$dir")"
    [ "$name" = target ] && continue
    if [ -f "$dir/Cargo.toml" ] || [ -f "$dir/build.sh" ]; then echo "$name"; fi
  done
}

if [ "$#" -eq 0 ]; then
  mapfile -t names < <(all_plugins)
else
  names=("$@")
fi

rust=()
for name in "${names[@]}"; do
  dir="$here/$name"
  if [ -f "$dir/build.sh" ]; then
    (cd "$dir" && bash ./build.sh "$out/$name.wasm")
  elif [ -f "$dir/Cargo.toml" ]; then
    rust+=("-p" "$name")
  else
    echo "plugins/build.sh: no plugin named '$name' (expected plugins/$name/Cargo.toml or plugins/$name/build.sh)" >&2
    exit 1
  fi
done

if [ "${#rust[@]}" -gt 0 ]; then
  # Not a pipe into grep -q: under pipefail its early exit can fail the test.
  if ! grep -qx wasm32-wasip2 <<<"$(rustup target list --installed 2>/dev/null)"; then
    rustup target add wasm32-wasip2
  fi
  cargo build --release --locked --target wasm32-wasip2 \
    --manifest-path "$here/Cargo.toml" --target-dir "$root/target/plugin-build" "${rust[@]}"
  for ((i = 1; i < ${#rust[@]}; i += 2)); do
    name="${rust[$i]}"
    # cargo names artifacts with underscores (kv-v2 -> kv_v2.wasm).
    cp "$root/target/plugin-build/wasm32-wasip2/release/${name//-/_}.wasm" "$out/$name.wasm"
  done
fi

for name in "${names[@]}"; do
  printf '%s\t%s bytes\n' "$out/$name.wasm" "$(stat -c %s "$out/$name.wasm")"
done
