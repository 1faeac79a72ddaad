"""Running int8 ONNX models the ways different CPUs run them, and the tolerances that follow.

ONNX Runtime executes a QDQ graph two ways. At ``basic`` graph optimisation it runs the
DequantizeLinear -> float op -> QuantizeLinear nodes as written: the graph's reference
semantics, the same on every CPU. At ``all`` it fuses them into integer kernels (QLinearConv,
QGemm...) whose arithmetic depends on the CPU: on x86 without VNNI the u8s8 kernels add pairs
of products in int16 and can saturate. ``x86_avx2_available`` and :func:`run_on_avx2` run a
script under ``qemu-x86_64 -cpu Haswell`` (AVX2, no AVX-512/VNNI), so a machine with VNNI can
still check what a CPU without it computes.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

LEVELS = ("basic", "all")
#: A CPU with AVX2 and FMA but neither AVX-512 nor VNNI (the AMD EPYC / Haswell class).
AVX2_CPU = "Haswell"


def ort_session(path: Path, level: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_level(path: Path, x: np.ndarray, level: str) -> np.ndarray:
    """The first output of the one-input model at ``path`` on ``x`` at optimisation ``level``."""
    session = ort_session(path, level)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def output_step(path: Path) -> float:
    """The quantization step (scale) of the model's first output: the smallest difference two
    int8 executions of the same QDQ graph can show once they round one value differently."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    target = model.graph.output[0].name
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and target in node.output:
            return float(np.max(scales[node.input[1]]))
    raise AssertionError(f"{path}: the first output is not produced by a DequantizeLinear")


def x86_avx2_available() -> bool:
    """True when this x86-64 machine can run Python under QEMU as an AVX2-only CPU."""
    return platform.machine() == "x86_64" and shutil.which("qemu-x86_64") is not None


def run_on_avx2(script: str, *args: str, timeout: float = 240) -> str:
    """Run ``script`` with this interpreter under QEMU as an AVX2-only x86 CPU; returns stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        ["qemu-x86_64", "-cpu", AVX2_CPU, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"under qemu -cpu {AVX2_CPU}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout
