"""A bounded map of recent predictions by id, so a later label can be matched to its prediction.

Each reply carries an ``id``; an application that learns the true label later reports it
with that id (the telemetry issue's ``POST /v1/feedback``), and online accuracy is counted
per model version and delegate. Only small class-score outputs are kept (top-1 is computed
when a label arrives; at most 1 KiB each, so 4 MiB for the default 4096 entries), never the
inputs, and the oldest entries go first when the map is full; how many went is counted.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from edgeagent.serving.stats import StatsKey

DEFAULT_CAPACITY = 4096
_MAX_KEPT = 256  # elements of a score array kept per prediction (1 KiB of float32)


class PredictionRecord(NamedTuple):
    id: str
    key: StatsKey  # model, version, runtime, delegate that answered
    scores: np.ndarray | None  # the first output when it is a small (batch, classes) score array
    at: float  # time.time() of the reply

    @property
    def top1(self) -> tuple[int, ...] | None:
        """The predicted class per sample (argmax of the first output), computed when asked."""
        if self.scores is None:
            return None
        return tuple(int(i) for i in self.scores.argmax(axis=1))


class RecentPredictions:
    """The last ``capacity`` predictions by id (thread-safe)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.evicted = 0
        self._lock = threading.Lock()
        self._records: OrderedDict[str, PredictionRecord] = OrderedDict()
        # Ids are unique across restarts: a random per-process prefix and a counter.
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"

    def add(self, pid: str, key: StatsKey, first_output: np.ndarray) -> None:
        """Remember a reply; only a small (batch, classes) score array is kept, not inputs."""
        scores = (
            first_output
            if first_output.ndim == 2 and first_output.shape[1] >= 2 and first_output.size <= _MAX_KEPT
            else None
        )
        record = PredictionRecord(pid, key, scores, time.time())
        with self._lock:
            self._records[pid] = record
            if len(self._records) > self.capacity:
                self._records.popitem(last=False)
                self.evicted += 1

    def get(self, pid: str) -> PredictionRecord | None:
        with self._lock:
            return self._records.get(pid)

    def __len__(self) -> int:
        return len(self._records)
