# Shared by scripts/test.sh and scripts/demo.sh: make .venv and install the project with
# the given extras, skipping pip when nothing changed since the last install.
# Usage: source scripts/_setup.sh; ensure_venv dev
ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: the host tools need Python >= 3.11 ($python is $("$python" -V 2>&1)); set PYTHON=python3.11" >&2
        return 1
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "==> creating .venv with $("$python" -V)"
        "$python" -m venv .venv
    fi
    local stamp=".venv/.edgeagent-$extras"
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> pip install -e '.[$extras]' (first time: a few minutes)"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
        echo "$want" > "$stamp"
    fi
}

ensure_mosquitto() {
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install mosquitto"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "warning: mosquitto is missing (sudo apt-get install -y mosquitto); broker tests will skip" >&2
    fi
}
