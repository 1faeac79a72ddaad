"""`edgectl fleet` as a user runs it: one-line errors with the right exit code, a collector
process that stops cleanly on SIGTERM, a watch that leaves cleanly on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fleet_support import Publisher, three_devices

from edgeagent.cli.common import build_parser, run
from edgeagent.protocol import Topics
from fleet import fleetdb
from fleet.edgectl import COMMANDS, DESCRIPTION

EDGECTL = str(Path(sys.executable).parent / "edgectl")


def edgectl(*argv: str | Path) -> int:
    try:
        return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors and --help
        return int(exit_.code or 0)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--db", "{tmp}/missing.db"], "no fleet database here"),
        (["status", "--db", "{tmp}/notes.txt"], "not a fleet database"),
        (["watch", "--db", "{tmp}/missing.db"], "no fleet database here"),
        (["report", "--db", "{tmp}/missing.db", "--html", "{tmp}/out.html"], "no fleet database here"),
        (["report", "--db", "{tmp}/fleet.db", "--html", "{tmp}/no/such/out.html"], "does not exist"),
        (["report", "--db", "{tmp}/fleet.db", "--html", "{tmp}/out.html", "--since", "yesterday"], "--since"),
        (["status", "--db", "{tmp}/fleet.db", "--window", "0"], "--window"),
        (["collect", "--broker", "http://broker:80", "--db", "{tmp}/c.db"], "broker URL"),
        (["collect", "--broker", "mqtt://broker:99999", "--db", "{tmp}/c.db"], "bad port"),
        (
            ["collect", "--broker", "mqtt://127.0.0.1:1", "--db", "{tmp}/c.db", "--retention", "7x"],
            "--retention",
        ),
        (
            ["collect", "--broker", "mqtt://127.0.0.1:1", "--db", "{tmp}/c.db", "--retention", "0"],
            "--retention",
        ),
        (
            ["collect", "--broker", "mqtt://127.0.0.1:1", "--db", "{tmp}/c.db", "--prometheus", "x"],
            "--prometheus",
        ),
        (["collect", "--broker", "mqtt://127.0.0.1:1", "--db", "{tmp}/no/such/c.db"], "cannot open"),
        (["collect", "--broker", "mqtts://127.0.0.1:1", "--ca-file", "{tmp}/none.pem"], "no such file"),
        (["collect", "--broker", "mqtt://127.0.0.1:1", "--prefix", "a/#"], "topic prefix"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "notes.txt").write_text("not a database, but a text file that sqlite cannot read\n" * 100)
    fleetdb.open_for_writing(tmp_path / "fleet.db").close()
    code = edgectl("fleet", *(a.format(tmp=tmp_path) for a in argv))
    captured = capsys.readouterr()
    assert code == 2, captured
    line = one_line(captured.err)
    assert line.startswith("edgectl") and message in line, line
    assert not (tmp_path / "c.db").exists() or "retention" not in message


def test_help_teaches(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (["fleet", "--help"], ["fleet", "collect", "--help"], ["fleet", "report", "--help"]):
        assert edgectl(*argv) == 0
    out = capsys.readouterr().out
    for text in (
        "edgectl fleet collect --broker",
        "--prometheus",
        "--retention",
        "max_queued_messages",
        "--since",
    ):
        assert text in out


@pytest.mark.mosquitto
def test_collect_runs_until_sigterm_and_says_what_it_stored(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prefix = f"c{uuid.uuid4().hex[:8]}"
    db = tmp_path / "fleet.db"
    proc = subprocess.Popen(
        [EDGECTL, "fleet", "collect", "--broker", mosquitto.url, "--db", str(db), "--topic-prefix", prefix,
         "--client-id", f"cli-{prefix}", "--stats-every", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "collecting from" in proc.stdout.readline()
        pi = three_devices()[0]
        with Publisher(mosquitto.host, mosquitto.port, Topics(prefix)) as pub:
            deadline = time.monotonic() + 10
            seq = 0
            while fleetdb_count(db) == 0:  # until its subscription is in place
                assert time.monotonic() < deadline, "the collector stored nothing"
                seq += 1
                pub.send("telemetry", pi.telemetry(seq, time.time()))
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped: received" in out and "0 malformed" in out, out
    assert "msg/s" in out  # the periodic counters line
    conn = fleetdb.open_for_reading(db)
    heartbeat = fleetdb.collector_heartbeat(conn)
    conn.close()
    assert heartbeat is not None and heartbeat["stopped"] is True
    assert heartbeat["stored"]["telemetry"] == fleetdb_count(db) >= 1


def fleetdb_count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = fleetdb.open_for_reading(db)
    try:
        return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    finally:
        conn.close()


def test_watch_refreshes_and_leaves_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    conn = fleetdb.open_for_writing(db)
    dev = three_devices()[0]
    fleetdb.write_batch(conn, fleetdb.Batch(telemetry=[(dev.telemetry(1, time.time()), time.time())]))
    conn.close()
    proc = subprocess.Popen(
        [EDGECTL, "fleet", "watch", "--db", str(db), "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "interrupted" not in err
    assert "pi-kitchen" in out and "Ctrl-C leaves" in out


def test_status_json_is_an_object_with_rows(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "fleet.db"
    fleetdb.open_for_writing(db).close()
    assert edgectl("fleet", "status", "--db", db, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] == [] and doc["collector"] is None and doc["window_s"] == 300
