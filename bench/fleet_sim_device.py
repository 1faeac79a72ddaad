"""Simulated devices for bench/fleet_sim.py: the agent's real protocol code, many per process.

Each simulated device has its own MQTT session (edgeagent.mqtt), desired-state tracker
(edgeagent.desired: signatures, sequence numbers), block downloader (edgeagent.transfer, into
its own folder), and on arrival verifies the bundle (edgeagent.bundle.reader) and runs the
bundle's acceptance (edgeagent.acceptance) on its tiny model; then it publishes the outcome
event, its retained reported state, and telemetry (a latency histogram per model version)
every interval. What it leaves out of the real agent: the serving process, extraction into a
store with symlinks, and the deployment journal (the engine is tested on its own).

Failure injection per device: ``fail`` (acceptance fails for the new bundle), ``slow`` (the new
version's latency is 1.3x), ``offline`` (the connection drops half-way through the transfer),
``regress`` (the new version's online accuracy falls from 0.95 to 0.80, the agent's RSS grows
from 80 to 130 MB, or the board starts throttling).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.acceptance import load_golden, run_acceptance
from edgeagent.bundle.reader import extract_bundle, verify_bundle
from edgeagent.desired import DesiredTracker
from edgeagent.errors import EdgeError
from edgeagent.histogram import Histogram
from edgeagent.mqtt import Backoff, BrokerConfig, Message, MqttSession
from edgeagent.protocol import (
    BundleRef,
    DeploymentOutcome,
    Event,
    ModelStatus,
    ModelTelemetry,
    ProcessTelemetry,
    Reported,
    SpoolTelemetry,
    SystemTelemetry,
    Telemetry,
    Throttling,
    Topics,
)
from edgeagent.runtimes import load_model
from edgeagent.runtimes.base import LoadOptions
from edgeagent.signing import KeyRing
from edgeagent.transfer import BlockDownloader, TransferConfig

log = logging.getLogger("fleet_sim")
MODEL = "default"


@dataclass(frozen=True)
class DeviceSpec:
    device: str
    profile: str
    fail: bool = False
    slow: bool = False
    offline: bool = False
    regress: str = ""  # the new version is worse on: "accuracy" | "rss" | "throttle"


@dataclass(frozen=True)
class WorkerConfig:
    broker: tuple[str, int]
    prefix: str
    group: str
    keys: str
    root: str
    installed: tuple[str, str]  # (bundle path, BundleRef JSON) every device starts with
    telemetry_s: float
    devices: tuple[DeviceSpec, ...]


class Acceptance:
    """The bundle's real acceptance on its model, loaded once per process per bundle."""

    def __init__(self, root: Path, ring: KeyRing) -> None:
        self.root = root
        self.ring = ring
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def run(self, path: Path, sha256: str) -> tuple[bool, str]:
        with self._lock:
            if sha256 not in self._loaded:
                dest = self.root / f"acceptance-{os.getpid()}-{sha256[:16]}"
                verified = extract_bundle(path, dest, self.ring)
                m = verified.manifest
                model = load_model(
                    dest / m.models[0].path, "onnxruntime", LoadOptions(delegate="CPUExecutionProvider")
                )
                self._loaded[sha256] = (model, m.acceptance, load_golden(dest / str(m.acceptance.golden)))
            model, gate, golden = self._loaded[sha256]
            verdict = run_acceptance(model, gate, golden)
        return verdict.passed, verdict.reason or "passed"


class SimDevice:
    def __init__(self, spec: DeviceSpec, cfg: WorkerConfig, shared: Shared) -> None:
        self.spec = spec
        self.id = spec.device
        self.shared = shared
        self.topics = shared.topics
        root = Path(cfg.root) / self.id
        (root / "downloads").mkdir(parents=True, exist_ok=True)
        installed = BundleRef.model_validate_json(cfg.installed[1])
        os.link(cfg.installed[0], root / "downloads" / f"{installed.sha256}.bundle")
        self.current: BundleRef = installed
        self.previous: BundleRef | None = None
        self.failed: set[str] = set()
        self.busy = False
        self.lock = threading.Lock()
        offline = Reported(device=self.id, online=False).model_dump_json().encode()
        self.session = MqttSession(
            shared.broker, self.id, will=(self.topics.reported(self.id), offline), on_connect=self.report,
            max_inflight=32, queue_size=256, backoff=Backoff(0.5, 5.0),
        )  # fmt: skip
        self.tracker = DesiredTracker(
            root / "desired.json", shared.ring, device_id=self.id, groups=[cfg.group], topics=self.topics
        )
        self.downloader = BlockDownloader(
            self.session, self.id, root / "downloads", topics=self.topics,
            config=TransferConfig(block_size=64 * 1024, window=16),
        )  # fmt: skip
        # The device's and its group's documents, and their models' own documents.
        for topic in self.tracker.topic_filters():
            self.session.subscribe(topic, self.on_desired)
        self.seq = int(time.time())

    def report(self) -> None:
        status = ModelStatus(bundle=self.current, previous=self.previous, runtime="onnxruntime",
                             delegate="CPUExecutionProvider", state="idle")  # fmt: skip
        reported = Reported(
            device=self.id, online=True, agent_version="sim", groups=[self.shared.group], profile=self.spec.profile,
            hardware={"simulated": True}, models={MODEL: status},
            last_deployment=self.shared.last.get(self.id),
        )  # fmt: skip
        self.session.publish(self.topics.reported(self.id), reported.model_dump_json(), retain=True)

    def on_desired(self, msg: Message) -> None:
        try:
            if self.tracker.offer(msg.topic, msg.payload) is None:
                return
        except EdgeError as exc:
            log.warning("%s: desired refused: %s", self.id, exc)
            return
        wanted = self.tracker.effective().get(MODEL)
        if wanted is None or wanted.bundle.sha256 in (self.current.sha256, *self.failed):
            return
        with self.lock:
            if self.busy:
                return
            self.busy = True
        self.shared.pool.submit(self.deploy, wanted.bundle)

    def deploy(self, ref: BundleRef) -> None:
        try:
            ok, code, reason = self._deploy(ref)
        except Exception as exc:  # every failure becomes an outcome, as in the agent
            ok, code, reason = False, getattr(exc, "code", "error"), str(exc)
        finally:
            with self.lock:
                self.busy = False
        if ok:
            self.previous, self.current = self.current, ref
        else:
            self.failed.add(ref.sha256)
        self.shared.last[self.id] = DeploymentOutcome(
            model=MODEL, bundle=ref, ok=ok, code=code, reason=reason
        )
        event = Event(
            device=self.id, kind="outcome", model=MODEL, bundle=ref, ok=ok, code=code, reason=reason
        )
        self.session.publish(self.topics.events(self.id), event.model_dump_json())
        self.report()
        # A newer document may have arrived while this one was deployed (a rollback).
        wanted = self.tracker.effective().get(MODEL)
        if wanted is not None and wanted.bundle.sha256 not in (self.current.sha256, *self.failed):
            with self.lock:
                self.busy = True
            self.shared.pool.submit(self.deploy, wanted.bundle)

    def _deploy(self, ref: BundleRef) -> tuple[bool, str, str]:
        started = Event(device=self.id, kind="state", model=MODEL, bundle=ref, state="downloading")
        self.session.publish(self.topics.events(self.id), started.model_dump_json())
        dropped = threading.Event()

        def progress(received: int, total: int) -> None:
            if self.spec.offline and not dropped.is_set() and received * 2 >= total:
                dropped.set()
                sock = self.session._client.socket()  # bench only: a network cut, not a clean disconnect
                if isinstance(sock, socket.socket):
                    sock.shutdown(socket.SHUT_RDWR)

        path = self.downloader.fetch(ref, progress=progress)
        verify_bundle(path, self.shared.ring)
        passed, reason = self.shared.acceptance.run(path, ref.sha256)
        if self.spec.fail and ref.sha256 == self.shared.fail_sha:
            return False, "acceptance_failed", "accuracy 0.41 < 0.90 (injected)"
        return (True, "committed", "") if passed else (False, "acceptance_failed", reason)

    def telemetry(self, rng: np.random.Generator, interval_s: float) -> None:
        if not self.session.connected:
            return
        new = self.current.sha256 == self.shared.fail_sha
        slow = 1.3 if self.spec.slow and new else 1.0
        regress = self.spec.regress if new else ""
        correct = int(rng.binomial(50, 0.80 if regress == "accuracy" else 0.95))
        throttling = Throttling(source="raspberrypi", throttled_now=regress == "throttle", flags=0)
        hist = Histogram()
        for v in rng.lognormal(np.log(0.004 * slow), 0.15, 100):
            hist.record(float(v))
        p50, p90, p99, p999 = (q * 1000 for q in hist.quantiles((0.5, 0.9, 0.99, 0.999)))
        self.seq += 1
        t = Telemetry(
            device=self.id, seq=self.seq, at=time.time(), interval_s=interval_s, groups=[self.shared.group],
            profile=self.spec.profile,
            models=[ModelTelemetry(model=MODEL, bundle=self.current.name, version=self.current.version,
                                   runtime="onnxruntime", delegate="CPUExecutionProvider", count=100,
                                   throughput_rps=100 / interval_s, p50_ms=p50, p90_ms=p90, p99_ms=p99,
                                   p999_ms=p999, max_ms=hist.max * 1000, latency_hist=hist.to_dict(),
                                   labelled=50, correct=correct)],
            process=ProcessTelemetry(rss_mb=130.0 if regress == "rss" else 80.0, peak_rss_mb=140.0,
                                     cpu_percent=5.0, threads=4),
            system=SystemTelemetry(mem_total_mb=4000, mem_available_mb=2000, cpu_percent=10, cpu_count=4,
                                   load1=0.1, load5=0.1, load15=0.1, disk_free_mb=10000, disk_total_mb=30000,
                                   throttling=throttling),
            spool=SpoolTelemetry(queued=0, dropped=0, dropped_total=0),
        )  # fmt: skip
        self.session.publish(self.topics.telemetry(self.id), t.model_dump_json())


class Shared:
    """What the simulated devices of one process share: the pool that deploys, the key ring,
    the acceptance cache, and their last outcomes."""

    def __init__(self, cfg: WorkerConfig, fail_sha: str) -> None:
        self.broker = BrokerConfig(*cfg.broker)
        self.topics = Topics(cfg.prefix)
        self.group = cfg.group
        self.ring = KeyRing.from_paths(sorted(Path(cfg.keys).glob("*.pub")))
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.acceptance = Acceptance(Path(cfg.root), self.ring)
        self.fail_sha = fail_sha
        self.last: dict[str, DeploymentOutcome] = {}


def worker_main(cfg: WorkerConfig, fail_sha: str, ready: Any, stop: Any) -> None:
    """Process entry: start the devices (at most 100 connects a second), telemetry every interval."""
    logging.basicConfig(level=logging.WARNING)
    shared = Shared(cfg, fail_sha)
    devices = []
    for spec in cfg.devices:
        device = SimDevice(spec, cfg, shared)
        device.session.start()
        devices.append(device)
        time.sleep(0.01)
    for device in devices:
        device.session.wait_connected(60)
    ready.put(len(devices))
    rng = np.random.default_rng(os.getpid())
    while not stop.wait(cfg.telemetry_s):
        for device in devices:
            device.telemetry(rng, cfg.telemetry_s)
    for device in devices:
        device.session.close()
    shared.pool.shutdown(wait=False, cancel_futures=True)
