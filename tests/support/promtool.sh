#!/usr/bin/env bash
# Print the path of promtool (Debian's `prometheus` package), installing the
# package first when it is missing and this is a Debian machine run as root
# (as the plugin builds install their tools). Anything else is an error that
# says what to install.
set -euo pipefail
if ! command -v promtool >/dev/null; then
  cmd="apt-get update && apt-get install -y --no-install-recommends prometheus"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "promtool is missing; as root, run: $cmd" >&2
    exit 1
  fi
  echo "installing promtool (apt: prometheus)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
command -v promtool
