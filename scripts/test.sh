#!/usr/bin/env bash
# Set up everything the tests need (a .venv with .[dev], mosquitto) and run lint, types
# and the whole test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k bundle
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
ensure_mosquitto
ensure_venv dev
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/python -m pytest "$@"
