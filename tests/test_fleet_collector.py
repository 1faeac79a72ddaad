"""The collector against a real Mosquitto: what three fake devices send ends up in the database
and in `edgectl fleet status`; malformed messages, duplicates, retention, restarts."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fleet_support import (
    FakeDevice,
    Publisher,
    outcome_event,
    publish_history,
    start_collector,
    subscribed,
    three_devices,
    wait_received,
)

from edgeagent.cli.common import build_parser, run
from edgeagent.errors import UsageError
from edgeagent.protocol import Topics
from fleet import fleetdb
from fleet.collector import Collector, CollectorState
from fleet.edgectl import COMMANDS, DESCRIPTION
from fleet.status import status_rows

pytestmark = pytest.mark.mosquitto


def edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture
def topics() -> Topics:
    # The session's broker is shared and keeps retained states: each test gets its own prefix.
    return Topics(f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def collector(mosquitto, tmp_path: Path, topics: Topics) -> Iterator[Collector]:
    c = start_collector(mosquitto, tmp_path / "fleet.db", topics)
    yield c
    c.stop()


def db_count(db: Path, sql: str, *args: object) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql, args).fetchone()[0])


def test_three_devices_the_database_and_status_agree_with_what_was_sent(
    mosquitto, collector: Collector, topics: Topics, capsys
) -> None:  # type: ignore[no-untyped-def]
    devices = three_devices()
    with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
        subscribed(collector, pub, topics)
        base = sum(collector.stats.received.values())
        publish_history(pub, devices, intervals=6, end=time.time())
        pub.send("events", outcome_event("pi-kitchen", "default", "digits", "1.1.0", True, "committed"))
        pub.send("events", outcome_event("x86-lab", "default", "digits", "1.2.0", False, "acceptance_failed"))
        wait_received(collector, base + 3 + 18 + 2)
    db = collector.db
    assert db_count(db, "SELECT count(*) FROM telemetry") == 18
    assert db_count(db, "SELECT count(*) FROM model_telemetry") == 24  # the Jetson serves two models
    assert db_count(db, "SELECT count(*) FROM devices WHERE device != 'probe'") == 3
    assert db_count(db, "SELECT count(*) FROM events WHERE device != 'probe'") == 2
    assert collector.stats.malformed == {} and collector.stats.dropped == 0

    assert edgectl("fleet", "status", "--db", db, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {(r["device"], r["model"]): r for r in doc["rows"] if r["device"] != "probe"}
    assert set(rows) == {("pi-kitchen", "default"), ("jetson-yard", "detector"),
                         ("jetson-yard", "classifier"), ("x86-lab", "default")}  # fmt: skip
    assert doc["collector"]["connected"] is True  # its heartbeat (written every 5 s)
    for dev in devices:
        for m in dev.models:
            row = rows[(dev.device, m.model)]
            assert row["online"] is True and row["groups"] == dev.groups and row["profile"] == dev.profile
            assert (row["bundle"], row["version"]) == (m.bundle, m.version)
            assert (row["runtime"], row["delegate"], row["state"]) == (m.runtime, m.delegate, "committed")
            assert row["requests"] == 6 * 200 and row["errors"] == 6
            assert row["rps"] == pytest.approx(20.0)
            assert row["rss_mb"] == dev.rss_mb + 6 * 0.5  # the newest message's
            assert row["cpu_percent"] == dev.cpu_percent
            assert row["acceptance_passed"] is m.passed and row["acceptance_accuracy"] == m.accuracy
            assert row["online_accuracy"] == 0.9 and row["drift"] == 0.05
            assert time.time() - row["last_seen"] < 30
            # Percentiles come from the merged histograms: within the sketch's 1% of the exact
            # percentile of every latency the device measured (plus rank rounding).
            samples = np.array(dev.samples[m.model])
            assert len(samples) == 6 * 200
            for q, key in ((50, "p50_ms"), (95, "p95_ms"), (99, "p99_ms")):
                assert row[key] == pytest.approx(np.percentile(samples, q), rel=0.02), (dev.device, key)
    pi, jetson, x86 = (
        rows[("pi-kitchen", "default")],
        rows[("jetson-yard", "detector")],
        rows[("x86-lab", "default")],
    )
    assert (pi["temperature_c"], pi["temperature_zone"], pi["throttled"]) == (71.5, "cpu-thermal", True)
    assert (jetson["temperature_c"], jetson["temperature_zone"], jetson["throttled"]) == (
        55.5,
        "GPU-therm",
        False,
    )
    assert (x86["temperature_c"], x86["throttled"]) == (None, None)
    assert (jetson["power_mode"], pi["power_mode"], x86["power_mode"]) == ("15W", None, None)
    assert (pi["last_deployment"], pi["last_deployment_ok"]) == ("committed 1.1.0", True)
    assert (x86["last_deployment"], x86["last_deployment_ok"]) == ("failed acceptance_failed 1.2.0", False)
    assert jetson["last_deployment"] is None

    assert edgectl("fleet", "status", "--db", db, "--group", "canary", "--json") == 0
    assert {r["device"] for r in json.loads(capsys.readouterr().out)["rows"]} == {"pi-kitchen", "x86-lab"}
    assert edgectl("fleet", "status", "--db", db, "--bundle", "digits@1.1.0", "--json") == 0
    picked = {(r["device"], r["model"]) for r in json.loads(capsys.readouterr().out)["rows"]}
    assert picked == {("pi-kitchen", "default"), ("jetson-yard", "classifier")}
    assert edgectl("fleet", "status", "--db", db, "--wide") == 0  # the default view: test_fleet_status_width
    table = capsys.readouterr().out
    # 4 devices: the three and the probe subscribed() sent, which has no reported state.
    for text in (
        "pi-kitchen",
        "jetson-yard",
        "x86-lab",
        "throttled",
        "@15W",
        "failed acceptance_failed",
        "4 devices, 3 online",
    ):
        assert text in table


def test_malformed_messages_are_counted_and_do_not_stop_it(
    mosquitto, tmp_path: Path, topics: Topics, caplog
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="fleet.collector")
    collector = start_collector(mosquitto, tmp_path / "fleet.db", topics, max_message_bytes=8192)
    pi, jetson, _ = three_devices()
    good = pi.telemetry(1, time.time())
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            base = sum(collector.stats.received.values())
            bad = [
                (topics.telemetry("pi-kitchen"), b"not json {"),
                (topics.telemetry("pi-kitchen"), b""),
                (topics.telemetry("pi-kitchen"), b'{"v": 1, "device": "pi-kitchen"}'),
                (topics.events("pi-kitchen"), b'{"v": 1, "device": "pi-kitchen", "kind": "party"}'),
                (topics.telemetry("jetson-yard"), good.model_dump_json().encode()),  # pi's message
                (topics.reported("x86-lab"), jetson.reported().model_dump_json().encode()),
                (topics.telemetry("pi-kitchen"), b'{"padding": "' + b"x" * 9000 + b'"}'),
            ]
            for topic, payload in bad:
                pub.publish(topic, payload)
            pub.send("telemetry", good)
            wait_received(collector, base + len(bad) + 1)
        assert collector.stats.malformed == {"not_json": 2, "schema": 2, "device_mismatch": 2, "oversize": 1}
        assert collector.state is CollectorState.RUNNING and collector.connected
        assert collector.stats.stored["telemetry"] == 1
        assert db_count(collector.db, "SELECT count(*) FROM telemetry WHERE device = 'pi-kitchen'") == 1
        assert db_count(collector.db, "SELECT count(*) FROM devices WHERE device = 'x86-lab'") == 0
        # Logged, but rate-limited: not one line per bad message.
        warnings = [r for r in caplog.records if r.name == "fleet.collector"]
        assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    finally:
        collector.stop()


def test_duplicates_are_stored_once(mosquitto, collector: Collector, topics: Topics) -> None:  # type: ignore[no-untyped-def]
    pi = three_devices()[0]
    telemetry = pi.telemetry(7, time.time())
    event = outcome_event("pi-kitchen", "default", "digits", "1.1.0", True, "committed")
    with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
        subscribed(collector, pub, topics)
        base = sum(collector.stats.received.values())
        for _ in range(3):  # a QoS 1 redelivery, then a spool re-send after a lost PUBACK
            pub.send("telemetry", telemetry)
            pub.send("events", event)
        wait_received(collector, base + 6)
    assert db_count(collector.db, "SELECT count(*) FROM telemetry WHERE device = 'pi-kitchen'") == 1
    assert db_count(collector.db, "SELECT count(*) FROM model_telemetry WHERE device = 'pi-kitchen'") == 1
    assert db_count(collector.db, "SELECT count(*) FROM events WHERE device = 'pi-kitchen'") == 1
    assert collector.stats.duplicates == 4
    assert collector.stats.stored["telemetry"] == 1


def test_retention_deletes_old_telemetry_and_events(mosquitto, tmp_path: Path, topics: Topics) -> None:  # type: ignore[no-untyped-def]
    collector = start_collector(mosquitto, tmp_path / "fleet.db", topics, retention_s=1.0)
    pi = three_devices()[0]
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            base = sum(collector.stats.received.values())
            pub.send("telemetry", pi.telemetry(1, time.time()))
            pub.send("events", outcome_event("pi-kitchen", "default", "digits", "1.1.0", True, "committed"))
            wait_received(collector, base + 2)
            assert db_count(collector.db, "SELECT count(*) FROM telemetry") == 1
            deadline = time.monotonic() + 6
            while db_count(collector.db, "SELECT count(*) FROM telemetry") > 0:
                assert time.monotonic() < deadline, "retention never deleted the old telemetry"
                time.sleep(0.2)
            assert db_count(collector.db, "SELECT count(*) FROM model_telemetry") == 0
            assert db_count(collector.db, "SELECT count(*) FROM events WHERE device = 'pi-kitchen'") == 0
            pub.send("telemetry", pi.telemetry(2, time.time()))
            wait_received(collector, base + 3)
            assert db_count(collector.db, "SELECT count(*) FROM telemetry") == 1  # new rows stay
        assert collector.stats.retention_deleted >= 3
    finally:
        collector.stop()


def test_retention_deletes_in_chunks(tmp_path: Path) -> None:
    conn = fleetdb.open_for_writing(tmp_path / "fleet.db")
    dev = three_devices()[1]
    batch = fleetdb.Batch(telemetry=[(dev.telemetry(i, 1000.0 + i), 1000.0 + i) for i in range(1, 12)])
    fleetdb.write_batch(conn, batch)
    # 11 telemetry rows and 22 model rows received at 1001..1011; keep what came at 1006 or later.
    assert fleetdb.delete_older_than(conn, 1006.0, chunk=4) == 5 + 10
    assert conn.execute("SELECT min(seq), count(*) FROM telemetry").fetchone() == (6, 6)
    conn.close()


def test_a_schema_1_database_is_read_as_it_is_and_migrated_by_the_writer(tmp_path: Path) -> None:
    # A schema 1 database is a schema 2 one without the power_mode column (appended in 2).
    path = tmp_path / "fleet.db"
    jetson = three_devices()[1]
    conn = fleetdb.open_for_writing(path)
    fleetdb.write_batch(conn, fleetdb.Batch(telemetry=[(jetson.telemetry(1, 1000.0), 1000.0)]))
    fleetdb.write_batch(conn, fleetdb.Batch(reported=[("jetson-yard", jetson.reported(), 1000.0, True)]))
    conn.execute("ALTER TABLE telemetry DROP COLUMN power_mode")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()

    # The views read it as it is (no power mode to show yet) ...
    assert {r.power_mode for r in status_rows(path)} == {None}
    # ... and the collector's writer brings it to schema 2, keeping every row.
    conn = fleetdb.open_for_writing(path)
    fleetdb.write_batch(conn, fleetdb.Batch(telemetry=[(jetson.telemetry(2, 1010.0), 1010.0)]))
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    assert conn.execute("SELECT seq, power_mode IS NULL FROM telemetry ORDER BY seq").fetchall() == [
        (1, 1),
        (2, 0),
    ]
    conn.close()
    assert {r.power_mode for r in status_rows(path)} == {"15W"}

    # A database from a newer edgectl is refused with the reason, by writer and views alike.
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(UsageError, match="schema 3, this edgectl knows 2"):
        fleetdb.open_for_writing(path)
    with pytest.raises(UsageError, match="a newer edgectl made it"):
        fleetdb.open_for_reading(path)


def test_a_restart_with_the_persistent_session_loses_nothing(
    mosquitto, tmp_path: Path, topics: Topics
) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "fleet.db"
    client_id = f"collector-{uuid.uuid4().hex[:6]}"
    first = start_collector(mosquitto, db, topics, client_id=client_id)
    device = FakeDevice("pi-steady", "rpi4", ["g"], [])
    total = 400
    payloads = [device.telemetry(seq, time.time()).model_dump_json() for seq in range(1, total + 1)]
    with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
        subscribed(first, pub, topics)

        def send_all() -> None:
            for payload in payloads:  # about 4 s at a steady pace, across the restart
                pub.publish(topics.telemetry("pi-steady"), payload)
                time.sleep(0.01)

        sender = threading.Thread(target=send_all)
        sender.start()
        time.sleep(0.8)
        first.stop()
        assert 0 < first.stats.stored["telemetry"] < total
        time.sleep(0.8)  # messages sent now wait at the broker for the session
        second = start_collector(mosquitto, db, topics, client_id=client_id)
        try:
            sender.join()
            deadline = time.monotonic() + 10
            while db_count(db, "SELECT count(*) FROM telemetry WHERE device = 'pi-steady'") < total:
                assert time.monotonic() < deadline, "messages were lost across the restart"
                time.sleep(0.05)
            assert second.flush()
        finally:
            second.stop()
    assert db_count(db, "SELECT count(DISTINCT seq) FROM telemetry WHERE device = 'pi-steady'") == total
    assert first.stats.stored["telemetry"] + second.stats.stored["telemetry"] == total


def test_it_keeps_collecting_across_a_broker_restart(own_mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    topics = Topics()
    collector = start_collector(own_mosquitto.broker, tmp_path / "fleet.db", topics, client_id="c-outage")
    pi = three_devices()[0]
    try:
        with Publisher(own_mosquitto.broker.host, own_mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            pub.send("telemetry", pi.telemetry(1, time.time()))
        own_mosquitto.stop()
        time.sleep(0.5)
        own_mosquitto.start()  # persistence false: the broker forgot the session; the collector resubscribes
        assert collector.wait_connected(15)
        with Publisher(own_mosquitto.broker.host, own_mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            pub.send("telemetry", pi.telemetry(2, time.time()))
            deadline = time.monotonic() + 10
            while collector.stats.stored["telemetry"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        collector.stop()
    assert db_count(tmp_path / "fleet.db", "SELECT count(*) FROM telemetry") == 2


def test_a_receiver_process_that_dies_is_replaced_and_nothing_is_lost(
    mosquitto, tmp_path: Path, topics: Topics
) -> None:  # type: ignore[no-untyped-def]
    collector = start_collector(
        mosquitto, tmp_path / "fleet.db", topics, client_id=f"c-{uuid.uuid4().hex[:6]}"
    )
    pi = three_devices()[0]
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            base = sum(collector.stats.received.values())
            pub.send("telemetry", pi.telemetry(1, time.time()))
            wait_received(collector, base + 1)
            # A kill loses what the receiver had acknowledged but not yet shipped (at most
            # a few milliseconds of messages): kill it once that one is stored.
            assert collector.flush()
            child = collector._receiver._proc
            os.kill(child.pid, signal.SIGKILL)
            child.join(5)
            for seq in range(2, 12):  # while no receiver runs: they wait at the broker (persistent session)
                pub.send("telemetry", pi.telemetry(seq, time.time()))
            deadline = time.monotonic() + 15
            while collector.stats.stored["telemetry"] < 11:
                assert time.monotonic() < deadline, f"stored {collector.stats.stored} after the receiver died"
                time.sleep(0.05)
        assert collector._receiver.restarts == 1
        assert collector.connected
    finally:
        collector.stop()
    assert db_count(tmp_path / "fleet.db", "SELECT count(*) FROM telemetry") == 11
