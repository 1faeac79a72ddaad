"""The fleet simulator at a small N (bench/fleet_sim.py): real Mosquitto, registry and collector
processes, simulated devices on the agent's protocol code, the rollout controller.

5% of the devices fail acceptance: the rollout aborts in the first wave that holds one of them
and every device it touched is rolled back; a device class 30% slower on the new version stops
the rollout on the p99 gate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fleet_sim import device_specs, run_one

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def test_acceptance_failures_abort_in_their_first_wave_and_roll_back() -> None:
    n = 60
    assert any(s.fail for s in device_specs(n, "fail5")), "the seed must give the scenario failing devices"
    result = run_one("fail5", n, workers=2, telemetry_s=1.0, keep=False)
    assert result.state == "aborted" and "failed on-device acceptance" in (result.reason or "")
    assert result.abort_wave == result.first_bad_wave
    assert result.committed == 0 and result.rolled_back + result.pending == n and result.rolled_back > 0


def test_a_slower_class_stops_the_rollout_on_the_p99_gate() -> None:
    result = run_one("slow30", 30, workers=2, telemetry_s=1.0, keep=False)
    reason = result.reason or ""
    assert result.state == "aborted" and "p99 latency" in reason and "sim-b" in reason
    assert result.pending > 0  # the last wave never started


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [("accuracy", "online accuracy"), ("rss", "agent RSS"), ("throttle", "started throttling")],
)
def test_each_kpi_gate_stops_a_regressing_rollout(scenario: str, reason: str) -> None:
    result = run_one(scenario, 12, workers=1, telemetry_s=1.0, keep=False)
    assert result.state == "aborted" and reason in (result.reason or ""), result.reason
    assert result.pending > 0 and result.committed == 0
