"""Rollout metrics for the collector's Prometheus endpoint, read from the rollout tables of the
fleet database (either backend) at scrape time.

Exported: each active rollout, and each finished one for ``RECENT_S`` after it ended (so a
dashboard shows how it ended, then its series go). At most 14 series per rollout, whatever its
size: the device counts by state, the wave, the state and the gate figures the controller
stored. Nothing per device (the per-device series stay those of the telemetry).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.collector_stats import RateLimitedLog
from fleet.rollout.model import DeviceState
from fleet.rollout.store import Db, RolloutRow, RolloutStore, has_table

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

RECENT_S = 86400.0
# Gate figure (as the controller stores it) -> metric name, help.
FIGURES = (
    ("p99_ratio", "edge_rollout_p99_ratio", "New version's p99 latency over the baseline's (all classes)."),
    ("worst_p99_ratio", "edge_rollout_worst_p99_ratio", "The worst device class's p99 latency ratio."),
    ("accuracy_drop", "edge_rollout_accuracy_drop_ratio", "Online accuracy lost against the baseline."),
    ("rss_growth", "edge_rollout_rss_growth_ratio", "Agent RSS growth against the baseline, as a fraction."),
    ("throttled_ratio", "edge_rollout_throttled_ratio", "Share of updated devices that throttle."),
)
METRIC_NAMES = (
    "edge_rollout_devices",
    "edge_rollout_wave",
    "edge_rollout_waves",
    "edge_rollout_state_info",
    "edge_rollout_updated_timestamp_seconds",
    *(name for _, name, _ in FIGURES),
)


class RolloutMetrics:
    """Reads the rollout tables at each scrape over one connection of its own (scrapes come
    from the HTTP server's threads: one at a time here). A database that fails costs the
    rollout series of that scrape only, never the rest of the endpoint."""

    def __init__(self, target: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.clock = clock
        self._db: Db | None = None
        self._lock = threading.Lock()
        self._log = RateLimitedLog()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                found = self._read()
            except Exception as exc:  # any database failure: skip these series, keep the endpoint
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self._log.warning("rollout metrics: %s", first)
                self.close()
                return
        yield from _families(found)

    def _read(self) -> list[tuple[RolloutRow, dict[DeviceState, int]]]:
        if self._db is None:
            from fleet import fleetdb

            self._db = Db.wrap(fleetdb.open_for_reading(self.target))
        if not has_table(self._db, "rollouts"):
            return []
        store = RolloutStore(self._db)
        cutoff = self.clock() - RECENT_S
        rows = [r for r in store.rollouts() if not r.state.final or r.updated_at >= cutoff]
        return [(r, store.counts(r.id)) for r in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _families(found: list[tuple[RolloutRow, dict[DeviceState, int]]]) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    devices = GaugeMetricFamily(
        "edge_rollout_devices", "Devices of the rollout in each state.", labels=("rollout", "state")
    )
    wave = GaugeMetricFamily("edge_rollout_wave", "The wave running (1-based).", labels=("rollout",))
    waves = GaugeMetricFamily("edge_rollout_waves", "Waves the rollout has.", labels=("rollout",))
    info = GaugeMetricFamily(
        "edge_rollout_state_info",
        "Always 1; the labels say the rollout's state and what it rolls out.",
        labels=("rollout", "state", "bundle", "version"),
    )
    updated = GaugeMetricFamily(
        "edge_rollout_updated_timestamp_seconds", "When the rollout last changed.", labels=("rollout",)
    )
    figures = {key: GaugeMetricFamily(name, doc, labels=("rollout",)) for key, name, doc in FIGURES}
    for row, counts in found:
        for state in DeviceState:
            devices.add_metric([row.id, state.value], counts.get(state, 0))
        wave.add_metric([row.id], min(row.wave + 1, len(row.wave_ends)))
        waves.add_metric([row.id], len(row.wave_ends))
        info.add_metric([row.id, row.state.value, row.spec.bundle.name, row.spec.bundle.version], 1)
        updated.add_metric([row.id], row.updated_at)
        for key, family in figures.items():
            if key in row.figures:
                family.add_metric([row.id], float(row.figures[key]))
    if found:
        yield from (devices, wave, waves, info, updated, *figures.values())
