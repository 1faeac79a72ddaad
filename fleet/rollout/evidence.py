"""Evidence for the gates, read from the collector's tables of the fleet database.

Reads are incremental (cursors on the events' id and the telemetry's received time), so a
controller polling every second over a 1,000-device rollout parses each telemetry row once.
A restarted controller starts from the rollout's creation and rebuilds the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgeagent.histogram import Histogram
from edgeagent.protocol import BundleRef
from fleet.rollout.gates import Side
from fleet.rollout.store import Db, DeviceRow

# Telemetry rows can commit with a received time a little older than rows already read
# (the collector stamps on arrival, commits in batches): re-read this much, de-duplicated.
_OVERLAP_S = 5.0
_CHUNK = 500


@dataclass(frozen=True)
class Outcome:
    device: str
    ok: bool
    code: str
    reason: str


@dataclass
class _DeviceKpis:
    latency: dict[str, Histogram] = field(default_factory=dict)  # version -> merged (s)
    labelled: dict[str, int] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    process: list[tuple[float, float | None, bool]] = field(default_factory=list)  # received, rss, throttled


class EvidenceReader:
    """What the devices of one rollout reported about ``model`` since ``since`` (Unix s)."""

    def __init__(self, db: Db, model: str, bundle: BundleRef, since: float) -> None:
        self.db = db
        self.model = model
        self.bundle = bundle
        self.since = since
        self._event_id = self._first_event_id(since)
        self._mt_cursor = since
        self._t_cursor = since
        self._seen: set[tuple[object, ...]] = set()
        self.kpis: dict[str, _DeviceKpis] = {}

    def _first_event_id(self, since: float) -> int:
        found = self.db.rows("SELECT min(id) FROM events WHERE received >= ?", (since,))
        return int(found[0][0]) - 1 if found and found[0][0] is not None else self._max_event_id()

    def _max_event_id(self) -> int:
        found = self.db.rows("SELECT max(id) FROM events")
        return int(found[0][0]) if found and found[0][0] is not None else 0

    # --- outcomes ---------------------------------------------------------------------------

    def outcomes(self, pushed: dict[str, float]) -> list[Outcome]:
        """Outcomes of ``pushed`` devices (device -> pushed at, Unix s) that arrived since the
        last call: from deployment events, and from reported state for a commit whose event
        was lost."""
        found: dict[str, Outcome] = {}
        rows = self.db.rows(
            "SELECT id, device, kind, ok, code, reason, received FROM events WHERE id > ? AND model = ? "
            "AND bundle = ? AND version = ? AND kind IN ('outcome', 'refused') ORDER BY id",
            (self._event_id, self.model, self.bundle.name, self.bundle.version),
        )
        for event_id, device, kind, ok, code, reason, received in rows:
            self._event_id = max(self._event_id, int(event_id))
            at = pushed.get(device)
            if at is None or received < at - _OVERLAP_S:
                continue
            good = kind == "outcome" and bool(ok)
            found[device] = Outcome(device, good, code or ("committed" if good else "refused"), reason or "")
        for device, models in self._reported(d for d in pushed if d not in found):
            status: dict[str, Any] = models.get(self.model) or {}
            active = (status.get("bundle") or {}).get("sha256") == self.bundle.sha256
            if active and status.get("state") in ("idle", "committed"):
                found[device] = Outcome(device, True, "committed", "reported active")
        return list(found.values())

    def _reported(self, devices: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
        wanted = list(devices)
        out = []
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            marks = ", ".join("?" for _ in chunk)
            for device, models in self.db.rows(
                f"SELECT device, models FROM devices WHERE device IN ({marks})",  # noqa: S608
                chunk,
            ):
                if models:
                    out.append((device, json.loads(models)))
        return out

    # --- KPIs -------------------------------------------------------------------------------

    def refresh(self, baseline_since: float) -> None:
        """Read model and process telemetry that arrived since the last call."""
        self._mt_cursor = min(self._mt_cursor, baseline_since)
        self._t_cursor = min(self._t_cursor, baseline_since)
        rows = self.db.rows(
            "SELECT device, seq, version, runtime, delegate, received, latency_hist, labelled, correct "
            "FROM model_telemetry WHERE received >= ? AND model = ?",
            (self._mt_cursor - _OVERLAP_S, self.model),
        )
        for device, seq, version, runtime, delegate, received, hist, labelled, correct in rows:
            key = ("m", device, seq, version, runtime, delegate)
            self._mt_cursor = max(self._mt_cursor, received)
            if key in self._seen:
                continue
            self._seen.add(key)
            kpis = self.kpis.setdefault(device, _DeviceKpis())
            if hist:
                merged = kpis.latency.get(version)
                h = Histogram.from_dict(json.loads(hist))
                if merged is None:
                    kpis.latency[version] = h
                else:
                    merged.merge(h)
            kpis.labelled[version] = kpis.labelled.get(version, 0) + int(labelled or 0)
            kpis.correct[version] = kpis.correct.get(version, 0) + int(correct or 0)
        process = self.db.rows(
            "SELECT device, seq, received, rss_mb, throttled FROM telemetry WHERE received >= ?",
            (self._t_cursor - _OVERLAP_S,),
        )
        for device, seq, received, rss, throttled in process:
            tkey = ("t", device, seq)
            self._t_cursor = max(self._t_cursor, received)
            if tkey in self._seen:
                continue
            self._seen.add(tkey)
            self.kpis.setdefault(device, _DeviceKpis()).process.append((received, rss, bool(throttled)))

    def sides(self, committed: list[DeviceRow]) -> tuple[Side, Side]:
        """Baseline (the version each committed device ran before, and its process figures
        before it was pushed) and new (this rollout's version, after it committed)."""
        base, new = _SideBuilder(), _SideBuilder()
        for row in committed:
            kpis = self.kpis.get(row.device)
            if kpis is None or row.previous is None:
                continue
            profile = row.profile or "unknown"
            base.add_model(row.device, profile, kpis, row.previous.version)
            new.add_model(row.device, profile, kpis, self.bundle.version)
            pushed, finished = row.pushed_at or 0.0, row.finished_at or 0.0
            base.add_process(row.device, [p for p in kpis.process if p[0] < pushed])
            new.add_process(row.device, [p for p in kpis.process if p[0] > finished])
        return base.build(), new.build()


class _SideBuilder:
    def __init__(self) -> None:
        self.latency: dict[str, Histogram] = {}
        self.labelled = 0
        self.correct = 0
        self.rss: list[float] = []
        self.throttled: set[str] = set()
        self.devices: set[str] = set()

    def add_model(self, device: str, profile: str, kpis: _DeviceKpis, version: str) -> None:
        hist = kpis.latency.get(version)
        if hist is not None:
            merged = self.latency.get(profile)
            if merged is None:
                self.latency[profile] = hist.copy()
            else:
                merged.merge(hist)
        self.labelled += kpis.labelled.get(version, 0)
        self.correct += kpis.correct.get(version, 0)

    def add_process(self, device: str, rows: list[tuple[float, float | None, bool]]) -> None:
        if not rows:
            return
        self.devices.add(device)
        values = [rss for _, rss, _ in rows if rss is not None]
        if values:
            self.rss.append(sum(values) / len(values))
        if any(t for _, _, t in rows):
            self.throttled.add(device)

    def build(self) -> Side:
        return Side(
            latency=self.latency,
            labelled=self.labelled,
            correct=self.correct,
            rss_mb=sum(self.rss) / len(self.rss) if self.rss else None,
            throttled=frozenset(self.throttled),
            devices=frozenset(self.devices),
        )
