"""The collector's in-memory picture of the fleet: the latest state of each device and the
running totals that Prometheus counters need. The database holds the history; this holds
"now", so a scrape costs no query and a vanished device's series vanish with it."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeagent.histogram import Histogram
from edgeagent.protocol import Event, Reported, Telemetry

# (model, version, runtime, delegate): one served configuration, the unit of inference series.
ModelKey = tuple[str, str, str, str]
# (model, bundle, version, runtime, delegate): the fleet-wide latency histogram's labels.
LatencyKey = tuple[str, str, str, str, str]
# (model, bundle, version, ok, code) of a deployment outcome event.
OutcomeKey = tuple[str, str, str, bool, str]

#: Upper bounds (s) of the classic Prometheus latency buckets: 10 per decade from 0.1 ms to 10 s
#: (each 1.26x the last), so histogram_quantile's linear interpolation inside one bucket is off
#: by at most that bucket's width. The series carry no device label, so 52 buckets per served
#: configuration cost little however large the fleet.
LATENCY_BOUNDS = tuple(float(f"{10 ** (e / 10):.6g}") for e in range(-40, 11))


@dataclass
class LatencyTotals:
    """Requests of one served configuration across the fleet since the collector started,
    bucketed by LATENCY_BOUNDS (the last count is above the last bound)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    sum_s: float = 0.0
    count: int = 0

    def add_sketch(self, data: Mapping[str, Any]) -> None:
        """Add an agent's latency sketch (Histogram.to_dict(), seconds): each sketch bucket's
        requests go to the classic bucket holding its representative value (1% error)."""
        hist = Histogram.from_dict(data)  # validates the sketch's parameters and totals
        for index, n in data.get("buckets", {}).items():
            value = 2.0 * hist.gamma ** int(index) / (hist.gamma + 1.0)
            self.counts[bisect.bisect_left(LATENCY_BOUNDS, value)] += int(n)
        self.sum_s += hist.sum
        self.count += hist.count

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, requests at or under it), +Inf last."""
        out, seen = [], 0
        for bound, n in zip((*LATENCY_BOUNDS, float("inf")), self.counts, strict=True):
            seen += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(seen)))
        return out


@dataclass
class Totals:
    """Counters of one model key since the collector started (Prometheus handles the reset)."""

    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0
    latency_sum_s: float = 0.0
    latency_count: int = 0


@dataclass
class DeviceState:
    device: str
    last_seen: float | None = None  # collector clock, Unix s
    reported: Reported | None = None
    telemetry: Telemetry | None = None  # the newest by seq
    totals: dict[ModelKey, Totals] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        if self.reported is not None:
            return list(self.reported.groups)
        return list(self.telemetry.groups) if self.telemetry is not None else []

    def bundle_of(self, model: str) -> str:
        """The bundle name the device reports for a model name ('' when unknown)."""
        status = self.reported.models.get(model) if self.reported else None
        return status.bundle.name if status is not None and status.bundle is not None else ""


class FleetState:
    """Thread-safe: the collector's writer thread updates it, the Prometheus exporter reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceState] = {}
        self._latency: dict[LatencyKey, LatencyTotals] = {}
        self._outcomes: Counter[OutcomeKey] = Counter()

    def _device(self, device: str) -> DeviceState:
        state = self._devices.get(device)
        if state is None:
            state = self._devices[device] = DeviceState(device)
        return state

    def _seen(self, state: DeviceState, when: float | None) -> None:
        if when is not None and (state.last_seen is None or when > state.last_seen):
            state.last_seen = when

    def add_telemetry(self, stored: Iterable[tuple[Telemetry, float]]) -> None:
        """Stored (not duplicate) telemetry messages with the time each was received."""
        with self._lock:  # once per batch: the exporter waits at most one batch
            for t, received in stored:
                state = self._device(t.device)
                self._seen(state, received)
                if state.telemetry is None or t.seq > state.telemetry.seq:
                    state.telemetry = t
                for m in t.models:
                    key = (m.model, m.version, m.runtime, m.delegate)
                    totals = state.totals.get(key)
                    if totals is None:
                        totals = state.totals[key] = Totals()
                    totals.requests += m.count
                    totals.client_errors += m.client_errors
                    totals.server_errors += m.server_errors
                    hist = m.latency_hist or {}
                    totals.latency_sum_s += float(hist.get("sum") or 0.0)
                    totals.latency_count += int(hist.get("count") or 0)
                    if hist:
                        self._add_latency(state, m.model, m.bundle, (m.version, m.runtime, m.delegate), hist)

    def _add_latency(
        self, state: DeviceState, model: str, bundle: str | None, rest: tuple[str, str, str], hist: Any
    ) -> None:
        key = (model, bundle or state.bundle_of(model), *rest)
        latency = self._latency.get(key)
        if latency is None:
            latency = self._latency[key] = LatencyTotals()
        # A sketch with other parameters than this edgectl's is left out; its requests still count.
        with contextlib.suppress(ValueError, KeyError, TypeError):
            latency.add_sketch(hist)

    def add_event(self, device: str, received: float, event: Event | None = None) -> None:
        with self._lock:
            self._seen(self._device(device), received)
            if event is not None and event.kind == "outcome" and event.ok is not None:
                name, version = (event.bundle.name, event.bundle.version) if event.bundle else ("", "")
                code = event.code or ("committed" if event.ok else "error")
                key = (event.model or "default", name, version, event.ok, code)
                self._outcomes[key] += 1

    def latency(self) -> dict[LatencyKey, LatencyTotals]:
        """Copies of the fleet-wide latency histograms."""
        with self._lock:
            return {k: dataclasses.replace(v, counts=list(v.counts)) for k, v in self._latency.items()}

    def outcomes(self) -> dict[OutcomeKey, int]:
        """Deployment outcomes (events) received since the collector started."""
        with self._lock:
            return dict(self._outcomes)

    def set_reported(self, device: str, reported: Reported | None, seen: float | None) -> None:
        """The device's reported state; None removes the device (its retained state was cleared)."""
        with self._lock:
            if reported is None:
                self._devices.pop(device, None)
                return
            state = self._device(device)
            state.reported = reported
            self._seen(state, seen)

    def forget(self, cutoff: float) -> int:
        """Drop devices not heard from since ``cutoff`` (Unix s); returns how many went.

        A device known only by its retained last will (offline since before the collector
        started) counts as heard from at its reported state's time, so it stays, reported
        offline, until that is older than ``cutoff``.
        """
        with self._lock:
            gone = [
                d
                for d, s in self._devices.items()
                if max(s.last_seen or 0.0, s.reported.at if s.reported else 0.0) < cutoff
            ]
            for device in gone:
                del self._devices[device]
            return len(gone)

    def snapshot(self) -> list[DeviceState]:
        """Copies of every device's state, sorted by device id (the messages themselves are frozen)."""
        with self._lock:
            return [
                dataclasses.replace(s, totals={k: dataclasses.replace(v) for k, v in s.totals.items()})
                for _, s in sorted(self._devices.items())
            ]
