"""The PostgreSQL fleet database against a real PostgreSQL 15 server and a real Mosquitto: the
same messages stored by a SQLite collector and a PostgreSQL one read back the same in every
view; duplicates once; daily partitions and retention by dropping them; one refused message
costs only itself."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from fleet_support import (
    TOPICS,
    FakeDevice,
    Publisher,
    ServedModel,
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
from fleet import fleetdb, pgpartitions
from fleet.collector import Collector
from fleet.edgectl import COMMANDS, DESCRIPTION
from fleet.report import build_report
from fleet.status import status_rows

pytest_plugins = ["postgres_support"]  # the postgres and pg_dsn fixtures


def edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


def pg_count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.mosquitto
def test_sqlite_and_postgresql_collectors_store_the_same_and_every_view_reads_both(
    mosquitto, tmp_path: Path, pg_dsn: str, capsys
) -> None:  # type: ignore[no-untyped-def]
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    lite = start_collector(mosquitto, tmp_path / "fleet.db", topics, client_id=f"lite-{uuid.uuid4().hex[:6]}")
    pg = start_collector(mosquitto, pg_dsn, topics, client_id=f"pg-{uuid.uuid4().hex[:6]}")
    devices = three_devices()
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(lite, pub, topics)
            subscribed(pg, pub, topics)
            base_lite, base_pg = (sum(c.stats.received.values()) for c in (lite, pg))
            end = time.time()
            publish_history(pub, devices, intervals=6, end=end)
            for _ in range(2):  # the newest message again, as a redelivery would: stored once
                pub.send("telemetry", devices[0].telemetry(6, end))
            pub.send("events", outcome_event("pi-kitchen", "default", "digits", "1.1.0", True, "committed"))
            pub.send(
                "events", outcome_event("x86-lab", "default", "digits", "1.2.0", False, "acceptance_failed")
            )
            wait_received(lite, base_lite + 3 + 18 + 2 + 2)
            wait_received(pg, base_pg + 3 + 18 + 2 + 2)
    finally:
        lite.stop()
        pg.stop()
    assert pg.stats.stored == lite.stats.stored and pg.stats.duplicates == lite.stats.duplicates == 2
    assert pg_count(pg_dsn, "SELECT count(*) FROM telemetry") == 18
    assert pg_count(pg_dsn, "SELECT count(*) FROM model_telemetry") == 24
    assert pg_count(pg_dsn, "SELECT count(*) FROM events WHERE device != 'probe'") == 2
    # Today's rows sit in today's partition, none in the default one.
    today = time.strftime("%Y%m%d", time.gmtime())
    assert pg_count(pg_dsn, f"SELECT count(*) FROM telemetry_p{today}") == 18
    assert pg_count(pg_dsn, "SELECT count(*) FROM telemetry_default") == 0

    def views(db: str | Path) -> tuple[list[dict[str, object]], dict[str, object]]:
        rows = [r.as_json() for r in status_rows(db) if r.device != "probe"]
        for r in rows:
            r.pop("last_seen")  # each collector's own clock
        assert edgectl("fleet", "status", "--db", db, "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        report = build_report(db, since_s=3600)
        return rows, {"cli_rows": len(doc["rows"]), "report_rows": report.rows, "charts": report.charts}

    assert views(pg_dsn) == views(tmp_path / "fleet.db")
    assert edgectl("fleet", "status", "--db", pg_dsn) == 0
    assert "jetson-yard" in capsys.readouterr().out


def _device(name: str, model: str = "default") -> FakeDevice:
    return FakeDevice(name, "rpi4", ["g"], [ServedModel(model, "digits", "1.0.0", "litert", "cpu", (2, 0.3))])


def test_partitions_by_day_and_retention_drops_whole_days(pg_dsn: str) -> None:
    db = fleetdb.open_for_writing(pg_dsn)
    try:
        now = time.time()
        day = pgpartitions.DAY_S
        # Partitions made ahead on the days of 10 and 9 days ago (as a collector running then did).
        pgpartitions.ensure_ahead(db, now=now - 10 * day)
        dev = _device("pi")
        batch = fleetdb.Batch(telemetry=[
            (dev.telemetry(1, now - 10 * day), now - 10 * day),
            (dev.telemetry(2, now - 9 * day), now - 9 * day),
            (dev.telemetry(3, now - 30 * day), now - 30 * day),  # no partition that day: the default one
            (dev.telemetry(4, now), now),
        ])  # fmt: skip
        assert len(fleetdb.write_batch(db, batch).telemetry) == 4
        assert len(fleetdb.write_batch(db, batch).telemetry) == 0  # all duplicates now
        assert pg_count(pg_dsn, "SELECT count(*) FROM telemetry_default") == 1
        before = set(pgpartitions.existing(db, "telemetry"))
        deleted = fleetdb.delete_older_than(db, now - 5 * day)
        after = set(pgpartitions.existing(db, "telemetry"))
        gone = before - after
        assert len(gone) >= 2 and all(name < f"telemetry_p{time.strftime('%Y%m%d', time.gmtime(now))}"
                                      for name in gone)  # fmt: skip
        assert deleted >= 1  # the default partition's row, at least (planner estimates for the days)
        assert pg_count(pg_dsn, "SELECT count(*) FROM telemetry") == 1
        assert pg_count(pg_dsn, "SELECT count(*) FROM model_telemetry") == 1
        assert pg_count(pg_dsn, "SELECT min(seq) FROM telemetry") == 4
    finally:
        db.close()


def test_a_message_postgresql_refuses_costs_only_itself(pg_dsn: str) -> None:
    """PostgreSQL text cannot hold a NUL character, which JSON and SQLite can: the batch is stored
    message by message and only that one is counted."""
    collector = Collector.__new__(Collector)  # the writer path only: no broker in this test
    Collector.__init__(collector, _NoBroker(), pg_dsn, retention_s=None)  # type: ignore[arg-type]
    try:
        now = time.time()
        devices = [_device(f"dev-{i}", "bad\u0000name" if i == 3 else "default") for i in range(6)]
        items = [
            (
                "telemetry",
                TOPICS.telemetry(d.device),
                d.telemetry(1, now).model_dump_json().encode(),
                False,
                now,
            )
            for d in devices
        ]
        collector._store(items)
        assert collector.stats.stored["telemetry"] == 5
        assert collector.stats.malformed == {"unstorable": 1} and collector.stats.store_failed == 0
        assert pg_count(pg_dsn, "SELECT count(*) FROM telemetry") == 5
    finally:
        collector.stop()


class _NoBroker:
    url = "mqtt://nowhere:1883"


def test_a_bad_dsn_fails_in_one_line_without_the_password(postgres, capsys) -> None:  # type: ignore[no-untyped-def]
    dsn = f"postgresql://edge:s3cret@/nosuchdb?host={postgres.socket_dir}"
    with pytest.raises(UsageError, match="cannot connect") as failed:
        fleetdb.open_for_writing(dsn)
    assert "s3cret" not in str(failed.value) and "***" in str(failed.value)
    assert edgectl("fleet", "status", "--db", dsn) != 0
    err = capsys.readouterr().err
    assert "s3cret" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
