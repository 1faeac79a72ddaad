"""Fake devices for the fleet tests: protocol messages built from the real pydantic models and
published by a plain paho client, as the agent would (the agent's own telemetry is tested
in test_telemetry.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.histogram import Histogram
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import (
    BundleRef,
    Check,
    DeploymentOutcome,
    Event,
    Latency,
    ModelStatus,
    ModelTelemetry,
    PowerMode,
    ProcessTelemetry,
    Reported,
    SpoolTelemetry,
    SystemTelemetry,
    Telemetry,
    Throttling,
    Topics,
    Verdict,
)
from fleet.collector import Collector

TOPICS = Topics()


def ref(name: str, version: str) -> BundleRef:
    return BundleRef(name=name, version=version, sha256=f"{abs(hash((name, version))):064x}"[-64:], size=1000)


@dataclass
class ServedModel:
    """One model a fake device serves: its bundle, runtime and a latency distribution (ms)."""

    model: str
    bundle: str
    version: str
    runtime: str
    delegate: str
    latency_ms: tuple[float, float]  # lognormal median, sigma
    accuracy: float = 0.97
    passed: bool = True


@dataclass
class FakeDevice:
    device: str
    profile: str
    groups: list[str]
    models: list[ServedModel]
    temperatures: dict[str, float] = field(default_factory=dict)
    throttling: Throttling | None = None
    power_mode: PowerMode | None = None
    rss_mb: float = 60.0
    cpu_percent: float = 12.0
    seed: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)  # model -> every latency sent (ms)

    def reported(self, *, online: bool = True, last: DeploymentOutcome | None = None) -> Reported:
        return Reported(
            device=self.device,
            online=online,
            agent_version="0.1.0",
            groups=self.groups,
            profile=self.profile,
            hardware={"machine": "aarch64" if "x86" not in self.profile else "x86_64"},
            models={
                m.model: ModelStatus(
                    bundle=ref(m.bundle, m.version),
                    runtime=m.runtime,
                    delegate=m.delegate,
                    state="committed",
                    acceptance=Verdict(
                        passed=m.passed,
                        reason=None if m.passed else "accuracy below its bound",
                        runtime=m.runtime,
                        delegate=m.delegate,
                        precision="int8",
                        profile=self.profile,
                        samples=100,
                        checks=[
                            Check(name="accuracy", value=m.accuracy, op=">=", bound=0.9, passed=m.passed)
                        ],
                        latency=Latency(runs=100, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, max_ms=4.0),
                    ),
                )
                for m in self.models
            },
            last_deployment=last,
        )

    def telemetry(self, seq: int, at: float, *, requests: int = 200, interval_s: float = 10.0) -> Telemetry:
        rng = np.random.default_rng(self.seed * 100_000 + seq)
        models = []
        for m in self.models:
            lat = rng.lognormal(np.log(m.latency_ms[0]), m.latency_ms[1], requests)
            self.samples.setdefault(m.model, []).extend(lat.tolist())
            hist = Histogram()
            for v in lat:
                hist.record(v / 1000)
            p50, p90, p99, p999 = (q * 1000 for q in hist.quantiles((0.5, 0.9, 0.99, 0.999)))
            models.append(
                ModelTelemetry(
                    model=m.model, version=m.version, runtime=m.runtime, delegate=m.delegate,
                    count=requests, client_errors=1, server_errors=0, throughput_rps=requests / interval_s,
                    p50_ms=p50, p90_ms=p90, p99_ms=p99, p999_ms=p999, max_ms=hist.max * 1000,
                    latency_hist=hist.to_dict(), labelled=10, correct=9, online_accuracy=0.9,
                    predicted={"1": requests // 2, "7": requests - requests // 2}, drift=0.05,
                )
            )  # fmt: skip
        return Telemetry(
            device=self.device,
            seq=seq,
            at=at,
            interval_s=interval_s,
            groups=self.groups,
            profile=self.profile,
            models=models,
            acceptance={m.model: {"version": m.version, "passed": m.passed, "accuracy": m.accuracy}
                        for m in self.models},
            process=ProcessTelemetry(rss_mb=self.rss_mb + seq * 0.5, peak_rss_mb=self.rss_mb + 40,
                                     cpu_percent=self.cpu_percent, threads=9),
            system=SystemTelemetry(
                mem_total_mb=3800, mem_available_mb=2100, cpu_percent=30.0, cpu_count=4,
                load1=0.7, load5=0.5, load15=0.4, temperatures_c=self.temperatures,
                throttling=self.throttling, power_mode=self.power_mode,
                disk_free_mb=12000, disk_total_mb=30000,
            ),
            spool=SpoolTelemetry(queued=0, dropped=0, dropped_total=3),
        )  # fmt: skip


def three_devices() -> list[FakeDevice]:
    """A Raspberry Pi that throttles, a Jetson with two models, an x86 box without sensors."""
    return [
        FakeDevice(
            "pi-kitchen", "rpi4", ["canary", "kitchen"],
            [ServedModel("default", "digits", "1.1.0", "litert", "xnnpack", (2.0, 0.3))],
            temperatures={"cpu-thermal": 71.5},
            throttling=Throttling(source="raspberrypi", throttled_now=True, flags=0x50005,
                                  under_voltage=True),
            rss_mb=48.0, cpu_percent=35.0, seed=1,
        ),
        FakeDevice(
            "jetson-yard", "jetson-orin", ["yard"],
            [
                ServedModel("detector", "yolo", "2.0.0", "onnxruntime", "TensorrtExecutionProvider",
                            (8.0, 0.2)),
                ServedModel("classifier", "digits", "1.1.0", "onnxruntime", "CUDAExecutionProvider",
                            (0.8, 0.4)),
            ],
            temperatures={"CPU-therm": 48.0, "GPU-therm": 55.5, "SOC0-therm": 50.25},
            throttling=Throttling(source="cooling_device", throttled_now=False),
            power_mode=PowerMode(id=2, name="15W"),
            rss_mb=310.0, cpu_percent=20.0, seed=2,
        ),
        FakeDevice(
            "x86-lab", "generic-x86_64", ["canary"],
            [ServedModel("default", "digits", "1.0.0", "onnxruntime", "CPUExecutionProvider", (0.3, 0.5),
                         accuracy=0.98)],
            rss_mb=90.0, cpu_percent=5.0, seed=3,
        ),
    ]  # fmt: skip


def outcome_event(device: str, model: str, bundle: str, version: str, ok: bool, code: str) -> Event:
    return Event(device=device, kind="outcome", model=model, bundle=ref(bundle, version), ok=ok, code=code,
                 reason="" if ok else "accuracy 0.91 < 0.95")  # fmt: skip


class Publisher:
    """A plain paho client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, host: str, port: int, topics: Topics = TOPICS, client_id: str = "fakes") -> None:
        self.topics = topics
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_id}-{time.monotonic_ns()}")
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        if not info.is_published():
            raise RuntimeError(f"publish to {topic} was not acknowledged")

    def send(self, kind: str, message: Any, *, retain: bool = False) -> None:
        topic = getattr(self.topics, kind)(message.device)
        self.publish(topic, message.model_dump_json(), retain=retain)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def publish_history(pub: Publisher, devices: Sequence[FakeDevice], intervals: int, end: float) -> None:
    """Each device's reported state (retained), then ``intervals`` telemetry messages 10 s apart
    ending at ``end``."""
    for dev in devices:
        pub.send("reported", dev.reported(), retain=True)
        for i in range(intervals):
            pub.send("telemetry", dev.telemetry(i + 1, end - (intervals - 1 - i) * 10.0))


def start_collector(broker, db: Path, topics: Topics, **kwargs) -> Collector:  # type: ignore[no-untyped-def]
    collector = Collector(BrokerConfig(broker.host, broker.port), db, topics=topics, **kwargs).start()
    assert collector.wait_connected(10)
    return collector


def subscribed(collector: Collector, pub: Publisher, topics: Topics) -> None:
    """Wait until the collector's subscriptions are in place (a probe event comes through)."""
    probe = outcome_event("probe", "default", "digits", "0.0.1", True, "committed")
    before = collector.stats.received["events"]
    deadline = time.monotonic() + 10
    while collector.stats.received["events"] == before:
        assert time.monotonic() < deadline, "the collector never received the probe"
        pub.send("events", probe.model_copy(update={"at": time.time()}))
        time.sleep(0.05)


def wait_received(collector: Collector, total: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(collector.stats.received.values()) < total:
        assert time.monotonic() < deadline, f"received {collector.stats.received}, expected {total} in all"
        time.sleep(0.02)
    assert collector.flush(timeout_s)
