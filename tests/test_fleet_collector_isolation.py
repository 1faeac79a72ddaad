"""One hostile telemetry message never costs another device's data (issue 19, item 6).

A telemetry ``seq`` of 2**70 passed validation, SQLite raised OverflowError and the whole
batch (5 of 6 valid messages from other devices) was discarded without being counted."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from fleet_support import (
    TOPICS,
    FakeDevice,
    Publisher,
    ServedModel,
    start_collector,
    subscribed,
    wait_received,
)

from edgeagent.protocol import Topics
from fleet import fleetdb
from fleet.collector import Collector


def _model() -> ServedModel:
    return ServedModel("default", "digits", "1.0.0", "litert", "cpu", (2, 0.3))


def _devices(n: int) -> list[FakeDevice]:
    return [FakeDevice(f"dev-{i}", "rpi4", ["g"], [_model()]) for i in range(n)]


def _hostile(device: FakeDevice, **change: object) -> bytes:
    doc = json.loads(device.telemetry(1, time.time()).model_dump_json())
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", 2**70), ("seq", 2**63), ("spool", {"queued": 2**64, "dropped": 0, "dropped_total": 0})],
)
def test_an_out_of_bounds_integer_is_malformed_and_the_rest_of_its_batch_is_stored(
    mosquitto, tmp_path: Path, field: str, value: object
) -> None:  # type: ignore[no-untyped-def]
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    collector = start_collector(mosquitto, tmp_path / "fleet.db", topics)
    devices = _devices(6)
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            base = sum(collector.stats.received.values())
            # The hostile message in the middle of the others: with or without it in their batch.
            for i, dev in enumerate(devices):
                if i == 3:
                    pub.publish(topics.telemetry(dev.device), _hostile(dev, **{field: value}))
                else:
                    pub.send("telemetry", dev.telemetry(1, time.time()))
            wait_received(collector, base + 6)
        assert collector.stats.malformed == {"out_of_bounds": 1}
        assert collector.stats.stored["telemetry"] == 5
        assert collector.stats.store_failed == 0
        with sqlite3.connect(collector.db) as conn:
            stored = {r[0] for r in conn.execute("SELECT device FROM telemetry")}
        assert stored == {d.device for d in devices} - {"dev-3"}
    finally:
        collector.stop()


def test_a_message_the_database_refuses_costs_only_itself(tmp_path: Path) -> None:
    """Whatever else a database refuses (here a trigger that aborts one device's rows) is
    isolated the same way: the batch is retried message by message, the refused one counted."""
    db = tmp_path / "fleet.db"
    fleetdb.open_for_writing(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON telemetry WHEN NEW.device = 'dev-3' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    collector = Collector.__new__(Collector)  # the writer path only: no broker in this test
    Collector.__init__(collector, _NoBroker(), db, retention_s=None)
    try:
        now = time.time()
        items = [
            (
                "telemetry",
                TOPICS.telemetry(d.device),
                d.telemetry(1, now).model_dump_json().encode(),
                False,
                now,
            )
            for d in _devices(6)
        ]
        collector._store(items)
        assert collector.stats.stored["telemetry"] == 5
        assert collector.stats.malformed == {"unstorable": 1}
        assert collector.stats.store_failed == 0
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 5
    finally:
        collector.stop()


class _NoBroker:
    url = "mqtt://nowhere:1883"
