"""`edgectl demo` runs the whole loop: convert, push, deploy, serve, report (real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_runs_end_to_end(broker: str, tmp_path: Path) -> None:
    if broker == "mosquitto":
        from tests.conftest import mosquitto_binary

        if mosquitto_binary() is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [str(BIN / "edgectl"), "demo", "--broker", broker, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "committed; acceptance: accuracy" in out
    correct = int(out.split("20 test digits: ")[1].split("/")[0])
    assert correct >= 17
    assert "last deployment: 1.0.0 ok (committed)" in out
    # The collector stored the device's telemetry: the 20 requests and their 20 labels.
    fleet_line = next(line for line in out.splitlines() if line.startswith("demo-device: 2"))
    assert fleet_line.startswith("demo-device: 20 requests, p50 "), fleet_line
    assert f"online accuracy {round(correct / 20, 4)}" in fleet_line
    assert (workdir / "fleet.db").exists()
    assert (workdir / "convert" / "report.md").exists()
    # Everything it started is stopped: the agent process is gone, its socket removed.
    assert not (workdir / "agent.sock").exists()
