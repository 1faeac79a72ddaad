"""`edgectl fleet report`: a self-contained HTML page whose plots a real headless Chromium renders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fleet_support import three_devices

from edgeagent.cli.common import build_parser, run
from fleet import fleetdb
from fleet.edgectl import COMMANDS, DESCRIPTION
from fleet.report import build_report

INTERVALS = 40  # 40 intervals 3 minutes apart: two hours


def edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture(scope="module")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two hours of three devices; the x86 box moves from digits 1.0.0 to 1.1.0 halfway."""
    db = tmp_path_factory.mktemp("report") / "fleet.db"
    conn = fleetdb.open_for_writing(db)
    devices = three_devices()
    now = time.time()
    batch = fleetdb.Batch()
    for dev in devices:
        for i in range(INTERVALS):
            if dev.device == "x86-lab" and i == INTERVALS // 2:
                dev.models[0].version, dev.models[0].latency_ms = "1.1.0", (0.6, 0.3)
            at = now - (INTERVALS - 1 - i) * 180.0
            batch.telemetry.append((dev.telemetry(i + 1, at, interval_s=180.0), at))
        batch.reported.append((dev.device, dev.reported(), now, False))
    fleetdb.write_batch(conn, batch)
    conn.close()
    return db


def test_the_page_is_self_contained_with_a_chart_per_view(fleet_db: Path) -> None:
    report = build_report(fleet_db, since_s=3 * 3600)
    page = report.html
    assert report.devices == 3 and report.rows == 3 * INTERVALS + INTERVALS  # the Jetson has two models
    # No script, no fetched resource: it opens the same offline, attached to a ticket, years later.
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=|url\(|@import""", page)
    # Latency per device and per version for each of the three models, memory per device and per version.
    assert report.charts == 3 * 2 + 2 and page.count("<svg") == 8
    assert page.count("<polyline") >= 20
    shown = ("1.0.0 p99", "1.1.0 p99", "pi-kitchen p50", "jetson-yard", "71.5 throttled", "agent RSS")
    for text in (*shown, "TensorrtExecutionProvider @15W"):
        assert text in page


def test_the_cli_writes_the_report(fleet_db: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "fleet.html"
    assert edgectl("fleet", "report", "--db", fleet_db, "--html", out, "--since", "3h") == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "8 charts" in captured.out
    assert "reading latency" in captured.err  # progress goes to stderr
    assert out.read_text().startswith("<!DOCTYPE html>")


def chromium() -> str:
    found = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    return found


# Added to a copy of the page only: measures what the browser laid out.
MEASURE = """<script>
window.addEventListener('load', () => {
  const charts = [...document.querySelectorAll('svg.chart')].map(svg => {
    const r = svg.getBoundingClientRect();
    const lines = [...svg.querySelectorAll('polyline')].map(p => {
      const b = p.getBBox();
      return [b.width, b.height];
    });
    return {x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height, lines: lines};
  });
  const pre = document.createElement('pre');
  pre.id = 'measured';
  pre.textContent = JSON.stringify(charts);
  document.body.appendChild(pre);
});
</script></body>"""


def headless(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def test_chromium_renders_every_plot(fleet_db: Path, tmp_path: Path) -> None:
    browser = chromium()
    page = build_report(fleet_db, since_s=3 * 3600).html
    measured_page = tmp_path / "measured.html"
    measured_page.write_text(page.replace("</body>", MEASURE))
    dom = headless(browser, tmp_path, "--window-size=1400,1000", "--dump-dom", measured_page.as_uri()).stdout
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not finish loading in Chromium: {dom[:500]}"
    charts = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(charts) == 8
    for chart in charts:
        assert chart["w"] > 300 and chart["h"] > 150, chart
        assert chart["lines"], "a chart without lines"
        assert all(w > 100 for w, _ in chart["lines"]), chart["lines"]  # lines span the two hours

    # A screenshot of the page as saved (no script): the plot areas hold coloured lines.
    from PIL import Image

    html_file = tmp_path / "report.html"
    html_file.write_text(page)
    height = int(max(c["y"] + c["h"] for c in charts)) + 40
    shot = tmp_path / "shot.png"
    headless(browser, tmp_path, f"--window-size=1400,{height}", f"--screenshot={shot}", html_file.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for chart in charts:
        x, y = int(chart["x"]) + 60, int(chart["y"]) + 30  # inside the plot frame, past the axis labels
        area = pixels[y : y + int(chart["h"]) - 70, x : x + int(chart["w"]) - 240]
        colored = (area.max(axis=2) - area.min(axis=2)) > 60  # the palette; the frame and grid are grey
        assert colored.sum() > 200, f"no plotted pixels in the chart at {chart['x']:.0f},{chart['y']:.0f}"
