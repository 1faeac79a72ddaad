"""A bounded ring of recent predictions by id, so a later label can be matched to its prediction.

Each reply carries an ``id``; an application that learns the true label later reports it
with that id (``POST /v1/feedback``), and online accuracy is counted per model version and
delegate. Only small class-score outputs are kept (top-1 is computed when a label arrives;
at most 1 KiB each, so 4 MiB for the default 4096 entries), never the inputs.

Ids are a random per-process prefix and a counter, and prediction ``n`` lives in slot
``n % capacity``: adding is a list store (no dict, no eviction step), and a lookup can tell
an id that this process never issued from one that was evicted by newer predictions.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from typing import NamedTuple

import numpy as np

from edgeagent.serving.stats import StatsKey

DEFAULT_CAPACITY = 4096
_MAX_KEPT = 256  # elements of a score array kept per prediction (1 KiB of float32)
_COUNTER = re.compile(r"[0-9a-f]{1,16}\Z")


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


class UnknownPrediction(LookupError):
    """The id was never issued by this process, or its record was evicted; the message says which."""

    def __init__(self, message: str, *, evicted: bool) -> None:
        super().__init__(message)
        self.evicted = evicted


class RecentPredictions:
    """The last ``capacity`` predictions by id, each labelled at most once (thread-safe)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._ring: list[tuple[str, StatsKey, np.ndarray | None, float] | None] = [None] * capacity
        self._labelled = bytearray(capacity)
        self._issued = 0
        # Ids are unique across restarts: a random per-process prefix and a counter.
        self._prefix = secrets.token_hex(4)

    def add(self, key: StatsKey, first_output: np.ndarray) -> str:
        """Remember a reply and return its new id; only a small (batch, classes) score array is kept."""
        # is_class_scores, inline: this runs on every request, right after the model
        small = first_output.ndim == 2 and first_output.shape[1] >= 2 and first_output.size <= _MAX_KEPT
        scores = first_output if small else None
        now = time.time()
        with self._lock:
            self._issued = n = self._issued + 1
            pid = f"{self._prefix}-{n:x}"
            slot = n % self.capacity
            self._ring[slot] = (pid, key, scores, now)  # a plain tuple: PredictionRecord when looked up
            self._labelled[slot] = 0
        return pid

    def get(self, pid: str) -> PredictionRecord | None:
        try:
            return self.find(pid)
        except UnknownPrediction:
            return None

    def find(self, pid: str) -> PredictionRecord:
        """The record of ``pid``; UnknownPrediction says whether it was evicted or never issued here."""
        prefix, _, counter = pid.rpartition("-")
        n = int(counter, 16) if prefix == self._prefix and _COUNTER.match(counter) else 0
        with self._lock:
            issued = self._issued
            record = self._ring[n % self.capacity] if 0 < n <= issued else None
        if record is not None and record[0] == pid:
            return PredictionRecord(*record)
        if n == 0 or n > issued:
            raise UnknownPrediction(
                f"prediction id {pid!r} was not issued by this agent process (new ids after a restart)",
                evicted=False,
            )
        raise UnknownPrediction(
            f"prediction {pid!r} was evicted: the agent keeps the last {self.capacity} predictions "
            f"and {issued - n} were made after it",
            evicted=True,
        )

    def mark_labelled(self, record: PredictionRecord) -> bool:
        """Mark ``record`` labelled; False when it already was. UnknownPrediction when evicted meanwhile."""
        slot = int(record.id.rpartition("-")[2], 16) % self.capacity
        with self._lock:
            kept = self._ring[slot]
            if kept is None or kept[0] != record.id:
                raise UnknownPrediction(
                    f"prediction {record.id!r} was evicted while its label was checked", evicted=True
                )
            if self._labelled[slot]:
                return False
            self._labelled[slot] = 1
            return True

    @property
    def evicted(self) -> int:
        """How many predictions have been pushed out by newer ones."""
        return max(0, self._issued - self.capacity)

    def __len__(self) -> int:
        return min(self._issued, self.capacity)
