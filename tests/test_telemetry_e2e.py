"""Three agents (real processes) on different fake hardware report telemetry through a real
Mosquitto to the collector; the database and the fleet status agree with what was served."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeagent.client import Client
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import Topics
from fleet.collector import Collector
from fleet.push import FleetConnection, Target, publish_desired, wait_for
from fleet.registry import Registry
from fleet.status import status_rows
from tests.runtimes_support import wait_for as until
from tests.test_deploy import Bundles
from tests.test_telemetry import jetson_root, persistent_broker, raspberry_pi_root

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

BIN = Path(sys.executable).parent
PREFIX = "tel"


@dataclass
class Device:
    name: str
    root: Path  # the fake hardware tree telemetry reads
    hottest_c: float | None
    throttled: bool | None
    requests: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root.parent / "agent.sock"


def start_agent(device: Device, broker: BrokerConfig, keys: Path) -> None:
    home = device.root.parent
    config = home / "agent.toml"
    config.write_text(
        f'device_id = "{device.name}"\n'
        f'state_dir = "{home / "state"}"\n'
        f'socket_path = "{device.socket}"\n'
        f'broker_url = "mqtt://{broker.host}:{broker.port}"\n'
        f'topic_prefix = "{PREFIX}"\n'
        f'trusted_keys = "{keys}"\n'
        'profile = "generic-x86_64"\n'
        'groups = ["lab"]\n'
        "telemetry_interval_s = 0.5\n"
        f'telemetry_root = "{device.root}"\n'
    )
    with (home / "agent.log").open("ab") as log:
        device.proc = subprocess.Popen(
            [str(BIN / "edgeagent"), "-v", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )


def stop_agent(device: Device) -> None:
    if device.proc is not None and device.proc.poll() is None:
        device.proc.terminate()
        try:
            device.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            device.proc.kill()
            device.proc.wait()


@pytest.fixture
def fleet(tmp_path: Path, mosquitto, model_dir: Path) -> Iterator[tuple[list[Device], Collector, Bundles]]:  # type: ignore[no-untyped-def]
    bundles = Bundles(tmp_path / "bundles", model_dir)
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    run = f"{os.getpid()}-{time.monotonic_ns() % 100000}"
    devices = [
        Device(
            f"pi-{run}",
            raspberry_pi_root(tmp_path / "pi" / "root", temp_milli=61234, throttled="0x50005"),
            61.2,
            True,
            7,
        ),
        Device(f"jetson-{run}", jetson_root(tmp_path / "jetson" / "root", cooling_state=1), 100.0, True, 13),
        Device(f"x86-{run}", tmp_path / "x86" / "root", None, None, 21),
    ]
    devices[2].root.mkdir(parents=True)  # no thermal zones, no throttling source
    registry = Registry(broker, bundles.registry, topics=Topics(PREFIX)).start()
    collector = Collector(
        broker, tmp_path / "fleet.db", topics=Topics(PREFIX), client_id=f"collector-{run}", persistent=False
    ).start()
    assert collector.wait_connected(10)
    for device in devices:
        start_agent(device, broker, bundles.keys)
    try:
        yield devices, collector, bundles
    finally:
        for device in devices:
            stop_agent(device)
        collector.stop()
        registry.close()


def served_and_labelled(device: Device, digits) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Send the device's requests one sample each, label every other one; (labelled, correct)."""
    x = digits.x_test.reshape(len(digits.x_test), -1).astype(np.float32)
    labelled = correct = 0
    with Client(device.socket, timeout_s=10) as client:
        for i in range(device.requests):
            prediction = client.predict(x[i : i + 1])
            if i % 2 == 0:
                label = int(digits.y_test[i])
                client.feedback(prediction.id, label)
                labelled += 1
                correct += int(prediction.output.argmax() == label)
    return labelled, correct


def test_three_agents_report_and_the_fleet_view_agrees(fleet, mosquitto, digits) -> None:  # type: ignore[no-untyped-def]
    devices, collector, bundles = fleet
    with FleetConnection(BrokerConfig(mosquitto.host, mosquitto.port), Topics(PREFIX), "tel-push") as conn:
        publish_desired(conn, Target("group", "lab"), "default", bundles.refs["v1"], bundles.key)
        results = wait_for(
            conn, [d.name for d in devices], "default", bundles.refs["v1"], 120, lambda _: None
        )
    assert all(r.ok for r in results), results
    expected = {d.name: served_and_labelled(d, digits) for d in devices}

    db = collector.db
    deadline = time.monotonic() + 30
    rows = []
    while time.monotonic() < deadline:
        collector.flush()
        rows = status_rows(db)
        by_device = {r.device: r for r in rows}
        if all(
            d.name in by_device and by_device[d.name].requests == d.requests and by_device[d.name].version
            for d in devices
        ):
            break
        time.sleep(0.3)
    by_device = {r.device: r for r in rows}
    for device in devices:
        row = by_device[device.name]
        labelled, correct = expected[device.name]
        assert row.online is True
        assert (row.bundle, row.version, row.runtime) == ("digits", "1.0.0", "onnxruntime")
        assert row.requests == device.requests, row
        assert row.p50_ms is not None and 0 < row.p50_ms <= row.p95_ms <= row.p99_ms  # type: ignore[operator]
        assert row.rss_mb is not None and row.rss_mb > 10
        assert row.temperature_c == device.hottest_c
        assert row.throttled == device.throttled
        assert row.power_mode == ("7W" if device.name.startswith("jetson") else None)  # nvpmodel mode 1
        assert row.acceptance_passed is True and row.acceptance_accuracy is not None
        assert row.online_accuracy == pytest.approx(correct / labelled, abs=1e-4)
        assert row.last_deployment is not None and "1.0.0" in row.last_deployment

    # The database holds what the agents sent: every request counted once, seqs unique.
    with sqlite3.connect(db) as conn_db:
        for device in devices:
            seqs = [
                s for (s,) in conn_db.execute("SELECT seq FROM telemetry WHERE device = ?", (device.name,))
            ]
            assert seqs and len(seqs) == len(set(seqs))
            ((served,),) = conn_db.execute(
                "SELECT SUM(count) FROM model_telemetry WHERE device = ? AND version = '1.0.0'",
                (device.name,),
            )
            assert served == device.requests

    # The CLI shows the same.
    out = subprocess.run(
        [str(BIN / "edgectl"), "fleet", "status", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = {r["device"]: r for r in json.loads(out)["rows"] if r["device"] in by_device}
    assert {name: r["requests"] for name, r in shown.items()} == {d.name: d.requests for d in devices}


def test_a_whole_agent_keeps_serving_through_a_broker_outage_and_loses_no_telemetry(  # type: ignore[no-untyped-def]
    tmp_path: Path, own_mosquitto, model_dir: Path, digits
) -> None:
    """The agent process, not just its reporter: the broker goes away for a few intervals while
    an application keeps predicting; after the restart the collector holds every message, in
    order, and every request served during the outage is counted exactly once."""
    persistent_broker(own_mosquitto)
    broker = BrokerConfig(own_mosquitto.broker.host, own_mosquitto.port)
    bundles = Bundles(tmp_path / "bundles", model_dir)
    run = f"{os.getpid()}-{time.monotonic_ns() % 100000}"
    device = Device(f"outage-{run}", tmp_path / "dev" / "root", None, None, 0)
    device.root.mkdir(parents=True)
    registry = Registry(broker, bundles.registry, topics=Topics(PREFIX)).start()
    db = tmp_path / "fleet.db"
    # Persistent, as `edgectl fleet collect` is by default: messages the agent flushes before
    # the collector has reconnected wait for it in the broker.
    collector = Collector(broker, db, topics=Topics(PREFIX), client_id=f"collector-{run}").start()
    start_agent(device, broker, bundles.keys)
    served = failed = 0
    stop = threading.Event()

    def predict_until_stopped() -> None:
        nonlocal served, failed
        x = digits.x_test.reshape(len(digits.x_test), -1).astype(np.float32)
        with Client(device.socket, timeout_s=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    client.predict(x[i % len(x) : i % len(x) + 1])
                    served += 1
                except Exception:  # any failure at all is what this test counts
                    failed += 1
                i += 1
                time.sleep(0.01)

    def telemetry_seqs() -> list[tuple[int, float, float]]:
        collector.flush()
        with sqlite3.connect(db) as conn_db:
            return conn_db.execute(
                "SELECT seq, at, received FROM telemetry WHERE device = ? ORDER BY rowid", (device.name,)
            ).fetchall()

    predictor = threading.Thread(target=predict_until_stopped)
    try:
        assert collector.wait_connected(10)
        with FleetConnection(broker, Topics(PREFIX), f"outage-push-{run}") as conn:
            publish_desired(conn, Target("device", device.name), "default", bundles.refs["v1"], bundles.key)
            results = wait_for(conn, [device.name], "default", bundles.refs["v1"], 120, lambda _: None)
        assert all(r.ok for r in results), results
        predictor.start()
        until(lambda: len(telemetry_seqs()) >= 3, 30, "the first telemetry")
        own_mosquitto.stop()
        outage_start = time.time()
        time.sleep(3.0)  # six telemetry intervals with nowhere to go
        outage_end = time.time()
        own_mosquitto.start()
        time.sleep(1.0)
        stop.set()
        predictor.join(timeout=20)
        assert served > 0 and failed == 0, f"{failed} of {served + failed} requests failed during the outage"

        def all_counted() -> bool:
            collector.flush()
            with sqlite3.connect(db) as conn_db:
                ((total,),) = conn_db.execute(
                    "SELECT COALESCE(SUM(count), 0) FROM model_telemetry"
                    " WHERE device = ? AND version = '1.0.0'",
                    (device.name,),
                )
            return bool(total == served)

        until(all_counted, 60, "every request counted")
    finally:
        stop.set()
        if predictor.is_alive():
            predictor.join(timeout=20)
        stop_agent(device)
        collector.stop()
        registry.close()

    rows = telemetry_seqs()
    seqs = [seq for seq, _, _ in rows]
    assert seqs == sorted(seqs), "arrived out of order"
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a message was lost"
    during = [(at, received) for _, at, received in rows if outage_start < at < outage_end]
    assert len(during) >= 4, during  # built while the broker was away...
    assert all(received >= outage_end for _, received in during)  # ...and delivered after it came back
    with sqlite3.connect(db) as conn_db:
        ((dropped,),) = conn_db.execute(
            "SELECT MAX(spool_dropped_total) FROM telemetry WHERE device = ?", (device.name,)
        )
    assert dropped == 0
