"""``POST /v1/feedback``: a true label for an earlier prediction, counted as online accuracy.

Body: ``{"id": "<prediction id>", "label": 3}``, or ``{"id": ..., "label": [3, 1, ...]}`` with
one label per sample of a batched prediction. Reply: ``{"id", "model", "version", "correct":
[true, ...], "labelled": n}``. The label is checked against the top-1 class of the prediction's
first output and counted under the (model, version, runtime, delegate) that made it.
"""

from __future__ import annotations

import json
from typing import Any

from edgeagent.errors import InputError
from edgeagent.serving.http import HttpError
from edgeagent.serving.recent import RecentPredictions, UnknownPrediction
from edgeagent.serving.stats import RequestStats

_FIELDS = frozenset({"id", "label"})


def parse_feedback(body: bytes) -> tuple[str, list[int]]:
    """(prediction id, labels) from a JSON feedback body; InputError (400 bad_body) when malformed."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the body is not JSON ({exc})", code="bad_body") from exc
    if not isinstance(doc, dict) or not doc.keys() >= _FIELDS:
        raise InputError('the JSON body must be an object with "id" and "label"', code="bad_body")
    unknown = doc.keys() - _FIELDS
    if unknown:
        raise InputError(f"unknown JSON field {sorted(unknown)[0]!r} (allowed: id, label)", code="bad_body")
    pid, label = doc["id"], doc["label"]
    if not isinstance(pid, str) or not pid:
        raise InputError('"id" must be the prediction id string of a predict reply', code="bad_body")
    labels = label if isinstance(label, list) else [label]
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise InputError('"label" must be a class index or a non-empty list of them', code="bad_body")
    return pid, labels


def apply_feedback(
    recent: RecentPredictions, stats: RequestStats, pid: str, labels: list[int]
) -> dict[str, Any]:
    """Check ``labels`` against prediction ``pid`` and count them; HttpError with the 4xx when refused."""
    try:
        record = recent.find(pid)
    except UnknownPrediction as exc:
        raise HttpError(404, "unknown_prediction", str(exc), close=False) from exc
    if record.scores is None:
        raise HttpError(
            422,
            "not_classification",
            f"prediction {pid!r} has no class scores to check a label against "
            "(its first output is not a small (batch, classes) array)",
            close=False,
        )
    batch, classes = record.scores.shape
    if len(labels) != batch:
        raise HttpError(
            422,
            "label_count",
            f"prediction {pid!r} has {batch} sample(s); send {batch} label(s), not {len(labels)}",
            close=False,
        )
    wrong = next((v for v in labels if not 0 <= v < classes), None)
    if wrong is not None:
        raise HttpError(
            422,
            "bad_label",
            f"label {wrong} is out of range: the model has classes 0..{classes - 1}",
            close=False,
        )
    top1 = record.top1 or ()
    correct = [int(p) == v for p, v in zip(top1, labels, strict=True)]
    try:
        first = recent.mark_labelled(record)
    except UnknownPrediction as exc:
        raise HttpError(404, "unknown_prediction", str(exc), close=False) from exc
    if not first:
        raise HttpError(409, "already_labelled", f"prediction {pid!r} already has its label", close=False)
    stats.label(record.key, len(labels), sum(correct))
    return {
        "id": pid,
        "model": record.key.model,
        "version": record.key.version,
        "correct": correct,
        "labelled": len(labels),
    }
