"""Retiring one of several collectors for good, losing nothing (real Mosquitto, real PostgreSQL).

Mosquitto keeps a stopped member of a shared subscription in the group while its persistent
session exists, and queues that member's share of the messages for it: a collector that is
simply stopped for good loses its share. ``edgectl fleet collect --retire`` (for a stopped
collector) and SIGUSR1 (for a running one) unsubscribe, store and acknowledge what the session
holds, and leave with the session removed, so the others get every later message."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from conftest import MosquittoProcess
from fleet_support import FakeDevice, Publisher
from test_fleet_scaleout import CollectorProcess, heartbeats, stored, wait_until

from edgeagent.protocol import Topics

pytest_plugins = ["postgres_support"]  # the postgres and pg_dsn fixtures


class Stream:
    """Telemetry of 20 devices published steadily in a thread of its own."""

    def __init__(self, broker: MosquittoProcess, topics: Topics, per_device: int) -> None:
        devices = [FakeDevice(f"dev-{i:02d}", "rpi4", ["g"], []) for i in range(20)]
        self.total = len(devices) * per_device
        self.payloads = [
            (topics.telemetry(d.device), d.telemetry(seq, time.time()).model_dump_json())
            for seq in range(1, per_device + 1)
            for d in devices
        ]
        self.pub = Publisher("127.0.0.1", broker.port, topics)
        self.sent = 0
        self.thread = threading.Thread(target=self._send)

    def _send(self) -> None:
        for topic, payload in self.payloads:
            self.pub.publish(topic, payload)
            self.sent += 1
            if self.sent % 20 == 0:
                time.sleep(0.01)  # a steady stream (at most 2,000 msg/s), not one burst

    def __enter__(self) -> Stream:
        self.pub.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()
        self.pub.__exit__(*exc)


def _two(broker: MosquittoProcess, dsn: str, prefix: str, tmp_path: Path) -> list[CollectorProcess]:
    collectors = [
        CollectorProcess(broker, dsn, f"c{i}-{uuid.uuid4().hex[:4]}", prefix, tmp_path / f"c{i}.log")
        for i in (1, 2)
    ]
    collectors[0].start()
    wait_until("the first collector", lambda: collectors[0].client_id in heartbeats(dsn))
    collectors[1].start()
    wait_until(
        "both collectors connected",
        lambda: all(heartbeats(dsn).get(c.client_id, {}).get("connected") for c in collectors),
    )
    time.sleep(0.5)  # their SUBSCRIBEs reach the broker before the first PUBLISH
    return collectors


def test_a_stopped_collector_retired_with_retire_loses_nothing(tmp_path: Path, pg_dsn: str) -> None:
    broker = MosquittoProcess(tmp_path).start()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    collectors = _two(broker, pg_dsn, prefix, tmp_path)
    try:
        with Stream(broker, Topics(prefix), per_device=150) as stream:
            wait_until("a third stored", lambda: stored(pg_dsn) >= stream.total // 3)
            collectors[1].stop()  # stopped for good: the broker queues its share meanwhile
            queued_from = stream.sent
            wait_until("more published meanwhile", lambda: stream.sent >= queued_from + 400)
            retire = subprocess.run(
                [*collectors[1].argv, "--retire"], capture_output=True, text=True, timeout=120,
                env=_env(),
            )  # fmt: skip
            assert retire.returncode == 0, retire.stdout + retire.stderr
            assert "retired" in retire.stdout, retire.stdout
        wait_until("every message stored", lambda: stored(pg_dsn) >= stream.total, timeout_s=90)
        time.sleep(1.0)
        assert stored(pg_dsn) == stream.total
    finally:
        for c in collectors:
            c.stop()
        broker.stop()


def test_a_running_collector_retires_on_sigusr1_while_messages_flow(tmp_path: Path, pg_dsn: str) -> None:
    broker = MosquittoProcess(tmp_path).start()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    collectors = _two(broker, pg_dsn, prefix, tmp_path)
    try:
        with Stream(broker, Topics(prefix), per_device=500) as stream:
            wait_until("a fifth stored", lambda: stored(pg_dsn) >= stream.total // 5)
            proc = collectors[1].proc
            assert proc is not None
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=120) == 0
            # Messages still flow after it left (with its session gone, all to the other one).
            assert stream.sent < stream.total, "the stream ended before the retirement: nothing proven"
        wait_until("every message stored", lambda: stored(pg_dsn) >= stream.total, timeout_s=90)
        time.sleep(1.0)
        assert stored(pg_dsn) == stream.total
        beat = heartbeats(pg_dsn)[collectors[1].client_id]
        assert beat["stopped"] and beat["stored"]["telemetry"] > 0
    finally:
        for c in collectors:
            c.stop()
        broker.stop()


def _env() -> dict[str, str]:
    import os

    from test_fleet_scaleout import ROOT

    return {**os.environ, "PYTHONPATH": str(ROOT)}
