"""Agent telemetry: hardware readers on fake /sys trees, the spool, message building, delivery
through a real Mosquitto that goes away and comes back."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import AcceptanceSummary, Check, Latency, PowerMode, Telemetry, Topics, Verdict, parse
from edgeagent.serving.stats import RequestStats, StatsKey
from edgeagent.telemetry import (
    ActiveModel,
    Spool,
    SystemProbe,
    TelemetryReporter,
    read_power_mode,
    read_temperatures,
    read_throttling,
    total_variation,
)
from edgeagent.telemetry.reporter import DRIFT_MIN_PREDICTIONS
from tests.conftest import MosquittoProcess


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def raspberry_pi_root(root: Path, *, temp_milli: int = 48312, throttled: str = "0x0") -> Path:
    write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", f"{temp_milli}\n")
    write(root, "sys/devices/platform/soc/soc:firmware/get_throttled", f"{throttled}\n")
    return root


# An Orin Nano's nvpmodel.conf, abridged: the real one also sets clocks and cores per mode.
NVPMODEL_CONF = """\
# Power modes for the Jetson Orin Nano
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online

< POWER_MODEL ID=0 NAME=15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=7W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=2 NAME=MAXN_SUPER >
CPU_ONLINE CORE_0 1

< PM_CONFIG DEFAULT=0 >
"""


def jetson_root(root: Path, *, cooling_state: int = 0, power_mode: int | None = 1) -> Path:
    zones = [("CPU-therm", 51500), ("GPU-therm", 49000), ("CPU-therm", 52000), ("PMIC-Die", 100000)]
    for i, (kind, milli) in enumerate(zones):
        write(root, f"sys/class/thermal/thermal_zone{i}/type", kind)
        write(root, f"sys/class/thermal/thermal_zone{i}/temp", str(milli))
    # A zone whose sensor is off: reading it fails on real boards (EINVAL); here it is unreadable.
    write(root, "sys/class/thermal/thermal_zone4/type", "Tboard_tegra")
    (root / "sys/class/thermal/thermal_zone4/temp").mkdir()
    write(root, "sys/class/thermal/cooling_device0/type", "thermal-cpufreq-0")
    write(root, "sys/class/thermal/cooling_device0/cur_state", str(cooling_state))
    write(root, "sys/class/thermal/cooling_device1/type", "pwm-fan")
    write(root, "sys/class/thermal/cooling_device1/cur_state", "3")  # a fan is not throttling
    if power_mode is not None:
        write(root, "etc/nvpmodel.conf", NVPMODEL_CONF)
        write(root, "var/lib/nvpmodel/status", f"pmode:{power_mode:04d} fmode:quiet\n")
    return root


# --- hardware readers ---------------------------------------------------------------------


def test_temperatures_of_a_raspberry_pi(tmp_path: Path) -> None:
    assert read_temperatures(raspberry_pi_root(tmp_path)) == {"cpu-thermal": 48.3}


def test_jetson_temperatures_keep_both_zones_of_a_type_and_skip_unreadable_ones(tmp_path: Path) -> None:
    temps = read_temperatures(jetson_root(tmp_path))
    assert temps == {"CPU-therm": 51.5, "GPU-therm": 49.0, "CPU-therm.2": 52.0, "PMIC-Die": 100.0}


def test_no_thermal_zones_means_no_temperatures(tmp_path: Path) -> None:
    assert read_temperatures(tmp_path) == {}
    assert read_throttling(tmp_path) is None


@pytest.mark.parametrize(
    ("flags", "now", "under_voltage", "detail"),
    [
        ("0x0", False, False, ""),
        ("0x50000", False, False, "since boot: under-voltage, throttled"),
        ("0x50005", True, True, "now: under-voltage, throttled; since boot: under-voltage, throttled"),
        ("0x8", True, False, "now: soft temperature limit"),
    ],
)
def test_raspberry_pi_firmware_throttling_flags(
    tmp_path: Path, flags: str, now: bool, under_voltage: bool, detail: str
) -> None:
    throttling = read_throttling(raspberry_pi_root(tmp_path, throttled=flags))
    assert throttling is not None
    assert throttling.source == "raspberrypi"
    assert throttling.flags == int(flags, 16)
    assert (throttling.throttled_now, throttling.under_voltage) == (now, under_voltage)
    assert throttling.detail == detail


def test_jetson_throttling_from_the_cpufreq_cooling_device(tmp_path: Path) -> None:
    idle = read_throttling(jetson_root(tmp_path / "idle"))
    hot = read_throttling(jetson_root(tmp_path / "hot", cooling_state=2))
    assert idle is not None and hot is not None
    assert (idle.source, idle.throttled_now) == ("cooling_device", False)
    assert (hot.throttled_now, hot.detail) == (True, "thermal-cpufreq-0 state 2")


def test_jetson_power_mode_from_nvpmodel_status_and_conf(tmp_path: Path) -> None:
    root = jetson_root(tmp_path, power_mode=1)
    names: dict[Path, tuple[int, dict[int, str]]] = {}
    assert read_power_mode(root, names) == PowerMode(source="nvpmodel", id=1, name="7W")
    # Switching modes rewrites the status file; the names come from the cache.
    write(root, "var/lib/nvpmodel/status", "pmode:0002 fmode:quiet\n")
    assert read_power_mode(root, names) == PowerMode(id=2, name="MAXN_SUPER")
    # An edited conf (new mtime) is read again.
    conf = root / "etc/nvpmodel.conf"
    conf.write_text(NVPMODEL_CONF.replace("NAME=MAXN_SUPER", "NAME=25W"))
    os.utime(conf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert read_power_mode(root, names) == PowerMode(id=2, name="25W")
    # NVIDIA's tools read /odm/etc before /etc.
    write(root, "odm/etc/nvpmodel.conf", "< POWER_MODEL ID=2 NAME=ODM_MODE >\n")
    assert read_power_mode(root, names) == PowerMode(id=2, name="ODM_MODE")


def test_power_mode_without_a_name_or_without_nvpmodel(tmp_path: Path) -> None:
    root = tmp_path / "nameless"
    write(root, "var/lib/nvpmodel/status", "pmode:0003\n")  # no conf to name it
    assert read_power_mode(root) == PowerMode(id=3, name=None)
    write(root, "etc/nvpmodel.conf", NVPMODEL_CONF)  # a mode the conf does not list
    assert read_power_mode(root) == PowerMode(id=3, name=None)
    assert read_power_mode(raspberry_pi_root(tmp_path / "pi")) is None
    assert read_power_mode(jetson_root(tmp_path / "jetson", power_mode=None)) is None
    write(tmp_path / "garbled", "var/lib/nvpmodel/status", "\x00\xff garbage")
    assert read_power_mode(tmp_path / "garbled") is None


def test_probe_reads_this_machine(tmp_path: Path) -> None:
    probe = SystemProbe(raspberry_pi_root(tmp_path / "root"), tmp_path)
    sum(i * i for i in range(200_000))  # some CPU for the process figure
    process, system = probe.process(), probe.system()
    assert 1 < process.rss_mb <= process.peak_rss_mb
    assert process.threads >= 1 and process.cpu_percent >= 0
    assert 0 < system.mem_available_mb <= system.mem_total_mb
    assert 0 < system.disk_free_mb <= system.disk_total_mb
    assert system.cpu_count >= 1 and system.load1 >= 0
    assert system.temperatures_c == {"cpu-thermal": 48.3}


# --- spool ---------------------------------------------------------------------------------


def payload(seq: int, size: int = 10) -> bytes:
    return json.dumps({"seq": seq, "pad": "x" * size}).encode()


def test_spool_keeps_order_and_drops_the_oldest_past_the_count_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_messages=3, max_bytes=10**6)
    seqs = [spool.next_seq() for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    for seq in seqs:
        spool.put(seq, payload(seq))
    assert spool.seqs() == [3, 4, 5]
    assert (spool.dropped, spool.dropped_total) == (2, 2)
    assert json.loads(spool.read(3) or b"")["seq"] == 3


def test_spool_byte_bound(tmp_path: Path) -> None:
    one = len(payload(1, 100))
    spool = Spool(tmp_path, max_messages=100, max_bytes=2 * one + 5)
    for seq in range(1, 5):
        spool.put(seq, payload(seq, 100))
    assert spool.seqs() == [3, 4] and spool.bytes == 2 * one and spool.dropped == 2


def test_spool_survives_a_restart_with_its_order_count_and_sequence(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_messages=2, max_bytes=10**6)
    for _ in range(3):
        seq = spool.next_seq()
        spool.put(seq, payload(seq))
    (tmp_path / "0000000000000099.json.tmp").write_bytes(b"{")  # a write cut short
    again = Spool(tmp_path, max_messages=2, max_bytes=10**6)
    assert again.seqs() == [2, 3]
    assert (again.dropped, again.dropped_total) == (0, 1)
    assert again.next_seq() > 3  # never reused, even though only 3 were handed out
    assert not list(tmp_path.glob("*.tmp"))


def test_spool_drops_a_torn_message_when_reading_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_messages=10, max_bytes=10**6)
    spool.put(1, payload(1))
    spool.put(2, payload(2))
    (tmp_path / "0000000000000001.json").write_bytes(b'{"seq": 1, "pa')  # power cut mid-write
    assert spool.read(1) is None
    assert spool.seqs() == [2] and spool.dropped_total == 1


def test_spool_puts_a_spilled_older_message_back_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_messages=10, max_bytes=10**6)
    spool.put(7, payload(7))
    spool.put(5, payload(5))
    spool.put(6, payload(6))
    assert spool.seqs() == [5, 6, 7]


# --- building messages ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_reporter(
    tmp_path: Path,
    stats: RequestStats,
    active: dict[str, ActiveModel],
    *,
    session: MqttSession | None = None,
    interval_s: float = 10.0,
    clock: FakeClock | None = None,
    spool: Spool | None = None,
) -> TelemetryReporter:
    return TelemetryReporter(
        device_id="dev-1",
        topic=Topics().telemetry("dev-1"),
        session=session,
        stats=stats,
        active=lambda: active,
        probe=SystemProbe(jetson_root(tmp_path / "root"), tmp_path),
        spool=spool if spool is not None else Spool(tmp_path / "spool", max_messages=100, max_bytes=10**6),
        interval_s=interval_s,
        groups=["lab"],
        profile="jetson-orin",
        clock=clock or time.monotonic,
    )


VERDICT = Verdict(
    passed=True,
    reason=None,
    runtime="onnxruntime",
    delegate="CPUExecutionProvider",
    precision="fp32",
    profile=None,
    samples=200,
    checks=[Check(name="accuracy", value=0.97, op=">=", bound=0.9, passed=True)],
    latency=Latency(runs=200, p50_ms=0.2, p95_ms=0.31, p99_ms=0.4, max_ms=0.5),
    predicted_classes={"0": 50, "1": 50},
)


def test_a_message_carries_each_keys_interval_and_resets_it(tmp_path: Path) -> None:
    stats = RequestStats()
    old = StatsKey("digits", "1.0.0", "onnxruntime", "CPUExecutionProvider")
    new = StatsKey("digits", "1.1.0", "onnxruntime", "CPUExecutionProvider")
    for ms in range(1, 101):  # 1..100 ms
        stats.record(new, ms / 1000)
    stats.record(old, 0.004)
    stats.error(new, client=True)
    clock = FakeClock()
    active = {"digits": ActiveModel("1.1.0", "onnxruntime", "CPUExecutionProvider", VERDICT, "digits-mlp")}
    reporter = make_reporter(tmp_path, stats, active, clock=clock)
    clock.now += 20.0
    message = reporter.collect()
    assert message.interval_s == 20.0 and message.seq == 1
    # the retired version has no bundle name any more; the active one does
    assert [(m.bundle, m.version, m.count) for m in message.models] == [
        (None, "1.0.0", 1),
        ("digits-mlp", "1.1.0", 100),
    ]
    m = message.models[1]
    assert m.throughput_rps == 5.0 and m.client_errors == 1
    assert m.p50_ms == pytest.approx(50, rel=0.011) and m.p99_ms == pytest.approx(99, rel=0.011)
    assert m.max_ms == 100.0 and m.latency_hist is not None and m.latency_hist["count"] == 100
    assert message.acceptance["digits"] == AcceptanceSummary(
        version="1.1.0",
        runtime="onnxruntime",
        delegate="CPUExecutionProvider",
        passed=True,
        accuracy=0.97,
        p95_ms=0.31,
        samples=200,
    )
    assert message.system.temperatures_c["GPU-therm"] == 49.0
    assert message.system.throttling is not None and message.profile == "jetson-orin"
    clock.now += 10.0
    assert reporter.collect().models == []  # the interval was reset
    # the round trip through JSON is what the collector parses
    again = parse(Telemetry, message.model_dump_json(exclude_none=True).encode(), "telemetry")
    assert again == message


def test_online_accuracy_accumulates_since_activation_and_drift_needs_enough_predictions(
    tmp_path: Path,
) -> None:
    stats = RequestStats()
    key = StatsKey("digits", "1.1.0", "litert", "xnnpack")
    active = {"digits": ActiveModel("1.1.0", "litert", "xnnpack", VERDICT)}
    reporter = make_reporter(tmp_path, stats, active)
    class0 = np.array([[0.9, 0.1]], np.float32)
    stats.label(key, labelled=4, correct=3)
    for _ in range(DRIFT_MIN_PREDICTIONS - 1):
        stats.record(key, 0.001, class0)
    first = reporter.collect().models[0]
    assert (first.labelled, first.correct, first.online_accuracy) == (4, 3, 0.75)
    assert first.predicted == {"0": DRIFT_MIN_PREDICTIONS - 1} and first.drift is None
    stats.label(key, labelled=4, correct=4)
    stats.record(key, 0.001, class0)
    second = reporter.collect().models[0]
    assert (second.labelled, second.correct, second.online_accuracy) == (4, 4, 0.875)
    # every prediction is class 0 while the acceptance set was half 0, half 1
    assert second.drift == 0.5


def test_total_variation() -> None:
    assert total_variation({0: 5, 1: 5}, {0: 1, 1: 1}) == 0.0
    assert total_variation({0: 1}, {1: 1}) == 1.0
    assert total_variation({0: 3, 1: 1}, {0: 1, 1: 1}) == pytest.approx(0.25)
    assert total_variation({}, {0: 1}) == 0.0


# --- delivery through a real broker -----------------------------------------------------------


class Subscriber:
    """A persistent-session QoS 1 subscriber: messages published while it reconnects wait for it."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[Telemetry] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="telemetry-test", clean_session=False
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(parse(Telemetry, bytes(msg.payload), "telemetry"))

    def seqs(self) -> list[int]:
        with self.lock:
            return [m.seq for m in self.messages]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def persistent_broker(proc: MosquittoProcess) -> MosquittoProcess:
    # Sessions must outlive the restart, or the test's subscriber would miss the agent's
    # flush while it resubscribes (a real collector uses a persistent session too).
    proc.stop()
    text = proc.conf.read_text().replace("persistence false\n", "")
    proc.conf.write_text(text + f"persistence true\npersistence_location {proc.workdir}/\n")
    return proc.start()


@pytest.fixture
def session_and_subscriber(own_mosquitto: MosquittoProcess) -> Iterator[tuple[MqttSession, Subscriber]]:
    persistent_broker(own_mosquitto)
    subscriber = Subscriber(own_mosquitto.port, Topics().telemetry("dev-1"))
    session = MqttSession(BrokerConfig.from_url(own_mosquitto.broker.url), "edgeagent-dev-1").start()
    assert session.wait_connected(10)
    try:
        yield session, subscriber
    finally:
        session.close()
        subscriber.close()


def wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def first_occurrences(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [s for s in seqs if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


def test_spooled_messages_arrive_in_order_after_a_broker_outage(
    tmp_path: Path, own_mosquitto: MosquittoProcess, session_and_subscriber: tuple[MqttSession, Subscriber]
) -> None:
    session, subscriber = session_and_subscriber
    reporter = make_reporter(tmp_path, RequestStats(), {}, session=session, interval_s=0.05).start()
    try:
        wait_for(lambda: len(subscriber.seqs()) >= 5)
        own_mosquitto.stop()
        wait_for(lambda: len(reporter.spool) >= 10)  # ~0.5 s of messages while the broker is away
        offline = reporter.spool.seqs()
        own_mosquitto.start()
        wait_for(lambda: max(subscriber.seqs(), default=0) > offline[-1] + 3)
    finally:
        reporter.close()
    received = first_occurrences(subscriber.seqs())
    assert received == sorted(received), "out of order"
    assert received == list(range(received[0], received[-1] + 1)), "a message was lost"
    assert set(offline) <= set(received)
    assert all(m.spool.dropped == 0 for m in subscriber.messages)


def test_past_the_spool_bound_the_oldest_are_dropped_and_the_drop_is_reported(
    tmp_path: Path, own_mosquitto: MosquittoProcess, session_and_subscriber: tuple[MqttSession, Subscriber]
) -> None:
    session, subscriber = session_and_subscriber
    spool = Spool(tmp_path / "spool", max_messages=5, max_bytes=10**6)
    reporter = make_reporter(tmp_path, RequestStats(), {}, session=session, interval_s=0.05, spool=spool)
    reporter.start()
    try:
        wait_for(lambda: len(subscriber.seqs()) >= 3)
        own_mosquitto.stop()
        wait_for(lambda: spool.dropped >= 10)
        own_mosquitto.start()
        wait_for(lambda: reporter.backlog == 0)
        after = max(subscriber.seqs())
        wait_for(lambda: max(subscriber.seqs()) > after + 1)  # built after the last drop
    finally:
        reporter.close()
    received = first_occurrences(subscriber.seqs())
    assert received == sorted(received)
    gaps = [b - a - 1 for a, b in itertools.pairwise(received) if b - a > 1]
    reported = max(m.spool.dropped for m in subscriber.messages)
    # Everything missing was dropped by the bound, and the later messages say how many.
    assert len(gaps) == 1 and gaps[0] <= reported
    assert reported == spool.dropped_total
