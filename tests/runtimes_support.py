"""Helpers shared by the runtime, selection, acceptance and serving tests: real golden sets
from the digits test split and real signed bundles built with create_bundle."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeagent.bundle import AcceptanceGate, extract_bundle
from edgeagent.bundle.create import CreatedBundle, create_bundle
from edgeagent.bundle.reader import VerifiedBundle
from edgeagent.signing import KeyRing, load_public_key

GOLDEN_SAMPLES = 60


def golden_arrays(digits, model_dir: Path, *, images: bool) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Test-split inputs (flat for the MLP, NHWC for the CNN), labels, and mlp.onnx/cnn.onnx logits."""
    import onnxruntime as ort

    from converter.datasets import flat

    x = digits.x_test[:GOLDEN_SAMPLES].astype(np.float32)
    if not images:
        x = flat(x).astype(np.float32)
    reference_model = model_dir / ("cnn.onnx" if images else "mlp.onnx")
    session = ort.InferenceSession(str(reference_model), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    return {"inputs": x, "labels": digits.y_test[:GOLDEN_SAMPLES].astype(np.int64), "reference": reference}


def write_golden(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def make_bundle(
    out_dir: Path,
    keypair,  # type: ignore[no-untyped-def]
    models: Sequence[Path],
    golden: Path | None,
    *,
    name: str = "digits",
    version: str = "1.0.0",
    gate: AcceptanceGate | None = None,
    serve_precision: Sequence[str] = (),
) -> CreatedBundle:
    out_dir.mkdir(parents=True, exist_ok=True)
    return create_bundle(
        name=name,
        version=version,
        models=list(models),
        key=keypair.load(),
        out_dir=out_dir,
        golden=golden,
        gate=gate or AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.9),
        serve_precision=serve_precision,
    )


def extract(created: CreatedBundle, dest: Path, keypair) -> VerifiedBundle:  # type: ignore[no-untyped-def]
    return extract_bundle(created.path, dest, KeyRing([load_public_key(keypair.public)]))


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
