#!/usr/bin/env bash
# Build a Python plugin into a WebAssembly component with componentize-py.
# Shared by the Python plugins (kv-py/build.sh, stamp-py/build.sh):
#
#   bash componentize.sh APP_MODULE OUT.wasm PYTHON_PATH_DIR...
#
# APP_MODULE is the module defining the `StateMachine` and `Codec` export
# classes, looked up in the PYTHON_PATH_DIRs (relative to the current
# directory), which hold all the plugin's Python code. The WIT is the repo's
# wit/0.2.0/ (world raftify:fsm/plugin@0.2.0: snapshots in chunks).
#
# The pinned componentize-py (requirements.txt next to this script) lives in a
# venv under target/plugin-tools/py, created and installed on first use and
# reused afterwards; it is reinstalled when requirements.txt changes. A build
# whose inputs (Python sources, WIT, toolchain pins, this script) have not
# changed since the last build of OUT.wasm is skipped, keeping the same bytes;
# RAFTIFY_PLUGIN_REBUILD=1 forces it.
set -euo pipefail

die() { echo "componentize.sh: $*" >&2; exit 1; }

[ "$#" -ge 3 ] || die "usage: componentize.sh APP_MODULE OUT.wasm PYTHON_PATH_DIR..."
app="$1"
out="$2"
shift 2
python_path=("$@")

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
wit="$root/wit/0.2.0"
requirements="$here/requirements.txt"
tools="$root/target/plugin-tools"
venv="$tools/py"
cpy="$venv/bin/componentize-py"

for dir in "${python_path[@]}"; do
  [ -d "$dir" ] || die "no Python source directory '$dir' (from $PWD)"
done
[ -d "$wit" ] || die "no WIT directory at $wit"
mkdir -p "$tools" "$(dirname "$out")"
# An absolute path without `..`: it names the build record below.
out="$(cd "$(dirname "$out")" && pwd -P)/$(basename "$out")"

# One build at a time per checkout: the venv and the build records are shared.
exec 9>"$tools/.lock"
if command -v flock >/dev/null; then flock 9; fi

# --- The toolchain: a venv with the pinned componentize-py -----------------
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$cpy" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  command -v python3 >/dev/null ||
    die "python3 is needed to install componentize-py (Debian: apt-get install python3 python3-venv)"
  if [ ! -x "$venv/bin/pip" ]; then
    echo "componentize.sh: creating the Python plugin toolchain venv in $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" ||
      die "'python3 -m venv' failed (Debian: apt-get install python3-venv)"
  fi
  echo "componentize.sh: installing $(grep -v '^#' "$requirements" | xargs) into $venv" >&2
  "$venv/bin/pip" install --disable-pip-version-check --no-input --quiet \
    --only-binary :all: --require-virtualenv -r "$requirements" ||
    die "pip could not install $requirements (is PyPI reachable?)"
  echo "$want" >"$venv/.requirements.sha256"
fi

# --- Skip the build if nothing it reads has changed ------------------------
inputs_hash() {
  {
    echo "app=$app"
    "$cpy" --version
    sha256sum "$requirements" "${BASH_SOURCE[0]}"
    find "$wit" "${python_path[@]}" -type f \( -name '*.py' -o -name '*.wit' \) \
      -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
record="$tools/built/$(echo -n "$out" | sha256sum | cut -c1-16)"
inputs="$(inputs_hash)"
if [ "${RAFTIFY_PLUGIN_REBUILD:-0}" != 1 ] && [ -f "$out" ] && [ -f "$record" ] &&
  [ "$(cat "$record")" = "$inputs $(sha256sum "$out" | cut -d' ' -f1)" ]; then
  echo "componentize.sh: $out is up to date" >&2
  exit 0
fi

# --- Build -----------------------------------------------------------------
# componentize-py adds the site-packages of $VIRTUAL_ENV (else of whatever
# python3 is on PATH) to the Python path. Point it at an empty one, so the
# component holds only the plugin's own code (and the build does not depend
# on what happens to be installed on this machine).
empty_env="$tools/empty-env"
mkdir -p "$empty_env/lib/site-packages"

paths=()
for dir in "${python_path[@]}"; do paths+=(-p "$dir"); done
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
start=$SECONDS
VIRTUAL_ENV="$empty_env" "$cpy" -q -d "$wit" -w plugin componentize "${paths[@]}" "$app" -o "$tmp" ||
  die "componentize-py failed to build $app (see the Python error above)"
mv "$tmp" "$out"
mkdir -p "$tools/built"
echo "$inputs $(sha256sum "$out" | cut -d' ' -f1)" >"$record"
echo "componentize.sh: built $out ($(stat -c %s "$out") bytes) in $((SECONDS - start)) s" >&2
