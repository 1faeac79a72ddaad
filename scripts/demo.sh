#!/usr/bin/env bash
# Set up a .venv with the host tools and LiteRT, then run `edgectl demo`: a broker
# (Mosquitto when installed, else the embedded amqtt from the `demo` extra), a registry and a device agent on
# this machine; the digits model is pruned, quantized to int8, packaged, signed, pushed,
# proven on the device and served; the device's report is printed; everything stops.
# Extra arguments go to `edgectl demo` (e.g. --workdir DIR to keep what it made).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
ensure_mosquitto
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    ensure_venv "host,litert"
else
    ensure_venv "host,litert,demo"  # amqtt: the embedded broker, only without Mosquitto
fi
exec .venv/bin/edgectl demo "$@"
