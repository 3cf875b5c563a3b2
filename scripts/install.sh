#!/usr/bin/env bash
# Create .venv and install histolab. Usage: scripts/install.sh [app|dev]
# "dev" adds the test tools. Safe to run again: it returns at once when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-app}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
req=requirements.txt
[ "$what" = dev ] && req=requirements-dev.txt
# Skip pip (tens of seconds of resolving on every CI run) when this venv already installed exactly these
# requirement files for this Python; any edit to them, or HISTOLAB_REINSTALL=1, installs again.
stamp=".venv/.histolab-install-$what"
key="$(cat requirements.txt "$req" requirements-nodeps.txt | sha256sum | cut -d' ' -f1) $(.venv/bin/python -VV | tr -d '\n')"
if [ "${HISTOLAB_REINSTALL:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
# Refuse to go on with CUDA packages: they mean torch was not the CPU build.
if .venv/bin/python -m pip list 2>/dev/null | grep -qiE '^nvidia-|^triton '; then
  echo "install.sh: CUDA packages were installed; torch must be the pinned CPU build" >&2
  exit 1
fi
printf "%s\n" "$key" > "$stamp"
