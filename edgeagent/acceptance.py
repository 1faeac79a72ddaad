"""On-device acceptance: run a bundle's golden set on a loaded model and judge it against the gate.

The golden ``.npz`` (:mod:`edgeagent.bundle.golden`) holds one array per model input, and
optionally ``labels`` (N,) and the original float model's outputs. Each sample runs on its
own (batch 1, every input fed), as requests do, so the same pass yields the accuracy numbers
and the per-request latency. A stateful model's golden rows are steps of sequences: each
sequence starts from the initial state and carries the state from step to step, and every
step's outputs are compared. Accuracy and top-1 agreement judge the first output; the
tolerance bounds judge every output the golden set has a reference for.
The :class:`Verdict` lists every number next to its bound; ``reason`` names the first
bound that was missed, in words an event can carry ("accuracy 0.912 < min_accuracy 0.950").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from edgeagent import agreement
from edgeagent.bundle import golden as bundle_golden
from edgeagent.bundle.golden import GoldenSet, match_inputs, match_outputs
from edgeagent.bundle.manifest import AcceptanceGate, OutputGate
from edgeagent.errors import UsageError
from edgeagent.protocol import Check, Latency, Verdict
from edgeagent.runtimes.model import LoadedModel
from edgeagent.state import StateCarrier

WARMUP_RUNS = 3
# Latency-only gates (no golden set) time this many zero inputs.
SYNTHETIC_RUNS = 50


def load_golden(path: Path) -> GoldenSet:
    """The golden set of a bundle, validated (see :mod:`edgeagent.bundle.golden`)."""
    return bundle_golden.load_golden(path)


def run_acceptance(
    model: LoadedModel,
    gate: AcceptanceGate,
    golden: GoldenSet | Mapping[str, np.ndarray] | None,
    *,
    profile: str | None = None,
    state: StateCarrier | None = None,
) -> Verdict:
    """Run ``golden`` (a :class:`GoldenSet`, or its ``.npz`` arrays; None when the bundle has none).

    ``state`` (a stateful model): the golden rows are replayed as sequences, each from the
    initial state with the state carried step to step, on a state of acceptance's own, so
    nothing of it reaches a served session (a variables model runs each sequence, and the
    warm-up, on a fresh instance of its own).
    """
    if golden is not None and not isinstance(golden, GoldenSet):
        golden = GoldenSet.from_arrays(golden)
    skip = state.state_inputs if state is not None else frozenset()
    if golden is not None:
        samples = _golden_samples(model, golden, skip)
        runs = golden.sequences() if state is not None else [range(len(samples))]
    else:
        samples = _synthetic_samples(model, gate.latency_shapes, skip)
        runs = [range(len(samples))]
    results, times = _replay(model, state, samples, runs)
    times_ms = times * 1e3
    p50, p95, p99 = (float(v) for v in np.percentile(times_ms, [50, 95, 99]))
    latency = Latency(runs=len(times), p50_ms=p50, p95_ms=p95, p99_ms=p99, max_ms=float(times_ms.max()))
    whole = {p.output for p in state.spec.pairs if p.input in model.unbatched} if state is not None else set()
    outputs = {
        name: _rows([r[k] for r in results], name in whole) for k, name in enumerate(model.output_names)
    }
    checks = _data_checks(gate, golden, outputs) if golden is not None else []
    budget = gate.latency_p95_ms.get(profile or "", gate.latency_p95_ms.get("*"))
    invented = _invented_shapes(model, gate, skip) if golden is None else None
    if budget is not None and invented:
        checks.append(_missing("latency_p95_ms", "<=", budget, invented))
    elif budget is not None:
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
    predicted_classes = _class_counts([r[0] for r in results]) if golden is not None else None
    return Verdict(
        passed=not failed,
        reason="; ".join(c.sentence() for c in failed) or None,
        runtime=model.runtime,
        delegate=model.delegate,
        precision=model.precision,
        profile=profile,
        samples=len(samples) if golden is not None else 0,
        checks=checks,
        latency=latency,
        predicted_classes=predicted_classes,
    )


def _replay(
    model: LoadedModel, state: StateCarrier | None, samples: list[dict[str, np.ndarray]], runs: list[range]
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Every sample's outputs and seconds; each run of rows from a fresh state when ``state`` is set."""
    _steps(model, state, samples, range(min(WARMUP_RUNS, len(samples))), None)  # warm-up, discarded
    times = np.empty(len(samples))
    results: list[list[np.ndarray]] = []
    for rows in runs:
        results += _steps(model, state, samples, rows, times)
    return results, times


def _steps(
    model: LoadedModel,
    state: StateCarrier | None,
    samples: list[dict[str, np.ndarray]],
    rows: range,
    times: np.ndarray | None,
) -> list[list[np.ndarray]]:
    """Run ``rows`` in order as one sequence (state carried), timing each into ``times``."""
    runner = state.fresh_model(model) if state is not None and state.variables else model
    carried = state.initial_state() if state is not None else {}
    results = []
    try:
        for i in rows:
            start = time.perf_counter()
            if state is None:
                outputs = runner.predict(samples[i])
            else:
                outputs, carried = state.step(runner, samples[i], carried)
            if times is not None:
                times[i] = time.perf_counter() - start
            results.append(outputs)
    finally:
        if runner is not model:
            runner.close()
    return results


def _golden_samples(
    model: LoadedModel, golden: GoldenSet, skip: frozenset[str] = frozenset()
) -> list[dict[str, np.ndarray]]:
    """One feed per golden sample with every input of the model but ``skip`` (state inputs).

    An input without a batch dimension (a scalar, an input fed whole) is fed as its row.
    """
    inputs = match_inputs(golden.inputs, [s.name for s in model.inputs if s.name not in skip])
    return [
        {name: (a[i] if name in model.unbatched else a[i : i + 1]) for name, a in inputs.items()}
        for i in range(len(golden))
    ]


def _synthetic_samples(
    model: LoadedModel, shapes: Mapping[str, list[int]] | None = None, skip: frozenset[str] = frozenset()
) -> list[dict[str, np.ndarray]]:
    """Latency-only gates: zeros for every input but the state ones (a zero token id is valid), in
    the shape the gate recorded for it, else dynamic dimensions as 1 (which
    :func:`_invented_shapes` refuses to judge)."""
    feeds = {
        spec.name: np.zeros(
            _latency_shape(spec.name, spec.shape, shapes or {}), model.caller_dtype(spec.name)
        )
        for spec in model.inputs
        if spec.name not in skip
    }
    return [feeds] * SYNTHETIC_RUNS


def _recorded_shape(name: str, rank: int, recorded: Mapping[str, list[int]]) -> list[int] | None:
    """The gate's latency shape of input ``name`` (a one-input model: the only one); None if none."""
    if name in recorded:
        return list(recorded[name])
    only = list(recorded.values())
    return list(only[0]) if len(only) == 1 and len(only[0]) == rank else None


def _latency_shape(name: str, shape: list[int | None], recorded: Mapping[str, list[int]]) -> list[int]:
    """The recorded shape of input ``name``, else its shape with dynamic dimensions as 1."""
    found = _recorded_shape(name, len(shape), recorded)
    return found if found is not None else [1 if d is None else d for d in shape]


def _invented_shapes(
    model: LoadedModel, gate: AcceptanceGate, skip: frozenset[str] = frozenset()
) -> str | None:
    """Why latency on zeros would be meaningless: an input with a dynamic dimension past the batch
    one that the gate records no shape for (it would be timed as 1, e.g. a 1x1 image); else None.
    ``skip``: the state inputs, fed their initial state, never zeros of an invented shape."""
    for spec in model.inputs:
        if spec.name in skip:
            continue
        invented = _recorded_shape(spec.name, len(spec.shape), gate.latency_shapes) is None
        if invented and any(d is None for d in spec.shape[1:]):
            dims = "x".join("?" if d is None else str(d) for d in spec.shape)
            return (
                f"input {spec.name!r} has dynamic dimensions ({dims}) and the bundle records no "
                "latency shape for it; latency is not judged on invented shapes"
            )
    return None


def _rows(parts: list[np.ndarray], whole: bool = False) -> np.ndarray:
    """Per-sample outputs as one (N, ...) array (a scalar output: (N,)).

    ``whole``: the output is a state fed whole to an input without a batch dimension (Silero's
    (2, 1, 128)): each sample's is one row, stacked into (N, 2, 1, 128).
    """
    return np.stack(parts) if whole or parts[0].ndim == 0 else np.concatenate(parts)


def _class_counts(outputs: list[np.ndarray]) -> dict[str, int] | None:
    """Top-1 class counts when every output is a (1, classes>=2) score row; else None."""
    if not outputs or any(o.ndim != 2 or o.shape[0] != 1 or o.shape[1] < 2 for o in outputs):
        return None
    classes, counts = np.unique(np.concatenate(outputs).argmax(axis=1), return_counts=True)
    return {str(int(c)): int(n) for c, n in zip(classes, counts, strict=True)}


def _data_checks(gate: AcceptanceGate, golden: GoldenSet, outputs: dict[str, np.ndarray]) -> list[Check]:
    checks = []
    first = next(iter(outputs.values()))
    n = len(first)
    predicted = first.reshape(n, -1).argmax(axis=1)
    labels = golden.labels
    try:
        references = match_outputs(golden.reference, list(outputs))
    except UsageError as exc:
        references, missing = {}, str(exc)
    else:
        missing = "the golden set has no reference outputs"
    reference = references.get(next(iter(outputs)))
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
            why = missing if not references else "the golden set has no reference for the first output"
            checks.append(_missing("top1_agreement", ">=", gate.min_top1_agreement, why))
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
        if not references:
            checks.append(_missing("tolerance_ratio", "<=", 1.0, missing))
        # One check per compared output; a single-output model keeps the plain name.
        for name, ref in references.items():
            label = "tolerance_ratio" if len(outputs) == 1 else f"tolerance_ratio[{name}]"
            checks.append(_tolerance_check(label, gate.atol or 0.0, gate.rtol or 0.0, outputs[name], ref))
    for name, bounds in gate.outputs.items():
        if name in references and name in outputs:
            checks += output_checks(name, bounds, outputs[name], references[name])
        else:
            why = missing if not references else f"the golden set has no reference for output {name!r}"
            checks.append(_missing(f"reference[{name}]", ">=", 1.0, why))
    return checks


def output_checks(name: str, bounds: OutputGate, out: np.ndarray, ref: np.ndarray) -> list[Check]:
    """One Check per bound of ``bounds`` on output ``name`` (:data:`edgeagent.agreement.METRICS`)."""
    if out.shape[:1] != ref.shape[:1] or out.size == 0:
        why = f"reference shape {list(ref.shape)} != output {list(out.shape)}"
        return [_missing(f"reference[{name}]", ">=", 1.0, why)]
    checks = []
    for metric in agreement.METRICS:
        bound = getattr(bounds, metric.bound)
        if bound is None:
            continue
        label = f"{metric.check}[{name}]"
        if not metric.fits(out.shape, ref.shape):
            why = f"reference shape {list(ref.shape)} does not fit output {list(out.shape)}"
            checks.append(_missing(label, metric.op, bound, why))
            continue
        value = metric.measure(out, ref, bounds)
        passed = value >= bound if metric.op == ">=" else value <= bound
        detail = f"{metric.what} on {len(out)} samples"
        checks.append(Check(name=label, value=value, op=metric.op, bound=bound, passed=passed, detail=detail))
    if bounds.atol is not None or bounds.rtol is not None:
        atol, rtol = bounds.atol or 0.0, bounds.rtol or 0.0
        checks.append(_tolerance_check(f"tolerance_ratio[{name}]", atol, rtol, out, ref))
    return checks


def _tolerance_check(
    name: str, atol: float, rtol: float, outputs: np.ndarray, reference: np.ndarray
) -> Check:
    """max |out - ref| / (atol + rtol * |ref|) over every element: <= 1 is numpy's allclose."""
    if reference.shape != outputs.shape:
        return _missing(
            name,
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
        name=name,
        value=worst,
        op="<=",
        bound=1.0,
        passed=worst <= 1.0,
        detail=f"max |out - ref| = {float(error.max()):.4g} with atol={atol:g}, rtol={rtol:g}",
    )


def _missing(name: str, op: Literal[">=", "<="], bound: float, why: str) -> Check:
    return Check(name=name, value=None, op=op, bound=bound, passed=False, detail=why)
