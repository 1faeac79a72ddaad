"""``edgectl fleet report``: one self-contained HTML page (inline CSS and SVG, no script, no
network) with latency percentiles and memory over time, per device and per bundle version,
and the status table.

The period is cut into at most ``buckets`` equal slices. In each slice the latency
histograms of a series are merged and p50/p99 read from the merge (per device; and per
model version across every device that ran it: percentiles are never averaged). Memory is
the mean RSS of the slice.
"""

from __future__ import annotations

import html
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeagent.histogram import Histogram
from edgeagent.svgchart import PALETTE, Series, line_chart
from fleet import fleetdb
from fleet.status import StatusRow, age, status_rows, summary

DEFAULT_BUCKETS = 120
MAX_DEVICE_LINES = 10

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #666; margin-bottom: 16px; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #c62828; font-weight: 600; } .good { color: #2e7d32; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 24px; }
svg.chart { display: block; margin: 8px 0 12px; font-size: 11px; }
svg .title { font-size: 13px; font-weight: 600; } svg .plot { fill: #fafafa; stroke: #ccc; }
svg .grid { stroke: #e4e4e4; } svg .axis { stroke: #999; } svg .empty { fill: #999; font-size: 13px; }
.note { color: #666; font-size: 12.5px; }
"""


@dataclass(frozen=True)
class Report:
    html: str
    devices: int
    charts: int
    rows: int  # telemetry intervals read


class _Buckets:
    """Merge per (series, slice): histograms for percentiles, sums for means."""

    def __init__(self, since: float, width: float) -> None:
        self.since, self.width = since, width
        self.hists: dict[tuple[str, ...], dict[int, Histogram]] = defaultdict(dict)
        self.sums: dict[tuple[str, ...], dict[int, list[float]]] = defaultdict(dict)

    def slot(self, at: float) -> int:
        return max(0, int((at - self.since) // self.width))

    def mid(self, slot: int) -> float:
        return self.since + (slot + 0.5) * self.width

    def add_hist(self, key: tuple[str, ...], at: float, hist: Histogram) -> None:
        slots = self.hists[key]
        slot = self.slot(at)
        if slot in slots:
            slots[slot].merge(hist)
        else:
            slots[slot] = hist.copy()

    def add_value(self, key: tuple[str, ...], at: float, value: float) -> None:
        acc = self.sums[key].setdefault(self.slot(at), [0.0, 0.0])
        acc[0] += value
        acc[1] += 1

    def quantile_points(self, key: tuple[str, ...], q: float) -> list[tuple[float, float]]:
        return [(self.mid(s), h.quantile(q) * 1000) for s, h in sorted(self.hists[key].items()) if h.count]

    def mean_points(self, key: tuple[str, ...]) -> list[tuple[float, float]]:
        return [(self.mid(s), total / n) for s, (total, n) in sorted(self.sums[key].items())]


def build_report(
    db: str | Path,
    *,
    since_s: float = 86400.0,
    now: float | None = None,
    buckets: int = DEFAULT_BUCKETS,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """The report over the last ``since_s`` seconds (device clock) of the database at ``db``."""
    say = progress or (lambda _line: None)
    now = time.time() if now is None else now
    since = now - since_s
    width = max(since_s / buckets, 1.0)
    conn = fleetdb.open_for_reading(db)
    try:
        rows = status_rows(conn)
        heartbeat = fleetdb.collector_heartbeat(conn)
        say(f"reading latency of {len({r.device for r in rows})} devices since {_utc(since)}")
        latency, read = _latency(conn, since, width)
        say(f"read {read:,} intervals; reading memory")
        memory = _memory(conn, since, width)
    finally:
        conn.close()
    gap = max(3 * width, 60.0)
    from fleet.rollout.views import rollout_markers  # rollout (issue 20): markers on latency plots

    axis = Axis(gap_s=gap, slice_s=width, markers=tuple(rollout_markers(db, since)))
    sections = [_latency_section(latency, model, axis) for model in sorted(_models(latency))]
    if not sections:
        sections.append(("Latency", [line_chart("inference latency", [], y_label="ms")], ""))
    sections.append(_memory_section(memory, axis))
    page = _page(rows, heartbeat, sections, since, now)
    return Report(page, len({r.device for r in rows}), sum(len(charts) for _, charts, _ in sections), read)


# (heading, charts, note)
_Section = tuple[str, list[str], str]


@dataclass(frozen=True)
class Axis:
    """The time axis every chart of a report shares: slice width and the gap that breaks a line (s)."""

    gap_s: float
    slice_s: float
    markers: tuple[tuple[float, str], ...] = ()  # (time, label): rollouts starting and ending


def _latency_section(latency: _Buckets, model: str, axis: Axis) -> _Section:
    shown = _top_devices(latency, model)
    versions = sorted(k for k in latency.hists if k[0] == "version" and k[1] == model)
    by_device = _pairs(latency, [("device", model, d) for d in shown], lambda k: k[2])
    by_version = _pairs(latency, versions, lambda k: k[2])
    charts = [
        line_chart(
            f"{model}: p99 (solid) and p50 (dashed) per device",
            by_device,
            y_label="ms",
            gap_s=axis.gap_s,
            slice_s=axis.slice_s,
            markers=axis.markers,
        ),
        line_chart(
            f"{model}: p99 and p50 per bundle version, all devices",
            by_version,
            y_label="ms",
            gap_s=axis.gap_s,
            slice_s=axis.slice_s,
            markers=axis.markers,
        ),
    ]
    total = len(_devices_of(latency, model))
    note = ""
    if total > len(shown):
        note = (
            f"Per-device lines: the {len(shown)} devices with the highest p99 of {total}; "
            "the version chart merges them all."
        )
    return f"Latency: model {model}", charts, note


def _memory_section(memory: _Buckets, axis: Axis) -> _Section:
    devices = sorted(k for k in memory.sums if k[0] == "device")
    shown = sorted(
        devices, key=lambda k: max((v for _, v in memory.mean_points(k)), default=0.0), reverse=True
    )
    shown = sorted(shown[:MAX_DEVICE_LINES])
    versions = sorted(k for k in memory.sums if k[0] == "version")
    by_device = [Series(k[1], memory.mean_points(k)) for k in shown]
    by_version = [Series(f"{k[1]} {k[2]}", memory.mean_points(k)) for k in versions]
    charts = [
        line_chart("agent RSS per device", by_device, y_label="MiB", gap_s=axis.gap_s, slice_s=axis.slice_s),
        line_chart(
            "agent RSS per bundle version (mean of devices)",
            by_version,
            y_label="MiB",
            gap_s=axis.gap_s,
            slice_s=axis.slice_s,
        ),
    ]
    note = (
        f"Per-device lines: the {len(shown)} largest of {len(devices)}." if len(devices) > len(shown) else ""
    )
    return "Memory", charts, note


def _latency(conn: fleetdb.Database, since: float, width: float) -> tuple[_Buckets, int]:
    acc = _Buckets(since, width)
    read = 0
    for row in conn.execute(
        "SELECT device, model, version, at, latency_hist FROM model_telemetry "
        "WHERE at >= ? AND latency_hist IS NOT NULL",
        (since,),
    ):
        read += 1
        try:
            hist = Histogram.from_dict(fleetdb.loads(row["latency_hist"]))
        except (ValueError, KeyError, TypeError):
            continue  # a histogram from an agent with other parameters cannot merge; skip it
        acc.add_hist(("device", row["model"], row["device"]), row["at"], hist)
        acc.add_hist(("version", row["model"], row["version"]), row["at"], hist)
    return acc, read


def _memory(conn: fleetdb.Database, since: float, width: float) -> _Buckets:
    acc = _Buckets(since, width)
    for row in conn.execute("SELECT device, at, rss_mb FROM telemetry WHERE at >= ?", (since,)):
        acc.add_value(("device", row["device"]), row["at"], row["rss_mb"])
    for row in conn.execute(
        "SELECT m.model, m.version, t.at, t.rss_mb FROM telemetry t "
        "JOIN model_telemetry m ON m.device = t.device AND m.seq = t.seq WHERE t.at >= ?",
        (since,),
    ):
        acc.add_value(("version", row["model"], row["version"]), row["at"], row["rss_mb"])
    return acc


def _models(acc: _Buckets) -> set[str]:
    return {k[1] for k in acc.hists}


def _devices_of(acc: _Buckets, model: str) -> list[str]:
    return [k[2] for k in acc.hists if k[0] == "device" and k[1] == model]


def _top_devices(acc: _Buckets, model: str) -> list[str]:
    """The devices to draw: all of them, or the MAX_DEVICE_LINES with the highest p99."""
    devices = _devices_of(acc, model)
    if len(devices) <= MAX_DEVICE_LINES:
        return sorted(devices)

    def worst(device: str) -> float:
        return max((v for _, v in acc.quantile_points(("device", model, device), 0.99)), default=0.0)

    return sorted(sorted(devices, key=worst, reverse=True)[:MAX_DEVICE_LINES])


def _pairs(
    acc: _Buckets, keys: list[tuple[str, ...]], name: Callable[[tuple[str, ...]], str]
) -> list[Series]:
    """A solid p99 and a dashed p50 line in the same colour for each key."""
    series = []
    for i, key in enumerate(keys):
        color = PALETTE[i % len(PALETTE)]
        series.append(Series(f"{name(key)} p99", acc.quantile_points(key, 0.99), color))
        series.append(Series(f"{name(key)} p50", acc.quantile_points(key, 0.5), color, dashed=True))
    return series


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _cell(value: object, fmt: str = ".1f", cls: str = "num") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f'<td class="{cls}">-</td>'
    text = (
        format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)
    )
    return f'<td class="{cls}">{html.escape(text)}</td>'


def _table(rows: list[StatusRow], now: float) -> str:
    head = (
        "device",
        "model",
        "online",
        "seen",
        "bundle",
        "runtime/delegate",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "RSS MB",
        "CPU %",
        "temp °C",
        "acceptance",
        "online acc",
        "last deployment",
    )
    out = ["<table><tr>", *(f"<th>{h}</th>" for h in head), "</tr>"]
    for r in rows:
        online = "-" if r.online is None else ("yes" if r.online else "no")
        accepted = "-" if r.acceptance_passed is None else ("passed" if r.acceptance_passed else "FAILED")
        if r.acceptance_accuracy is not None:
            accepted += f" {r.acceptance_accuracy:.2f}"
        temp = (
            "-"
            if r.temperature_c is None
            else f"{r.temperature_c:.1f}" + (" throttled" if r.throttled else "")
        )
        out += [
            "<tr>",
            _cell(r.device, cls=""),
            _cell(r.model, cls=""),
            _cell(online, cls="good" if r.online else "bad" if r.online is False else ""),
            _cell(age(None if r.last_seen is None else now - r.last_seen)),
            _cell(f"{r.bundle or '?'} {r.version}" if r.version else r.bundle, cls=""),
            _cell(r.runtime_label, cls=""),
            _cell(r.rps),
            _cell(r.p50_ms, ".2f"),
            _cell(r.p95_ms, ".2f"),
            _cell(r.p99_ms, ".2f"),
            _cell(r.rss_mb, ".0f"),
            _cell(r.cpu_percent),
            _cell(temp, cls="bad" if r.throttled else "num"),
            _cell(accepted, cls="bad" if r.acceptance_passed is False else ""),
            _cell(r.online_accuracy, ".2f"),
            _cell(r.last_deployment, cls="bad" if r.last_deployment_ok is False else ""),
            "</tr>",
        ]
    out.append("</table>")
    return "".join(out)


def _page(
    rows: list[StatusRow],
    heartbeat: dict[str, object] | None,
    sections: list[_Section],
    since: float,
    now: float,
) -> str:
    body = "".join(
        f'<h2>{html.escape(heading)}</h2><div class="charts">{"".join(charts)}</div>'
        + (f'<p class="note">{html.escape(note)}</p>' if note else "")
        for heading, charts, note in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Fleet report {_utc(now)}</title><style>{_CSS}</style></head><body>"
        f'<h1>Fleet report</h1><div class="meta">{_utc(since)} to {_utc(now)} · '
        f"{html.escape(summary(rows, heartbeat, now))}</div>"
        f"<h2>Status</h2>{_table(rows, now)}"
        '<p class="note">Percentiles merge the latency histograms of each slice of time (1% relative '
        "error); status percentiles cover each device's last 5 minutes of telemetry.</p>"
        f"{body}</body></html>\n"
    )
