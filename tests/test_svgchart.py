"""The report's time axis: labels at the resolution of a slice, points at slice centres, a short
run drawn as a line (fleet report; the converter's chart uses the same plotter)."""

from __future__ import annotations

import re

from edgeagent.svgchart import Series, line_chart

SLICE = 720.0  # a 24 h report in 120 slices
START = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def _labels(svg: str) -> list[str]:
    return [t for t in re.findall(r'text-anchor="middle">([^<]+)</text>', svg) if t != "ms"]


def test_a_single_slice_is_a_line_across_the_slice_labelled_to_the_minute() -> None:
    mid = START + 5 * SLICE + SLICE / 2  # the centre of the 01:00-01:12 slice
    svg = line_chart("p99", [Series("rpi4", [(mid, 3.0)])], y_label="ms", slice_s=SLICE, gap_s=3 * SLICE)
    assert "<circle" not in svg
    line = re.search(r'<line x1="([\d.]+)" x2="([\d.]+)" y1="([\d.]+)" y2="\3" stroke="#', svg)
    assert line is not None
    plot = re.search(r'<rect x="(\d+)" y="\d+" width="(\d+)"', svg)
    assert plot is not None
    left, width = float(plot.group(1)), float(plot.group(2))
    assert (float(line.group(1)), float(line.group(2))) == (left, left + width)  # the whole slice
    assert _labels(svg) == ["01:00", "01:12"]  # the slice's ends, not 01:05:59/01:06:59


def test_slice_centres_are_labelled_no_finer_than_a_slice() -> None:
    points = [(START + (i + 0.5) * SLICE, float(i)) for i in range(30)]  # 6 hours
    svg = line_chart("p99", [Series("rpi4", points)], y_label="ms", slice_s=SLICE, gap_s=3 * SLICE)
    labels = _labels(svg)
    assert labels and all(re.fullmatch(r"\d\d:\d\d", label) for label in labels), labels
    assert "00:00" in labels  # the axis starts where the first slice starts
    assert len(re.findall(r"<polyline", svg)) == 1


def test_without_slices_a_lone_point_is_still_a_dot() -> None:
    svg = line_chart("x", [Series("a", [(START, 1.0)])], y_label="ms")
    assert "<circle" in svg
