"""Collectors that scale out: two `edgectl fleet collect` processes share one MQTT shared
subscription and one PostgreSQL database (real Mosquitto, real PostgreSQL 15); a `kill -9` of
one of them, its whole process group, loses nothing once it is back (acknowledged after commit,
so the broker sends its in-flight messages again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import MosquittoProcess
from fleet_support import FakeDevice, Publisher

from edgeagent.protocol import Topics
from fleet import fleetdb
from fleet.status import status_rows, summary

pytestmark = pytest.mark.mosquitto
pytest_plugins = ["postgres_support"]  # the postgres and pg_dsn fixtures

ROOT = Path(__file__).resolve().parents[1]


class CollectorProcess:
    """`edgectl fleet collect` in a process group of its own (its MQTT child included)."""

    def __init__(self, broker: MosquittoProcess, dsn: str, client_id: str, prefix: str, log: Path) -> None:
        self.client_id = client_id
        self.argv = [
            sys.executable, "-m", "fleet.edgectl", "fleet", "collect",
            "--broker", f"mqtt://127.0.0.1:{broker.port}", "--db", dsn, "--prefix", prefix,
            "--share", "collectors", "--client-id", client_id, "--ack-after-commit", "--stats-every", "0",
        ]  # fmt: skip
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CollectorProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # the parent and its MQTT child, as systemd would
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def heartbeats(dsn: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('meta')").fetchone() == (None,):
            return {}  # not made yet
        rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'collector:%'").fetchall()
    return {key.split(":", 1)[1]: json.loads(value) for key, value in rows}


def stored(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
    assert row is not None
    return int(row[0])


def wait_until(what: str, predicate, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_collectors_share_the_load_and_a_kill_9_of_one_loses_nothing(tmp_path: Path, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    broker = MosquittoProcess(tmp_path).start()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    collectors = [
        CollectorProcess(broker, pg_dsn, f"c{i}-{uuid.uuid4().hex[:4]}", prefix, tmp_path / f"c{i}.log")
        for i in (1, 2)
    ]
    try:
        # The schema first, by one of them, so both do not race to make it.
        collectors[0].start()
        wait_until("the first collector", lambda: collectors[0].client_id in heartbeats(pg_dsn))
        collectors[1].start()
        wait_until(
            "both collectors connected",
            lambda: all(heartbeats(pg_dsn).get(c.client_id, {}).get("connected") for c in collectors),
        )
        time.sleep(0.5)  # their SUBSCRIBEs reach the broker before the first PUBLISH
        devices = [FakeDevice(f"dev-{i:02d}", "rpi4", ["g"], []) for i in range(20)]
        per_device = 150
        total = len(devices) * per_device
        with Publisher("127.0.0.1", broker.port, topics) as pub:
            payloads = [
                (topics.telemetry(d.device), d.telemetry(seq, time.time()).model_dump_json())
                for seq in range(1, per_device + 1)
                for d in devices
            ]

            def send_all() -> None:
                for i, (topic, payload) in enumerate(payloads):
                    pub.publish(topic, payload)
                    if i % 20 == 0:
                        time.sleep(0.002)  # a steady stream, not one burst

            sender = threading.Thread(target=send_all)
            sender.start()
            wait_until("a third of the messages stored", lambda: stored(pg_dsn) >= total // 3)
            collectors[0].kill9()
            time.sleep(1.0)  # the survivor keeps collecting while the first is away
            collectors[0].start()  # systemd's Restart=always, same client id: its session resumes
            sender.join()
        wait_until("every message stored", lambda: stored(pg_dsn) >= total, timeout_s=90)
    finally:
        for c in collectors:
            c.stop()
        broker.stop()
    beats = heartbeats(pg_dsn)  # each one's last, written as it stopped
    assert all(
        beats[c.client_id]["stopped"] and beats[c.client_id]["stored"]["telemetry"] > 0 for c in collectors
    )
    with psycopg.connect(pg_dsn) as conn:
        distinct = conn.execute("SELECT count(DISTINCT (device, seq)) FROM telemetry").fetchone()
    assert distinct == (total,)
    assert stored(pg_dsn) == total
    db = fleetdb.open_for_reading(pg_dsn)
    try:
        line = summary(status_rows(db), fleetdb.collector_heartbeat(db))
    finally:
        db.close()
    assert line.startswith("20 devices") and "0 of 2 collectors running" in line, line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ack-after-commit", "--clean-session"], "needs a persistent session"),
        (["--share", "a/b"], "--share 'a/b'"),
        (["--db", "postgresql://edge@/nosuchdb?host=/nonexistent"], "cannot connect"),
    ],
)
def test_bad_scale_out_options_fail_in_one_line(
    tmp_path: Path, argv: list[str], message: str, capsys
) -> None:  # type: ignore[no-untyped-def]
    from edgeagent.cli.common import build_parser, run
    from fleet.edgectl import COMMANDS, DESCRIPTION

    args = ["fleet", "collect", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "fleet.db"), *argv]
    assert run(build_parser("edgectl", DESCRIPTION, COMMANDS), args) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
