"""On-device acceptance: run a bundle's golden set on a loaded model and judge it against the gate.

The golden ``.npz`` holds ``inputs`` (N, ...), optionally ``labels`` (N,) and ``reference``
(N, ...) outputs of the original float model. Each sample runs on its own (batch 1), as
requests do, so the same pass yields the accuracy numbers and the per-request latency.
The :class:`Verdict` lists every number next to its bound; ``reason`` names the first
bound that was missed, in words an event can carry ("accuracy 0.912 < min_accuracy 0.950").
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgeagent.bundle import golden as bundle_golden
from edgeagent.bundle.manifest import AcceptanceGate
from edgeagent.runtimes.model import LoadedModel

WARMUP_RUNS = 3
# Latency-only gates (no golden set) time this many zero inputs.
SYNTHETIC_RUNS = 50


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Check(_Frozen):
    """One number of the verdict against its bound."""

    name: str = Field(description="accuracy, top1_agreement, tolerance_ratio or latency_p95_ms.")
    value: float | None = Field(description="What was measured; None when it could not be.")
    op: Literal[">=", "<="] = Field(description="How value must compare with bound to pass.")
    bound: float = Field(description="The gate's bound.")
    passed: bool
    detail: str = Field(default="", description="How the number was obtained, or why it is missing.")

    def sentence(self) -> str:
        if self.value is None:
            return f"{self.name} not measured ({self.detail})"
        broken = "<" if self.op == ">=" else ">"
        return f"{self.name} {self.value:.4g} {broken} bound {self.bound:.4g}"


class Latency(_Frozen):
    """Per-sample latency of the model call (ms), over the timed runs."""

    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class Verdict(_Frozen):
    """The outcome of acceptance on one runtime/delegate: every number next to its bound."""

    passed: bool
    reason: str | None = Field(
        description="Why it failed (the missed bounds, in words); None when it passed."
    )
    runtime: str
    delegate: str
    precision: str
    profile: str | None = Field(description="Device profile whose latency budget applied.")
    samples: int = Field(description="Golden samples run (0: no golden set, latency from zero inputs).")
    checks: list[Check]
    latency: Latency
    predicted_classes: dict[str, int] | None = Field(
        default=None,
        description="Top-1 class -> count over the golden set when the output is class scores: "
        "the reference distribution that telemetry's drift figure compares live predictions with.",
    )


def load_golden(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a golden ``.npz`` (``inputs``, optional ``labels``, ``reference``), validated."""
    golden = bundle_golden.load_golden(path)
    arrays = {"inputs": golden.inputs, "labels": golden.labels, "reference": golden.reference}
    return {k: v for k, v in arrays.items() if v is not None}


def run_acceptance(
    model: LoadedModel,
    gate: AcceptanceGate,
    golden: dict[str, np.ndarray] | None,
    *,
    profile: str | None = None,
) -> Verdict:
    """Run ``golden`` (from :func:`load_golden`; None when the bundle has none) on ``model``."""
    if golden is not None:
        inputs = golden["inputs"]
    else:
        spec = model.inputs[0]
        shape = [1 if d is None else d for d in spec.shape]
        inputs = np.zeros([SYNTHETIC_RUNS, *shape[1:]], model.caller_dtype(spec.name))
    for i in range(min(WARMUP_RUNS, len(inputs))):
        model.predict(inputs[i : i + 1])
    times = np.empty(len(inputs))
    outputs = []
    for i in range(len(inputs)):
        start = time.perf_counter()
        result = model.predict(inputs[i : i + 1])
        times[i] = time.perf_counter() - start
        outputs.append(result[0])
    times_ms = times * 1e3
    p50, p95, p99 = (float(v) for v in np.percentile(times_ms, [50, 95, 99]))
    latency = Latency(runs=len(times), p50_ms=p50, p95_ms=p95, p99_ms=p99, max_ms=float(times_ms.max()))
    checks = []
    if golden is not None:
        checks = _data_checks(gate, golden, np.concatenate(outputs))
    budget = gate.latency_p95_ms.get(profile or "", gate.latency_p95_ms.get("*"))
    if budget is not None:
        checks.append(
            Check(
                name="latency_p95_ms",
                value=p95,
                op="<=",
                bound=budget,
                passed=p95 <= budget,
                detail=f"{len(times)} single-sample runs" + (f" on profile {profile}" if profile else ""),
            )
        )
    failed = [c for c in checks if not c.passed]
    predicted_classes = _class_counts(outputs) if golden is not None else None
    return Verdict(
        passed=not failed,
        reason="; ".join(c.sentence() for c in failed) or None,
        runtime=model.runtime,
        delegate=model.delegate,
        precision=model.precision,
        profile=profile,
        samples=len(inputs) if golden is not None else 0,
        checks=checks,
        latency=latency,
        predicted_classes=predicted_classes,
    )


def _class_counts(outputs: list[np.ndarray]) -> dict[str, int] | None:
    """Top-1 class counts when every output is a (1, classes>=2) score row; else None."""
    if not outputs or any(o.ndim != 2 or o.shape[0] != 1 or o.shape[1] < 2 for o in outputs):
        return None
    classes, counts = np.unique(np.concatenate(outputs).argmax(axis=1), return_counts=True)
    return {str(int(c)): int(n) for c, n in zip(classes, counts, strict=True)}


def _data_checks(gate: AcceptanceGate, golden: dict[str, np.ndarray], outputs: np.ndarray) -> list[Check]:
    checks = []
    n = len(outputs)
    predicted = outputs.reshape(n, -1).argmax(axis=1)
    labels = golden.get("labels")
    reference = golden.get("reference")
    if gate.min_accuracy is not None:
        if labels is None:
            checks.append(_missing("accuracy", ">=", gate.min_accuracy, "the golden set has no 'labels'"))
        else:
            accuracy = float(np.mean(predicted == labels.reshape(n)))
            checks.append(
                Check(
                    name="accuracy",
                    value=accuracy,
                    op=">=",
                    bound=gate.min_accuracy,
                    passed=accuracy >= gate.min_accuracy,
                    detail=f"top-1 on {n} golden labels",
                )
            )
    if gate.min_top1_agreement is not None:
        if reference is None:
            checks.append(
                _missing("top1_agreement", ">=", gate.min_top1_agreement, "the golden set has no 'reference'")
            )
        else:
            agreement = float(np.mean(predicted == reference.reshape(n, -1).argmax(axis=1)))
            checks.append(
                Check(
                    name="top1_agreement",
                    value=agreement,
                    op=">=",
                    bound=gate.min_top1_agreement,
                    passed=agreement >= gate.min_top1_agreement,
                    detail=f"top-1 equal to the reference on {n} samples",
                )
            )
    if gate.atol is not None or gate.rtol is not None:
        checks.append(_tolerance_check(gate.atol or 0.0, gate.rtol or 0.0, outputs, reference))
    return checks


def _tolerance_check(atol: float, rtol: float, outputs: np.ndarray, reference: np.ndarray | None) -> Check:
    """max |out - ref| / (atol + rtol * |ref|) over every element: <= 1 is numpy's allclose."""
    if reference is None:
        return _missing("tolerance_ratio", "<=", 1.0, "the golden set has no 'reference'")
    if reference.shape != outputs.shape:
        return _missing(
            "tolerance_ratio",
            "<=",
            1.0,
            f"reference shape {list(reference.shape)} != output {list(outputs.shape)}",
        )
    error = np.abs(outputs.astype(np.float64) - reference.astype(np.float64))
    allowed = atol + rtol * np.abs(reference.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / allowed)
    worst = float(np.nanmax(ratio)) if ratio.size else 0.0
    return Check(
        name="tolerance_ratio",
        value=worst,
        op="<=",
        bound=1.0,
        passed=worst <= 1.0,
        detail=f"max |out - ref| = {float(error.max()):.4g} with atol={atol:g}, rtol={rtol:g}",
    )


def _missing(name: str, op: Literal[">=", "<="], bound: float, why: str) -> Check:
    return Check(name=name, value=None, op=op, bound=bound, passed=False, detail=why)
