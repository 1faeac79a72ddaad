"""Bounded cost of hostility (issue 19, item 6): refusals at a bounded rate, the rest summarised.

The unit tests drive the limiter with a fake clock; the flood test sends 5,000 unsigned
documents through a real Mosquitto to a real agent process."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, DesiredState, Topics, sign_document, unsigned_document
from edgeagent.ratelimit import RateLimiter, RefusalReporter, Summary
from tests.security_support import AgentProcess

PREFIX = "flood"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_n_pass_and_the_rest_are_counted_by_key() -> None:
    clock, summaries = Clock(), []
    limiter = RateLimiter(summaries.append, burst=3, interval_s=10, clock=clock, timers=False)
    admitted = [limiter.admit("missing_signature" if i % 2 else "malformed_message") for i in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert summaries == []  # not before the interval ends
    clock.now += 10
    assert limiter.admit("replayed")  # a new interval: the summary of the last one first
    assert summaries == [Summary(3, 7, {"malformed_message": 3, "missing_signature": 4}, 10)]
    assert limiter.flush() is None  # nothing suppressed in this interval: nothing to say
    assert limiter.suppressed_total == 7


def test_a_summary_comes_when_the_interval_ends_even_if_nothing_follows() -> None:
    got: queue.Queue[Summary] = queue.Queue()
    limiter = RateLimiter(got.put, burst=1, interval_s=0.2)
    assert [limiter.admit("x") for _ in range(5)] == [True, False, False, False, False]
    assert got.get(timeout=10) == Summary(1, 4, {"x": 4}, 0.2)
    limiter.close()


def test_reporter_publishes_refusals_and_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    events: list[dict[str, Any]] = []
    clock = Clock()
    reporter = RefusalReporter(
        lambda kind, **f: events.append({"kind": kind, **f}), burst=2, clock=clock, timers=False
    )
    with caplog.at_level("WARNING"):
        for _ in range(1000):
            reporter.refused(
                "a desired document", "missing_signature", "document is not signed", {"topic": "t"}
            )
        reporter.close()
    assert [e["code"] for e in events] == ["missing_signature", "missing_signature", "refusals_suppressed"]
    assert events[-1]["detail"]["suppressed"] == 998
    assert events[-1]["detail"]["by_code"] == {"missing_signature": 998}
    assert len(caplog.records) == 3


@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_flood_of_unsigned_documents_costs_a_bounded_number_of_events_and_lines(
    tmp_path: Path,
    mosquitto,
    keypair,  # type: ignore[no-untyped-def]
) -> None:
    device = f"flooded-{time.monotonic_ns() % 100000}"
    topics = Topics(PREFIX)
    agent = AgentProcess(tmp_path, mosquitto, keypair.public.parent, device, prefix=PREFIX).start()
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    watcher = MqttSession(BrokerConfig(mosquitto.host, mosquitto.port), f"watch-{device}")
    watcher.subscribe(topics.events(device), lambda m: events.put(json.loads(m.payload)))
    online = threading.Event()
    state: dict[str, Any] = {}

    def on_reported(msg: Any) -> None:
        if msg.payload:
            state.update(json.loads(msg.payload))
            if state["online"]:
                online.set()

    watcher.subscribe(topics.reported(device), on_reported)
    watcher.start()
    try:
        assert online.wait(60), agent.log.read_text()
        flood = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{device}")
        flood.connect(mosquitto.host, mosquitto.port)
        flood.loop_start()
        n = 5000
        for i in range(n):
            doc = DesiredState(seq=i + 1, target=f"device:{device}", models={})
            flood.publish(topics.device_desired(device), unsigned_document(doc), qos=1).wait_for_publish(10)
        flood.loop_stop()
        flood.disconnect()
        reported, suppressed, summaries = 0, 0, 0
        deadline = time.monotonic() + 120
        # Done when every refusal is accounted for, or (drops in the agent's bounded queue)
        # when a quiet interval followed the last summary.
        quiet_since = time.monotonic()
        while (
            time.monotonic() < deadline and reported + suppressed < n and time.monotonic() - quiet_since < 25
        ):
            try:
                event = events.get(timeout=1)
            except queue.Empty:
                continue
            quiet_since = time.monotonic()
            assert event["kind"] == "refused"
            if event["code"] == "refusals_suppressed":
                summaries += 1
                suppressed += event["detail"]["suppressed"]
            else:
                assert event["code"] == "missing_signature"
                reported += 1
        warnings = [line for line in agent.log.read_text().splitlines() if line.startswith("WARNING")]
        # The agent still takes a genuine signed document after the flood.
        ref = BundleRef(name="digits", version="1.0.0", sha256="a" * 64, size=10)
        genuine = DesiredState(seq=int(time.time() * 1000), target=f"device:{device}", models={"m": ref})
        watcher.publish(topics.device_desired_model(device, "m"), sign_document(genuine, keypair.load()))
        key = f"device:{device}/m"
        deadline = time.monotonic() + 60
        while state.get("desired_seq", {}).get(key) != genuine.seq and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state["desired_seq"].get(key) == genuine.seq, agent.log.read_text()[-2000:]
    finally:
        agent.stop()
        watcher.close()
    assert summaries >= 1 and suppressed > 0
    assert reported + suppressed <= n
    # 10 a 10 s interval, however long the flood lasted, plus a summary per interval
    assert reported <= 10 * (summaries + 1)
    assert len(warnings) <= 2 * (reported + summaries) + 10, warnings[:20]
