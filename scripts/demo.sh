#!/usr/bin/env bash
# Set up a .venv (host tools + LiteRT) and run the end-to-end demo of what works today:
# make a signing key, package the fixture models into a signed, reproducible bundle, verify
# it, inspect it, watch a tampered copy be refused, and extract it as a device would.
# (The MQTT deployment demo, `edgectl demo`, replaces this when the deployment issue lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup.sh
ensure_venv "host,litert"
export PATH="$PWD/.venv/bin:$PATH"
out=out/demo
rm -rf "$out"
mkdir -p "$out"
models=tests/fixtures/models
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
step() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; "$@"; }

step edgectl keys generate --name release --out "$out/keys"
step edgectl bundle create --name digits --version 1.0.0 \
    --model "$models/mlp.onnx" --model "$models/mlp_int8.tflite" \
    --golden "$models/golden_mlp.npz" --labels "$models/labels.txt" \
    --min-accuracy 0.9 --min-agreement 0.95 --latency-budget '*=10' \
    --description "digits MLP: ONNX fp32 + TFLite full-int8" \
    --key "$out/keys/release.key" -o "$out/bundles"
bundle="$out/bundles/digits-1.0.0.bundle"
step edgectl bundle verify "$bundle" --trusted "$out/keys/release.pub"
step edgectl bundle inspect "$bundle"

echo
echo "# the same inputs give the same bytes (the sha256 is the bundle id):"
step edgectl bundle create --name digits --version 1.0.0 \
    --model "$models/mlp.onnx" --model "$models/mlp_int8.tflite" \
    --golden "$models/golden_mlp.npz" --labels "$models/labels.txt" \
    --min-accuracy 0.9 --min-agreement 0.95 --latency-budget '*=10' \
    --description "digits MLP: ONNX fp32 + TFLite full-int8" \
    --key "$out/keys/release.key" -o "$out/again"
cmp "$bundle" "$out/again/digits-1.0.0.bundle" && echo "identical"

echo
echo "# a copy with one byte of the model flipped is refused, with the reason:"
python - "$bundle" "$out/tampered.bundle" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[data.index(b"pytorch")] ^= 1  # inside models/mlp.onnx
open(sys.argv[2], "wb").write(data)
PY
if step edgectl bundle verify "$out/tampered.bundle" --trusted "$out/keys/release.pub"; then
    echo "demo failed: the tampered bundle was accepted" >&2
    exit 1
fi

step edgeagent bundle extract "$bundle" --trusted "$out/keys/release.pub" --to "$out/device/bundles/digits"
step ls -l "$out/device/bundles/digits" "$out/device/bundles/digits/models"
echo
echo "demo finished: everything is under $out/"
