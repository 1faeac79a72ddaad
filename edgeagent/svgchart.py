"""Line charts as inline SVG: a self-contained HTML report needs no plotting library, no
script and no network, and the browser draws it at any zoom.

Shared by the fleet report and the converter's report (standard library only, so it lives in
the shared core that both may import).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_TIME_STEPS = (60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)


@dataclass
class Series:
    """One line: ``points`` are (Unix s, value); ``dashed`` draws it dashed (e.g. p50 next to p99)."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)
    color: str | None = None
    dashed: bool = False


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 5 x 10^k) up to at least ``high``."""
    if high <= 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _time_label(t: float, step: float) -> str:
    """``t`` (UTC) to the resolution of ``step`` s: no seconds for minute steps, no time for days."""
    fmt = "%m-%d" if step >= 86400 else "%H:%M" if step >= 60 else "%H:%M:%S"
    return time.strftime(fmt, time.gmtime(t))


def _time_ticks(t0: float, t1: float, resolution: float) -> tuple[list[float], float]:
    """Tick times and their step: round times at least ``resolution`` apart, at most 7 of them;
    a span too short for two round ticks gets its two ends."""
    steps = [s for s in _TIME_STEPS if s >= resolution] or [_TIME_STEPS[-1]]
    step = next((s for s in steps if (t1 - t0) / s <= 7), steps[-1])
    ticks = [float(t) for t in range(math.ceil(t0 / step) * step, int(t1) + 1, step)]
    if len(ticks) < 2:
        return [t0, t1], max(resolution, 1.0)
    return ticks, step


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def line_chart(
    title: str,
    series: list[Series],
    *,
    y_label: str,
    width: int = 640,
    height: int = 250,
    gap_s: float | None = None,
    slice_s: float | None = None,
    markers: Sequence[tuple[float, str]] = (),
) -> str:
    """An ``<svg>`` element: time on x (UTC), ``y_label`` on y from 0, a legend on the right.

    ``markers``: (time, label) drawn as labelled vertical lines where they fall on the axis
    (a fleet report marks rollouts starting and ending on the latency plots).

    Points further apart than ``gap_s`` are not joined, so an offline stretch shows as a gap.
    ``slice_s``: each point stands for a time slice of that many seconds centred on it (a
    report's buckets): the axis spans whole slices, its labels go no finer than a slice, and a
    lone point is drawn across its slice, so a short run is a line rather than a dot.
    """
    left, right, top, bottom = 56, 170, 28, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [p for s in series for p in s.points if math.isfinite(p[1])]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" class="title">{html.escape(title)}</text>',
    ]
    if not points:
        out.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="empty" '
            'text-anchor="middle">no data in this period</text></svg>'
        )
        return "".join(out)
    half = (slice_s or 0.0) / 2
    t0, t1 = min(p[0] for p in points) - half, max(p[0] for p in points) + half
    if t1 - t0 < 1:
        t0, t1 = t0 - 30, t1 + 30
    yticks = nice_ticks(max(p[1] for p in points) * 1.05)
    ymax = yticks[-1]

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / ymax * plot_h

    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>')
    for v in yticks:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>'
        )
    ticks, step = _time_ticks(t0, t1, slice_s or 1.0)
    for tick in ticks:
        out.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
            f'class="axis"/><text x="{x(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{_time_label(tick, step)}</text>"
        )
    out.append(
        f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
        f'<text x="{left + plot_w}" y="{height - 4}" text-anchor="end">time (UTC)</text>'
    )
    for at, label in markers:
        if t0 <= at <= t1:
            out.append(
                f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{top}" y2="{top + plot_h}" class="marker" '
                f'stroke="#888" stroke-dasharray="2 3"/><text x="{x(at) + 3:.1f}" y="{top + 10}" '
                f'class="marker">{html.escape(label)}</text>'
            )
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        out.append(f'<g class="series"><title>{html.escape(s.name)}</title>')
        for segment in _segments(sorted(s.points), gap_s):
            coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in segment)
            if len(segment) == 1 and half:
                ((t, v),) = segment
                out.append(
                    f'<line x1="{x(t - half):.1f}" x2="{x(t + half):.1f}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                    f'stroke="{color}" stroke-width="1.8"{dash}/>'
                )
            elif len(segment) == 1:
                out.append(
                    f'<circle cx="{x(segment[0][0]):.1f}" cy="{y(segment[0][1]):.1f}" r="2.5" '
                    f'fill="{color}"/>'
                )
            else:
                out.append(
                    f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"{dash}/>'
                )
        out.append("</g>")
        ly = top + 8 + i * 16
        if ly < height - 8:
            name = s.name if len(s.name) <= 26 else s.name[:25] + "…"
            out.append(
                f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 34}" y1="{ly}" y2="{ly}" '
                f'stroke="{color}" stroke-width="2.5"{dash}/>'
                f'<text x="{left + plot_w + 40}" y="{ly + 4}">{html.escape(name)}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def _segments(points: list[tuple[float, float]], gap_s: float | None) -> list[list[tuple[float, float]]]:
    segments: list[list[tuple[float, float]]] = []
    for t, v in points:
        if not math.isfinite(v):
            continue
        if segments and (gap_s is None or t - segments[-1][-1][0] <= gap_s):
            segments[-1].append((t, v))
        else:
            segments.append([(t, v)])
    return segments


#: Styles a chart needs when it is a file of its own rather than inline in a styled page.
STANDALONE_CSS = (
    "svg{font:11px system-ui,sans-serif;fill:#222} .title{font-size:13px;font-weight:600} "
    ".plot{fill:#fafafa;stroke:#ccc} .grid{stroke:#e4e4e4} .axis{stroke:#999} .empty{fill:#999}"
)


def _axis_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round ticks (1, 2, 5 x 10^k) covering ``low``..``high``; from 0 when ``low`` is near it."""
    if low > 0 and low < (high - low):  # a range that nearly reaches 0 reads better from 0
        low = 0.0
    span = high - low if high > low else abs(high) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step - 1e-9) + 1)]


def xy_chart(
    title: str,
    points: list[tuple[str, float, float]],
    *,
    x_label: str,
    y_label: str,
    width: int = 420,
    height: int = 280,
) -> str:
    """An ``<svg>`` of labelled points (label, x, y) joined in the given order (e.g. one per step)."""
    left, right, top, bottom = 56, 16, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" class="title">{html.escape(title)}</text>',
    ]
    if not points:
        out.append(f'<text x="{left}" y="{top + plot_h / 2}" class="empty">no data</text></svg>')
        return "".join(out)
    xticks = _axis_ticks(min(xs), max(xs) * 1.08 or 1.0)
    yticks = _axis_ticks(min(ys) - 0.02 * abs(min(ys)), max(ys) * 1.01 or 1.0)

    def x(v: float) -> float:
        return left + (v - xticks[0]) / (xticks[-1] - xticks[0]) * plot_w

    def y(v: float) -> float:
        return top + plot_h - (v - yticks[0]) / (yticks[-1] - yticks[0]) * plot_h

    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot"/>')
    for v in yticks:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>'
        )
    for v in xticks:
        tick = f'x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}"'
        out.append(
            f'<line {tick} class="axis"/>'
            f'<text x="{x(v):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_fmt(v)}</text>'
        )
    out.append(
        f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
        f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end">{html.escape(x_label)}</text>'
    )
    coords = " ".join(f"{x(a):.1f},{y(b):.1f}" for _, a, b in points)
    out.append(f'<polyline points="{coords}" fill="none" stroke="{PALETTE[0]}" stroke-width="1.5"/>')
    for label, a, b in points:
        out.append(
            f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="3" fill="{PALETTE[0]}"><title>{html.escape(label)}: '
            f"{_fmt(a)}, {_fmt(b)}</title></circle>"
            f'<text x="{x(a) + 5:.1f}" y="{y(b) - 5:.1f}">{html.escape(label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def side_by_side(charts: list[str], width: int, height: int) -> str:
    """One standalone SVG document holding ``charts`` (each ``width`` x ``height``) in a row."""
    total = width * len(charts)
    inner = "".join(f'<g transform="translate({i * width} 0)">{c}</g>' for i, c in enumerate(charts))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}" '
        f'viewBox="0 0 {total} {height}"><style>{STANDALONE_CSS}</style>'
        f'<rect width="{total}" height="{height}" fill="#fff"/>{inner}</svg>\n'
    )
