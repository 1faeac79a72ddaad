"""Request latency, errors and online accuracy per (model, bundle version, runtime, delegate).

Every request the server answers for a model is recorded here; the telemetry loop takes a
:meth:`RequestStats.snapshot` (optionally resetting the interval) and reports percentiles
from the :class:`~edgeagent.histogram.Histogram` of each key, the labels that arrived
(``labelled``/``correct``, counted when the label arrives, under the key of the model version
that made the prediction) and the distribution of predicted classes (``predicted``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from edgeagent.histogram import Histogram


class StatsKey(NamedTuple):
    model: str
    version: str
    runtime: str
    delegate: str


def is_class_scores(output: np.ndarray) -> bool:
    """Whether a first output looks like class scores: (batch, classes >= 2)."""
    return output.ndim == 2 and output.shape[1] >= 2


@dataclass
class KeyStats:
    """One key's interval: latency of answered requests (seconds), failures, labels, predicted classes."""

    latency: Histogram = field(default_factory=Histogram)
    client_errors: int = 0  # 4xx: inputs that did not fit the model
    server_errors: int = 0  # 5xx: the runtime failed
    labelled: int = 0  # samples whose true label arrived in the interval (POST /v1/feedback)
    correct: int = 0  # of those, how many the top-1 prediction got right
    # top-1 class -> samples served, counted only for class-score outputs (2-D, classes >= 2)
    predicted: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """count, p50/p90/p99/p999/max in ms, error counts, labels and predicted classes (JSON-ready)."""
        h = self.latency
        qs = h.quantiles((0.5, 0.9, 0.99, 0.999)) if h.count else [None] * 4
        ms = [round(q * 1e3, 4) if q is not None else None for q in qs]
        return {
            "count": h.count,
            "p50_ms": ms[0],
            "p90_ms": ms[1],
            "p99_ms": ms[2],
            "p999_ms": ms[3],
            "max_ms": round(h.max * 1e3, 4) if h.count else None,
            "client_errors": self.client_errors,
            "server_errors": self.server_errors,
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": round(self.correct / self.labelled, 4) if self.labelled else None,
            "predicted": {str(c): n for c, n in sorted(self.predicted.items())},
        }

    def copy(self) -> KeyStats:
        return KeyStats(
            self.latency.copy(),
            self.client_errors,
            self.server_errors,
            self.labelled,
            self.correct,
            dict(self.predicted),
        )


class RequestStats:
    """Thread-safe per-key request statistics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[StatsKey, KeyStats] = {}

    def _get(self, key: StatsKey) -> KeyStats:  # with the lock held
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = KeyStats()
        return stats

    def record(self, key: StatsKey, seconds: float, first_output: np.ndarray | None = None) -> None:
        """One answered request: its latency, and its top-1 classes when ``first_output`` is class scores."""
        top1: list[int] = []
        if first_output is not None and is_class_scores(first_output):
            # argmax of the flat array is the class when there is one sample (the usual request)
            top1 = [int(first_output.argmax())] if len(first_output) == 1 else first_output.argmax(1).tolist()
        with self._lock:
            stats = self._get(key)
            stats.latency.record(seconds)
            predicted = stats.predicted
            for c in top1:
                predicted[c] = predicted.get(c, 0) + 1

    def error(self, key: StatsKey, *, client: bool) -> None:
        with self._lock:
            stats = self._get(key)
            if client:
                stats.client_errors += 1
            else:
                stats.server_errors += 1

    def label(self, key: StatsKey, labelled: int, correct: int) -> None:
        """Labels that arrived now for predictions that the model of ``key`` made."""
        with self._lock:
            stats = self._get(key)
            stats.labelled += labelled
            stats.correct += correct

    def snapshot(self, *, reset: bool = False) -> dict[StatsKey, KeyStats]:
        """A copy of every key's stats; ``reset`` starts a new interval (the old one is handed over whole)."""
        with self._lock:
            if reset:
                taken, self._stats = self._stats, {}
                return taken
            return {k: v.copy() for k, v in self._stats.items()}
