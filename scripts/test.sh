#!/usr/bin/env bash
# Install everything the tests need and run lint, format check and the tests.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium for the browser tests: Playwright drives it and never
# downloads a browser of its own.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test.sh: /usr/bin/chromium is missing; install Debian's chromium (sudo apt-get install chromium)" >&2
    exit 1
  fi
fi
bash scripts/install.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One pytest worker per core (at most 4): every test runs one OpenMP thread (tests/conftest.py), so a
# second core is otherwise idle. Files stay whole on one worker (their module fixtures are built once).
# HISTOLAB_TEST_WORKERS=0 runs everything in this process.
workers="${HISTOLAB_TEST_WORKERS:-$(nproc)}"
[ "$workers" -gt 4 ] && workers=4
if [ "$workers" -gt 1 ]; then
  set -- -n "$workers" --dist loadfile "$@"
fi
.venv/bin/python -m pytest "$@"
