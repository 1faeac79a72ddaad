"""Rollouts end to end: a real Mosquitto, the registry, the collector, four real agent processes
(ONNX Runtime, LiteRT), and ``edgectl rollout`` as the operator runs it; the fleet database is a
SQLite file, then a real PostgreSQL server (the same tests).

The tests share the fleet and run in file order: a first rollout installs 1.0.0 everywhere,
a bundle whose acceptance cannot pass is aborted and rolled back after its first wave, and
1.1.0 is rolled out by a controller that is killed, paused, restarted and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import DesiredState, Topics, open_envelope
from edgeagent.signing import KeyRing
from fleet import fleetdb
from fleet.collector import Collector
from fleet.registry import Registry
from fleet.rollout import create as creating
from fleet.rollout.controller import Controller
from fleet.rollout.model import DeviceState, RolloutSpec, RolloutState, Target
from fleet.rollout.publisher import Publisher, connect
from fleet.rollout.store import RolloutStore, open_db
from tests.runtimes_support import wait_for as until
from tests.test_deploy import Bundles

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
pytest_plugins = ["postgres_support"]  # the postgres fixture

BIN = Path(sys.executable).parent
GROUP = "rollgrp"


@dataclass
class Fleet:
    root: Path
    broker: BrokerConfig
    bundles: Bundles
    devices: list[str]
    db: str | Path  # a SQLite file or a postgresql:// DSN
    prefix: str  # a topic prefix per backend: the other's devices left retained states behind

    def edgectl(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(BIN / "edgectl"), *argv, "--db", str(self.db)], capture_output=True, text=True, timeout=300
        )
        if check and done.returncode != 0:
            raise AssertionError(f"edgectl {' '.join(argv)}: {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def run_args(self, rollout_id: str) -> list[str]:
        return [str(BIN / "edgectl"), "rollout", "run", rollout_id, "--broker", self.broker.url, "--key",
                str(self.bundles.keys / "release.key"), "--prefix", self.prefix, "--poll", "0.5",
                "--lease", "3", "--db", str(self.db)]  # fmt: skip

    def reported(self) -> dict[str, Any]:
        conn = fleetdb.open_for_reading(self.db)
        try:
            return {
                r["device"]: json.loads(r["models"] or "{}") for r in conn.execute("SELECT * FROM devices")
            }
        finally:
            conn.close()

    def active(self, device: str) -> str | None:
        model = self.reported().get(device, {}).get("default") or {}
        return (model.get("bundle") or {}).get("version") if model.get("state") == "idle" else None


def _agent(root: Path, name: str, broker: BrokerConfig, keys: Path, prefix: str) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True)
    config = root / "agent.toml"
    config.write_text(
        f'device_id = "{name}"\nstate_dir = "{root / "state"}"\nsocket_path = "{root / "agent.sock"}"\n'
        f'broker_url = "mqtt://{broker.host}:{broker.port}"\ntopic_prefix = "{prefix}"\n'
        f'trusted_keys = "{keys}"\nprofile = "generic-x86_64"\ngroups = ["{GROUP}"]\n'
        "telemetry_interval_s = 1\ntransfer_block_kib = 16\n"
    )
    with (root / "agent.log").open("ab") as log:
        return subprocess.Popen([str(BIN / "edgeagent"), "run", "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request, tmp_path_factory, mosquitto, model_dir: Path) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("rollout")
    bundles = Bundles(root / "bundles", model_dir)
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    run = f"{os.getpid()}-{time.monotonic_ns() % 100000}"
    devices = [f"r{i}-{run}" for i in range(4)]
    prefix = f"roll{request.param[:2]}"
    registry = Registry(broker, bundles.registry, topics=Topics(prefix)).start()
    db: str | Path = root / "fleet.db"
    if request.param == "postgresql":
        db = request.getfixturevalue("postgres").create_database()  # skipped, with why, where it cannot start
    collector = Collector(broker, db, topics=Topics(prefix), client_id=f"collector-{run}", persistent=False)
    collector.start()
    assert collector.wait_connected(10)
    agents = [_agent(root / d, d, broker, bundles.keys, prefix) for d in devices]
    fleet = Fleet(root, broker, bundles, devices, db, prefix)
    try:
        until(lambda: set(devices) <= set(fleet.reported()), 60, "every agent reported its state")
        yield fleet
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(20)
        collector.stop()
        registry.close()


def test_a_rollout_to_a_group_completes(fleet: Fleet) -> None:
    db = open_db(fleet.db)
    spec = RolloutSpec(
        bundle=fleet.bundles.refs["v1"], target=Target(group=GROUP), waves=["1", "100%"], soak_s=1
    )
    rid = creating.create(db, spec, time.time(), "first")
    conn, floors = connect(fleet.broker, Topics(fleet.prefix))
    try:
        ctl = Controller(RolloutStore(db), rid, Publisher(conn, fleet.bundles.key, "default", floors),
                         time.time, owner="test")  # fmt: skip
        assert ctl.run(poll_s=0.3) is RolloutState.COMPLETED
    finally:
        conn.__exit__(None, None, None)
    assert {d.state for d in RolloutStore(db).devices(rid)} == {DeviceState.COMMITTED}
    until(lambda: all(fleet.active(d) == "1.0.0" for d in fleet.devices), 30, "every device reports 1.0.0")


def test_failing_acceptance_aborts_after_the_first_wave_and_rolls_back(fleet: Fleet) -> None:
    bad = fleet.bundles.registry / "digits-1.2.0.bundle"
    created = fleet.edgectl(
        "rollout", "create", str(bad), "--group", GROUP, "--waves", "1,50%,100%", "--soak", "1s",
        "--key", str(fleet.bundles.keys / "release.key"), "--registry", str(fleet.bundles.registry),
        "--id", "bad", "--json",
    )  # fmt: skip
    assert json.loads(created.stdout)["wave_ends"] == [1, 2, 4]
    done = subprocess.run(fleet.run_args("bad"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stdout + done.stderr
    status = json.loads(fleet.edgectl("rollout", "status", "bad", "--devices", "--json").stdout)
    assert status["state"] == "aborted"
    assert "failed on-device acceptance" in status["reason"]
    states = {d["device"]: d["state"] for d in status["devices"]}
    first, *rest = fleet.devices
    assert states[first] == "rolled_back" and {states[d] for d in rest} == {"pending"}
    # The rolled-back device's own document now names 1.0.0 with the downgrade permission.
    conn, _ = connect(fleet.broker, Topics(fleet.prefix))
    topic = Topics(fleet.prefix).device_desired_model(first, "default")
    try:
        payload = conn.retained(topic)[topic]
    finally:
        conn.__exit__(None, None, None)
    doc = DesiredState.model_validate(
        open_envelope(payload, KeyRing([fleet.bundles.key.private.public_key()])).payload
    )
    assert doc.rollback and doc.models["default"] == fleet.bundles.refs["v1"]
    until(lambda: all(fleet.active(d) == "1.0.0" for d in fleet.devices), 30, "every device still on 1.0.0")


def test_pause_kill_restart_resume(fleet: Fleet) -> None:
    v2 = fleet.bundles.registry / "digits-1.1.0.bundle"
    fleet.edgectl(
        "rollout", "create", str(v2), "--group", GROUP, "--waves", "1,100%", "--soak", "15s", "--id", "v2",
        "--key", str(fleet.bundles.keys / "release.key"), "--registry", str(fleet.bundles.registry),
        "--max-p99-ratio", "off",  # 1.1.0 is int8 LiteRT: a different runtime, not a regression
    )  # fmt: skip
    runner = subprocess.Popen(
        fleet.run_args("v2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    store = RolloutStore(open_db(fleet.db))

    def first_committed() -> bool:
        return store.devices("v2")[0].state is DeviceState.COMMITTED

    until(first_committed, 120, "the first wave committed")
    # Paused well within the 15 s soak of wave 1: wave 2 has not started.
    fleet.edgectl("rollout", "pause", "v2")
    killed = store.get("v2").lease_owner
    # A second controller is refused while the first holds the lease.
    second = subprocess.run(fleet.run_args("v2"), capture_output=True, text=True, timeout=60)
    assert second.returncode != 0 and "driven by" in second.stderr
    runner.send_signal(signal.SIGKILL)  # no chance to release the lease
    runner.wait(10)
    # A dead controller's lease blocks a successor until it expires (3 s here, --lease).
    until(
        lambda: (store.get("v2").lease_expires or 0) < time.time(), 30, "the dead controller's lease expired"
    )
    restarted = subprocess.Popen(
        fleet.run_args("v2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        until(
            lambda: store.get("v2").lease_owner not in (None, killed), 30, "a new controller took the lease"
        )
        # Past the soak of wave 1 plus a few ticks: a running rollout would have started wave 2.
        soak_until = store.get("v2").soak_until
        assert soak_until is not None
        until(lambda: time.time() > soak_until + 3, 60, "the soak of wave 1 passed")
        assert store.get("v2").state is RolloutState.PAUSED
        assert [d.state for d in store.devices("v2")[1:]] == [DeviceState.PENDING] * 3
        fleet.edgectl("rollout", "resume", "v2")
        out, _ = restarted.communicate(timeout=240)
    finally:
        if restarted.poll() is None:
            restarted.kill()
    assert restarted.returncode == 0, out
    assert "4/4 committed" in out
    until(lambda: all(fleet.active(d) == "1.1.0" for d in fleet.devices), 30, "every device reports 1.1.0")
    history = fleet.edgectl("fleet", "history", "--json").stdout
    rows = json.loads(history)
    assert {r["device"] for r in rows if r["rollout"] == "v2" and not r["rollback"]} == set(fleet.devices)
    assert any(r["rollback"] and r["rollout"] == "bad" for r in rows)
