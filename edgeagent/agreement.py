"""How far a model's outputs are from their golden references: one number per metric.

The converter measures an artifact with these functions and derives its gate from the
numbers; the device computes the same functions in acceptance, so host and device mean the
same thing by every bound. Every function takes ``out`` and ``ref`` as (N, ...) arrays, one
row per golden sample, and returns a float (fractions 0-1, errors in the output's units).
numpy only: this runs on devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeagent.bundle.manifest import OutputGate

Array = npt.NDArray[Any]


def _flat(a: Array) -> npt.NDArray[np.float64]:
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def is_class_scores(shape: tuple[int, ...]) -> bool:
    """(N, classes >= 2): a row of class scores per sample."""
    return len(shape) == 2 and shape[1] >= 2


def is_boxes(shape: tuple[int, ...]) -> bool:
    """(N, boxes, 4): boxes as x1, y1, x2, y2 in the last axis."""
    return len(shape) >= 3 and shape[-1] == 4


def top1_agreement(out: Array, ref: Array) -> float:
    """Fraction of samples whose argmax equals the reference's."""
    return float(np.mean(_flat(out).argmax(axis=1) == _flat(ref).argmax(axis=1)))


def topk_agreement(out: Array, ref: Array, k: int) -> float:
    """Fraction of samples whose reference top-1 is among the output's top ``k`` (stable ties)."""
    scores = _flat(out)
    best = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
    return float(np.mean((best == _flat(ref).argmax(axis=1)[:, None]).any(axis=1)))


def mse(out: Array, ref: Array) -> float:
    """Mean squared error over every element."""
    return float(np.mean((_flat(out) - _flat(ref)) ** 2))


def max_abs_error(out: Array, ref: Array) -> float:
    """Largest |out - ref| over every element."""
    diff = np.abs(_flat(out) - _flat(ref))
    return float(diff.max()) if diff.size else 0.0


def mean_cosine(out: Array, ref: Array) -> float:
    """Mean over samples of the cosine similarity of the flattened rows (two zero rows: 1)."""
    a, b = _flat(out), _flat(ref)
    dot = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(np.clip(cos, -1.0, 1.0)))


def mask_iou(out: Array, ref: Array, threshold: float) -> float:
    """IoU of the masks ``out > threshold`` and ``ref > threshold``, pooled over every sample.

    Two empty masks agree completely (1.0).
    """
    a, b = _flat(out) > threshold, _flat(ref) > threshold
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def box_match(out: Array, ref: Array, iou: float) -> float:
    """Fraction of reference boxes that some output box of the same sample overlaps at IoU >= ``iou``.

    Boxes are (x1, y1, x2, y2) in the last axis; no reference boxes at all: 1.0.
    """
    a = np.asarray(out, dtype=np.float64).reshape(len(out), -1, 4)
    b = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1, 4)
    if b.shape[1] == 0:
        return 1.0
    if a.shape[1] == 0:
        return 0.0
    lo = np.maximum(a[:, None, :, :2], b[:, :, None, :2])  # (N, ref, out, 2)
    hi = np.minimum(a[:, None, :, 2:], b[:, :, None, 2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=-1)
    area_a = np.prod(np.clip(a[..., 2:] - a[..., :2], 0.0, None), axis=-1)[:, None, :]
    area_b = np.prod(np.clip(b[..., 2:] - b[..., :2], 0.0, None), axis=-1)[:, :, None]
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return float(np.mean(ious.max(axis=2) >= iou))


def _same(out: tuple[int, ...], ref: tuple[int, ...]) -> bool:
    return out == ref


def _both_boxes(out: tuple[int, ...], ref: tuple[int, ...]) -> bool:
    return is_boxes(out) and is_boxes(ref)


@dataclass(frozen=True)
class Metric:
    """One per-output bound of a gate: the OutputGate field, how it is measured, its Check name."""

    check: str  # the device's Check is named f"{check}[{output}]"
    bound: str  # the OutputGate field that holds the bound
    op: Literal[">=", "<="]
    what: str  # how the number is obtained, for the Check's detail
    measure: Callable[[Array, Array, OutputGate], float]
    fits: Callable[[tuple[int, ...], tuple[int, ...]], bool] = _same


METRICS = (
    Metric(
        "top1_agreement", "min_top1_agreement", ">=", "argmax equal", lambda o, r, g: top1_agreement(o, r)
    ),
    Metric(
        "topk_agreement",
        "min_topk_agreement",
        ">=",
        "reference top-1 in the output's top-k",
        lambda o, r, g: topk_agreement(o, r, g.top_k or 1),
    ),
    Metric("mse", "max_mse", "<=", "mean squared error", lambda o, r, g: mse(o, r)),
    Metric("max_abs", "max_abs_error", "<=", "largest |out - ref|", lambda o, r, g: max_abs_error(o, r)),
    Metric("cosine", "min_cosine", ">=", "mean cosine similarity", lambda o, r, g: mean_cosine(o, r)),
    Metric(
        "iou",
        "min_mask_iou",
        ">=",
        "IoU of the masks above mask_threshold",
        lambda o, r, g: mask_iou(o, r, g.mask_threshold or 0.0),
    ),
    Metric(
        "box_match",
        "min_box_match",
        ">=",
        "reference boxes matched at IoU >= box_iou",
        lambda o, r, g: box_match(o, r, g.box_iou or 1.0),
        _both_boxes,
    ),
)
