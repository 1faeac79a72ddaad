"""The converter's chart: accuracy against transfer size and latency, drawn without matplotlib
(an SVG from the plotter the fleet report uses), and a PNG where rsvg-convert is installed."""

from __future__ import annotations

import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from converter.api import convert
from converter.recipe import recipe_from_dict


def test_report_chart_without_matplotlib(tmp_path: Path, model_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it now fails
    recipe = recipe_from_dict(
        {
            "data": {"dataset": "digits"},
            "passes": [{"type": "prune", "sparsity": 0.7}],
            "evaluate": {"latency_runs": 20},
        }
    )
    result = convert(model_dir / "mlp.onnx", recipe, tmp_path / "out")
    svg = (tmp_path / "out" / "report.svg").read_text()
    ET.fromstring(svg)  # well-formed
    assert "transfer KiB (xz)" in svg and "p50 ms on this host" in svg
    assert "disk" not in svg
    # One labelled point per step and chart; the pruned model's point sits left of the source's
    # on the transfer axis (its file on disk is as large as before).
    titles = re.findall(r"<title>(\w+): ([\d.,]+), ([\d.,]+)</title>", svg)
    assert [t[0] for t in titles] == ["source", "prune", "source", "prune"]
    source_kib, pruned_kib = (float(t[1].replace(",", "")) for t in titles[:2])
    assert pruned_kib < source_kib
    assert result.pipeline.steps[0].after.size_bytes >= result.pipeline.baseline.size_bytes * 0.9
    png = tmp_path / "out" / "report.png"
    if shutil.which("rsvg-convert") is None:
        assert not png.exists() and png not in result.reports
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in result.reports


@pytest.mark.skipif(
    shutil.which("rsvg-convert") is None, reason="needs rsvg-convert (apt-get install librsvg2-bin)"
)
def test_png_is_rendered_from_the_svg(tmp_path: Path) -> None:
    from converter.report import svg_to_png
    from edgeagent.svgchart import side_by_side, xy_chart

    svg = tmp_path / "c.svg"
    svg.write_text(
        side_by_side(
            [xy_chart("t", [("a", 1.0, 90.0), ("b", 2.0, 95.0)], x_label="x", y_label="y")], 420, 280
        )
    )
    assert svg_to_png(svg, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "c.svg"]
