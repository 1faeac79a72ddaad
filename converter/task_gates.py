"""Per-output gate bounds for every kind of model, derived from what an artifact measures.

The task decides the metrics of each output (the same functions the device computes, in
:mod:`edgeagent.agreement`), and each bound is the artifact's own number on the golden set
plus a margin, so a gate holds on the host that measured it and on a device whose kernels
round differently (int8 on CPUs with and without VNNI), yet a wrong model misses it:

* agreements and IoUs (fractions 0-1): ``measured - max(margin, 1 - measured)``: the
  disagreement may at most double, or grow by ``margin`` when it is smaller than that;
* cosine similarity: the same with ``cosine_margin``;
* errors (MSE, max-abs, the custom task's atol): ``measured * (1 + error_margin)`` plus
  ``error_floor`` times the reference's largest magnitude (squared for MSE), so an exact fp32
  artifact still allows a device's last-bit differences.

Tasks (``--task``; inferred when unset, see :func:`infer_task`):
classification: accuracy and top-1 agreement (the gate's ``min_accuracy`` and
``min_top1_agreement``) and top-k agreement on the first output, the class scores the labels
refer to; regression: MSE, max-abs error and cosine per output (cosine only with two values
or more per sample);
detection and segmentation: box match for (N, boxes, 4) outputs, mask IoU for the rest;
embedding: cosine; custom: atol only. A classifier's other outputs (a second head, an
embedding) are bounded as regression outputs: an argmax over them may mean nothing and flips
on near-ties between CPUs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeagent import agreement
from edgeagent.bundle.manifest import OutputGate, Task

Array = npt.NDArray[Any]


def infer_task(classification: bool, reference: Mapping[str, Array]) -> Task:
    """classification: integer labels and class scores as the first output; else regression."""
    first = next(iter(reference.values()))
    return "classification" if classification and agreement.is_class_scores(first.shape) else "regression"


def measure(
    task: Task, outputs: Mapping[str, Array], reference: Mapping[str, Array], config: Any
) -> dict[str, dict[str, float]]:
    """Per output: the numbers its task judges it by (the OutputGate field they bound -> value)."""
    measured: dict[str, dict[str, float]] = {}
    for index, (name, out) in enumerate(outputs.items()):
        ref = reference[name]
        if out.shape != ref.shape:
            continue  # the device reports the mismatch; nothing to derive a bound from
        row: dict[str, float] = {}
        if task == "classification" and not index and agreement.is_class_scores(ref.shape):
            # Top-1 of the first output is bounded by the gate's own min_top1_agreement.
            row["min_topk_agreement"] = agreement.topk_agreement(out, ref, config.top_k)
        elif task in ("classification", "regression"):
            row["max_mse"] = agreement.mse(out, ref)
            row["max_abs_error"] = agreement.max_abs_error(out, ref)
            if ref[0].size >= 2:  # the cosine of one value is only its sign
                row["min_cosine"] = agreement.mean_cosine(out, ref)
        elif task in ("detection", "segmentation"):
            if agreement.is_boxes(ref.shape):
                row["min_box_match"] = agreement.box_match(out, ref, config.box_iou)
            else:
                row["min_mask_iou"] = agreement.mask_iou(out, ref, config.mask_threshold)
        elif task == "embedding":
            row["min_cosine"] = agreement.mean_cosine(out, ref)
        else:
            row["atol"] = agreement.max_abs_error(out, ref)
        measured[name] = row
    return measured


#: The Check name (edgeagent.acceptance) of each OutputGate bound; a derived atol is a max-abs error.
CHECK_NAMES = {m.bound: m.check for m in agreement.METRICS} | {"atol": "max_abs"}


def bounds(
    measured: Mapping[str, Mapping[str, float]], reference: Mapping[str, Array], config: Any
) -> dict[str, OutputGate]:
    """The OutputGate of each output from its measured numbers (see the module doc for margins)."""
    gates: dict[str, OutputGate] = {}
    for name, row in measured.items():
        scale = float(np.max(np.abs(reference[name]))) if reference[name].size else 0.0
        floor = config.error_floor * scale
        fields: dict[str, float | int] = {}
        for key, value in row.items():
            if key in ("max_mse",):
                fields[key] = _up(value * (1 + config.error_margin) + floor**2)
            elif key in ("max_abs_error", "atol"):
                fields[key] = _up(value * (1 + config.error_margin) + floor)
            elif key == "min_cosine":
                fields[key] = _down(value - max(config.cosine_margin, 1.0 - value), low=-1.0)
            else:
                fields[key] = _down(value - max(config.agreement_margin, 1.0 - value))
        if "min_topk_agreement" in fields:
            fields["top_k"] = config.top_k
        if "min_mask_iou" in fields:
            fields["mask_threshold"] = config.mask_threshold
        if "min_box_match" in fields:
            fields["box_iou"] = config.box_iou
        gates[name] = OutputGate.model_validate(fields)
    return gates


def loosest(gates: list[Mapping[str, OutputGate]]) -> dict[str, OutputGate]:
    """Per output, the bound every one of ``gates`` allows (the bundle-level floor)."""
    return _combine(gates, loose=True)


def at_least(gate: Mapping[str, OutputGate], floor: Mapping[str, OutputGate]) -> dict[str, OutputGate]:
    """``gate`` with each bound made no looser than ``floor``'s (an intermediate's gate)."""
    return _combine([gate, floor], loose=False)


def _combine(gates: list[Mapping[str, OutputGate]], *, loose: bool) -> dict[str, OutputGate]:
    out: dict[str, OutputGate] = {}
    for name in dict.fromkeys(n for g in gates for n in g):
        rows = [g[name].model_dump(exclude_none=True) for g in gates if name in g]
        merged: dict[str, Any] = {}
        for row in rows:
            for key, value in row.items():
                if key not in merged or key in ("top_k", "mask_threshold", "box_iou"):
                    merged.setdefault(key, value)
                    continue
                upper = key.startswith("max_") or key in ("atol", "rtol")
                pick = max if upper == loose else min
                merged[key] = pick(merged[key], value)
        out[name] = OutputGate.model_validate(merged)
    return out


def _down(value: float, low: float = 0.0) -> float:
    """Round down to 4 decimals (a bound printed is never above what was measured)."""
    return max(low, float(np.floor(value * 10_000) / 10_000))


def _up(value: float) -> float:
    """Round up to 4 significant digits (a bound printed is never below what was measured)."""
    if value <= 0:
        return 0.0
    exponent = int(np.floor(np.log10(value))) - 3
    return float(np.ceil(value / 10.0**exponent) * 10.0**exponent)
