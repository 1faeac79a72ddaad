"""p50 latency of models under the arm64 emulation (docs/arm64.md), for the compression bench.

Run by the host side (:func:`arm64_p50`) as ``qemu-aarch64 python3.11 bench/arm64_timing.py
RUNS MODEL...`` with only the device install importable (numpy, onnxruntime, ai_edge_litert):
each model gets single-sample calls on zeros of its input shape, and the median wall time in ms is
printed as one JSON object. QEMU translates arm64 code to x86 as it runs, so absolute times mean
little; the ratios between variants of one model (the same kernels on smaller shapes) are what
the bench reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CPU = "cortex-a72"  # Raspberry Pi 4's core


def _p50(call: object, runs: int) -> float:
    for _ in range(5):
        call()  # type: ignore[operator]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000.0)
    return sorted(times)[len(times) // 2]


def _time(path: str, runs: int) -> float:
    import numpy as np

    if path.endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        x = np.zeros([1, *[d if isinstance(d, int) else 1 for d in spec.shape[1:]]], np.float32)
        return _p50(lambda: session.run(None, {spec.name: x}), runs)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=2)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    x = np.zeros(detail["shape"], detail["dtype"])

    def call() -> None:
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()

    return _p50(call, runs)


def arm64_p50(paths: list[Path], runs: int = 50) -> dict[str, float] | None:
    """{path: p50 ms} under emulation, or None when the emulation cache is not there."""
    cache = Path(os.environ.get("EDGE_ARM64_CACHE", Path(__file__).parents[1] / ".cache" / "arm64"))
    qemu, python = cache / "qemu/usr/bin/qemu-aarch64", cache / "rootfs/usr/bin/python3.11"
    if not (qemu.exists() and python.exists() and (cache / "deps").is_dir()):
        return None
    env = {
        "QEMU_CPU": CPU,
        "PYTHONPATH": str(cache / "deps"),
        "PYTHONNOUSERSITE": "1",
        "PATH": "/usr/bin:/bin",
    }
    command = [str(qemu), "-L", str(cache / "rootfs"), str(python), __file__, str(runs), *map(str, paths)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        print(f"arm64 emulation failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    count = int(sys.argv[1])
    print(json.dumps({p: _time(p, count) for p in sys.argv[2:]}))
