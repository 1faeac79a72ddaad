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

# The Debian packages the whole suite uses (scripts/test.sh --full and .ci/run): installed when
# running as root with apt-get, else named in one warning (the tests that need them skip).
ensure_system_packages() {
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    # tests/test_int8_portability.py runs int8 models as an AVX2-only CPU (no VNNI) under QEMU.
    command -v qemu-x86_64 >/dev/null 2>&1 || missing+=(qemu-user)
    # The MemoryDenyWriteExecute test installs the unit's seccomp filter with python3-seccomp.
    ls /usr/lib/python3/dist-packages/seccomp*.so >/dev/null 2>&1 || missing+=(python3-seccomp)
    # tests/test_fleet_report.py opens the HTML report in a real headless browser.
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    # The converter's report.png is its report.svg rendered by rsvg-convert (tests/test_converter_chart.py).
    command -v rsvg-convert >/dev/null 2>&1 || missing+=(librsvg2-bin)
    # tests/test_fleet_postgres.py and the scale-out tests run a real PostgreSQL server (initdb, postgres).
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    # tests/test_fleet_prometheus_server.py scrapes the exporter with a real Prometheus.
    command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
    # tests/test_delivery_http.py serves bundle objects from a real nginx (Range, TLS, PUT via dav).
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "warning: missing system packages (sudo apt-get install -y ${missing[*]}); the tests that need them skip" >&2
    fi
}
