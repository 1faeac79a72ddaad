"""Helpers for scripts/arm64-smoke: one file, run both on the x86 host and under emulation.

    python scripts/arm64_smoke.py reference MODELDIR GOLDEN OUT.npz     # host venv: x86 outputs
    python3.11 scripts/arm64_smoke.py check MODELDIR GOLDEN REF.npz      # under qemu-aarch64
    python scripts/arm64_smoke.py constraints OUT.txt                    # pin to the host's versions

Only numpy, onnxruntime and ai_edge_litert are used for inference, the same code on both sides,
so the emulated outputs are compared with the host's outputs of the very same calls. Any failed
check exits 1 with one line `FAIL: reason` on stderr.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

# Device-side packages whose versions the emulated install pins to the host venv's, so that
# "agrees with x86" compares the same library versions built for two architectures.
PINNED = ["numpy", "onnxruntime", "ai-edge-litert", "paho-mqtt", "pydantic", "psutil", "cryptography"]
# Host-only heavyweights that must never reach a device install.
FORBIDDEN = ["tensorflow", "torch", "onnx", "tflite_runtime", "sklearn", "onnxscript"]

MIN_ACCURACY = 0.9
MIN_AGREEMENT = 0.99  # top-1 agreement with the x86 outputs of the same model
FP32_ATOL = 1e-3  # logits are O(10); different SIMD paths reorder float sums
INT8_MAX_STEPS = 1  # int8 output may differ by one quantization step between kernels


def fail(reason: str) -> None:
    print(f"FAIL: {reason}", file=sys.stderr)
    raise SystemExit(1)


def run_onnx(path: Path, x: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x})[0]


def run_tflite(path: Path, x: Any) -> tuple[Any, Any]:
    """Returns (dequantized float outputs, raw outputs), one sample per invoke."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    raw, deq = [], []
    for row in x:
        sample = row[None, ...]
        if inp["dtype"] != np.float32:
            scale, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            sample = np.clip(np.round(sample / scale + zp), info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], sample)
        interp.invoke()
        y = interp.get_tensor(out["index"])[0].copy()
        raw.append(y)
        if out["dtype"] != np.float32:
            scale, zp = out["quantization"]
            y = (y.astype(np.float32) - zp) * scale
        deq.append(y)
    return np.stack(deq), np.stack(raw)


def outputs(model_dir: Path, golden: Path) -> dict[str, Any]:
    import numpy as np

    x = np.load(golden)["inputs"].astype(np.float32)
    result: dict[str, Any] = {}
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".onnx":
            result[path.name] = run_onnx(path, x)
        elif path.suffix == ".tflite":
            result[path.name], result[path.name + ":raw"] = run_tflite(path, x)
    return result


def cmd_reference(model_dir: Path, golden: Path, out: Path) -> None:
    import numpy as np

    np.savez(out, **outputs(model_dir, golden))


def cmd_constraints(out: Path) -> None:
    lines = [f"{name}=={importlib.metadata.version(name)}" for name in PINNED]
    out.write_text("\n".join(lines) + "\n")


def cmd_check(model_dir: Path, golden: Path, reference: Path) -> None:
    t0 = time.monotonic()
    if platform.machine() != "aarch64":
        fail(f"platform.machine() is {platform.machine()!r}, not 'aarch64'")
    present = [m for m in FORBIDDEN if importlib.util.find_spec(m) is not None]
    if present:
        fail(f"host-only packages importable in the device install: {', '.join(present)}")
    import numpy as np

    import edgeagent  # the project's own wheel

    versions = {n: importlib.metadata.version(n) for n in ["edgeagent", *PINNED]}
    t_import = time.monotonic()
    import onnxruntime  # noqa: F401
    from ai_edge_litert.interpreter import Interpreter  # noqa: F401

    t_runtimes = time.monotonic() - t_import
    labels = np.load(golden)["labels"]
    ref = np.load(reference)
    t_infer = time.monotonic()
    got = outputs(model_dir, golden)
    t_infer = time.monotonic() - t_infer
    rows = []
    for name, y in got.items():
        if name.endswith(":raw"):
            continue
        want = ref[name]
        accuracy = float((y.argmax(1) == labels).mean())
        agreement = float((y.argmax(1) == want.argmax(1)).mean())
        max_diff = float(np.abs(y - want).max())
        raw_name = name + ":raw"
        if raw_name in got and got[raw_name].dtype != np.float32:
            steps = int(np.abs(got[raw_name].astype(np.int32) - ref[raw_name].astype(np.int32)).max())
            diff_text, ok = f"max |Δq| {steps} step(s)", steps <= INT8_MAX_STEPS
        else:
            diff_text, ok = f"max |Δ| {max_diff:.2e}", max_diff <= FP32_ATOL
        rows.append(f"  {name:18} accuracy {accuracy:.2f}  agreement with x86 {agreement:.2f}  {diff_text}")
        if accuracy < MIN_ACCURACY:
            fail(f"{name}: golden accuracy {accuracy:.2f} < {MIN_ACCURACY} under emulation")
        if agreement < MIN_AGREEMENT or not ok:
            fail(f"{name}: disagrees with x86 (top-1 agreement {agreement:.2f}, {diff_text})")
    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "edgeagent_file": edgeagent.__file__,
        "versions": versions,
        "runtime_import_s": round(t_runtimes, 2),
        "inference_s": round(t_infer, 2),
        "total_s": round(time.monotonic() - t0, 2),
    }
    print("\n".join(rows))
    print("  " + json.dumps(info))


def main(argv: list[str]) -> None:
    if len(argv) >= 1 and argv[0] == "reference" and len(argv) == 4:
        cmd_reference(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif len(argv) >= 1 and argv[0] == "check" and len(argv) == 4:
        cmd_check(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif len(argv) == 2 and argv[0] == "constraints":
        cmd_constraints(Path(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
