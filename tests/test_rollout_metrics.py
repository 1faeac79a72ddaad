"""Rollout metrics on the collector's Prometheus endpoint, read from the rollout tables of the
fleet database (SQLite and a real PostgreSQL), scraped over HTTP from a collector on a real
Mosquitto."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port
from fleet_support import start_collector
from test_fleet_prometheus import scrape, value

from edgeagent.protocol import BundleRef, Topics
from fleet import exporter
from fleet.rollout.model import DeviceState, RolloutSpec, RolloutState, Target
from fleet.rollout.store import RolloutStore, open_db

pytest.importorskip("prometheus_client")
pytest_plugins = ["postgres_support"]  # the postgres and pg_dsn fixtures

NEW = BundleRef(name="digits", version="1.1.0", sha256="b" * 64, size=1000)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_dsn"))
    return tmp_path / "fleet.db"


def _rollout(store: RolloutStore, rid: str, states: list[DeviceState], now: float) -> None:
    spec = RolloutSpec(bundle=NEW, target=Target(group="cams"), waves=["2", "100%"])
    devices = [(f"{rid}-d{i}", "rpi4", None) for i in range(len(states))]
    store.create(rid, spec, devices, [2, len(states)], now)
    for (device, _, _), state in zip(devices, states, strict=True):
        store.set_device(rid, device, state, at=now)


@pytest.mark.mosquitto
def test_rollout_progress_state_and_gate_figures_are_scraped(mosquitto, target: str | Path) -> None:  # type: ignore[no-untyped-def]
    collector = start_collector(mosquitto, target, Topics(f"p{uuid.uuid4().hex[:8]}"))  # type: ignore[arg-type]
    port = free_port()
    server = exporter.serve(collector, f"127.0.0.1:{port}")
    store = RolloutStore(open_db(target))
    try:
        s = scrape(port)
        assert not [n for n in s if n.startswith("edge_rollout_")]  # no rollout yet: no series
        now = time.time()
        d = DeviceState
        _rollout(store, "canary", [d.COMMITTED, d.COMMITTED, d.COMMITTED, d.PUSHED, d.FAILED, d.PENDING], now)
        assert store.set_state("canary", {RolloutState.CREATED}, RolloutState.RUNNING, now)
        assert store.acquire("canary", "c1", now, 30)
        assert store.set_progress("canary", "c1", 1, None, {"p99_ratio": 1.04, "rss_growth": 0.02}, now)
        # Finished long ago: not exported (the series of a rollout end with its retention).
        _rollout(store, "old", [d.COMMITTED], now - 3 * 86400)
        store.db.execute("UPDATE rollouts SET state = 'completed', updated_at = ? WHERE id = 'old'",
                         (now - 3 * 86400,))  # fmt: skip
        _rollout(store, "stopped", [d.ROLLED_BACK, d.ROLLED_BACK, d.PENDING], now)
        assert store.set_state("stopped", {RolloutState.CREATED}, RolloutState.ABORTED, now, "p99 1.3x")

        s = scrape(port)
        counts = {st.value: value(s, "edge_rollout_devices", rollout="canary", state=st.value) for st in d}
        assert counts == {"pending": 1, "pushed": 1, "committed": 3, "failed": 1, "rolled_back": 0}
        assert value(s, "edge_rollout_devices", rollout="stopped", state="rolled_back") == 2
        assert value(s, "edge_rollout_wave", rollout="canary") == 2  # 1-based, as the progress line
        assert value(s, "edge_rollout_waves", rollout="canary") == 2
        info = {(lbl["rollout"], lbl["state"], lbl["version"]) for lbl, _ in s["edge_rollout_state_info"]}
        assert info == {("canary", "running", "1.1.0"), ("stopped", "aborted", "1.1.0")}
        assert value(s, "edge_rollout_p99_ratio", rollout="canary") == pytest.approx(1.04)
        assert value(s, "edge_rollout_rss_growth_ratio", rollout="canary") == pytest.approx(0.02)
        assert "stopped" not in {lbl["rollout"] for lbl, _ in s.get("edge_rollout_p99_ratio", [])}
        assert "old" not in {lbl["rollout"] for rows in s.values() for lbl, _ in rows if "rollout" in lbl}
        assert {n for n in s if n.startswith("edge_rollout_")} <= set(exporter.METRIC_NAMES)
    finally:
        store.db.close()
        server.shutdown()
        collector.stop()
