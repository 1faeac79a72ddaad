"""The collector's counters and its rate-limited warnings."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fleet.collector")  # the collector's warnings, under its name


@dataclass
class CollectorStats:
    """Counters since start. The receiver's reader thread writes ``received``, ``dropped`` and
    ``malformed["oversize"]``, the writer thread the rest: no counter has two writers."""

    received: Counter[str] = field(default_factory=Counter)  # by kind
    stored: Counter[str] = field(default_factory=Counter)  # by kind, duplicates left out
    duplicates: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by reason
    dropped: int = 0  # the collector's queue or the receiver's buffer was full
    store_failed: int = 0  # messages of batches the database refused (disk full, ...)
    batches: int = 0
    retention_deleted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "stored": dict(self.stored),
            "duplicates": self.duplicates,
            "malformed": dict(self.malformed),
            "dropped": self.dropped,
            "store_failed": self.store_failed,
            "batches": self.batches,
            "retention_deleted": self.retention_deleted,
        }


class RateLimitedLog:
    """At most one warning per ``interval_s``; the next one says how many were held back."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = -interval_s
        self._held = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval_s:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        if held:
            log.warning(msg + " (and %d more like it since the last report)", *args, held)
        else:
            log.warning(msg, *args)
