#!/usr/bin/env bash
# Create .venv and install histolab. Usage: scripts/install.sh [app|dev]
# "dev" adds the test tools. Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-app}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
req=requirements.txt
[ "$what" = dev ] && req=requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
# Refuse to go on with CUDA packages: they mean torch was not the CPU build.
if .venv/bin/python -m pip list 2>/dev/null | grep -qiE '^nvidia-|^triton '; then
  echo "install.sh: CUDA packages were installed; torch must be the pinned CPU build" >&2
  exit 1
fi
