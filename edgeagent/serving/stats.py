"""Request latency and error counts per (model, bundle version, runtime, delegate).

Every request the server answers for a model is recorded here; the telemetry loop takes a
:meth:`RequestStats.snapshot` (optionally resetting the interval) and reports percentiles
from the :class:`~edgeagent.histogram.Histogram` of each key.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edgeagent.histogram import Histogram


class StatsKey(NamedTuple):
    model: str
    version: str
    runtime: str
    delegate: str


@dataclass
class KeyStats:
    """One key's interval: latency of answered requests (seconds), and failures by kind."""

    latency: Histogram = field(default_factory=Histogram)
    client_errors: int = 0  # 4xx: inputs that did not fit the model
    server_errors: int = 0  # 5xx: the runtime failed

    def summary(self) -> dict[str, Any]:
        """count, p50/p90/p99/p999/max in ms, and error counts (JSON-ready)."""
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
        }


class RequestStats:
    """Thread-safe per-key request statistics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[StatsKey, KeyStats] = {}

    def record(self, key: StatsKey, seconds: float) -> None:
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = KeyStats()
            stats.latency.record(seconds)

    def error(self, key: StatsKey, *, client: bool) -> None:
        with self._lock:
            stats = self._stats.setdefault(key, KeyStats())
            if client:
                stats.client_errors += 1
            else:
                stats.server_errors += 1

    def snapshot(self, *, reset: bool = False) -> dict[StatsKey, KeyStats]:
        """A copy of every key's stats; ``reset`` starts a new interval."""
        with self._lock:
            if reset:
                taken, self._stats = self._stats, {}
                return taken
            return {
                k: KeyStats(v.latency.copy(), v.client_errors, v.server_errors)
                for k, v in self._stats.items()
            }
