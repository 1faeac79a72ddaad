"""Deployment end to end: a real Mosquitto, the registry, the agent as a real process,
real ONNX Runtime and LiteRT sessions, and the host's push/rollback."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.bundle.golden import load_golden
from edgeagent.client import Client
from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, DesiredState, Topics, sign_document, unsigned_document
from edgeagent.signing import SigningKey, generate_keypair
from fleet.push import FleetConnection, Target, publish_desired, wait_for
from fleet.registry import Registry

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

BIN = Path(sys.executable).parent
PREFIX = "e2e"


class Bundles:
    """Signed bundles of the fixture models, built once per module."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.keys = root / "keys"
        _, self.pub, _ = generate_keypair("release", self.keys)
        generate_keypair("intruder", root / "other-keys")
        self.key = SigningKey.load(self.keys / "release.key")
        self.intruder = SigningKey.load(root / "other-keys" / "intruder.key")
        self.registry = root / "registry"
        self.registry.mkdir()
        golden = model_dir / "golden_mlp.npz"
        self.golden = load_golden(golden)
        gate = AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95)
        impossible = AcceptanceGate(min_accuracy=0.999)
        specs: dict[str, tuple[str, str, AcceptanceGate, SigningKey]] = {
            "v1": ("1.0.0", "mlp.onnx", gate, self.key),
            "v2": ("1.1.0", "mlp_int8.tflite", gate, self.key),
            "bad_gate": ("1.2.0", "mlp.onnx", impossible, self.key),
            "untrusted": ("1.3.0", "mlp.onnx", gate, self.intruder),
            "old": ("0.9.0", "mlp.onnx", gate, self.key),
        }
        self.refs: dict[str, BundleRef] = {}
        for label, (version, model, g, key) in specs.items():
            created = create_bundle(
                name="digits",
                version=version,
                models=[model_dir / model],
                key=key,
                out_dir=self.registry,
                golden=golden,
                gate=g,
            )
            self.refs[label] = BundleRef(
                name="digits", version=version, sha256=created.sha256, size=created.path.stat().st_size
            )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, model_dir) -> Bundles:  # type: ignore[no-untyped-def]
    return Bundles(tmp_path_factory.mktemp("bundles"), model_dir)


@pytest.fixture
def registry(mosquitto, bundles: Bundles) -> Iterator[Registry]:  # type: ignore[no-untyped-def]
    reg = Registry(
        BrokerConfig(mosquitto.host, mosquitto.port), bundles.registry, topics=Topics(PREFIX)
    ).start()
    assert reg.session.wait_connected(5)
    yield reg
    reg.close()


class AgentProcess:
    def __init__(self, root: Path, broker, bundles: Bundles, device: str) -> None:  # type: ignore[no-untyped-def]
        self.root = root
        self.device = device
        self.socket = root / "agent.sock"
        self.config = root / "agent.toml"
        self.config.write_text(
            f'device_id = "{device}"\n'
            f'state_dir = "{root / "state"}"\n'
            f'socket_path = "{self.socket}"\n'
            f'broker_url = "mqtt://{broker.host}:{broker.port}"\n'
            f'topic_prefix = "{PREFIX}"\n'
            f'trusted_keys = "{bundles.keys}"\n'
            'profile = "generic-x86_64"\n'
            'groups = ["lab"]\n'
            "transfer_block_kib = 16\n"
            "transfer_window = 8\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "agent.log"

    def start(self, env: dict[str, str] | None = None) -> AgentProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "edgeagent"), "-v", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        return self

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def predict(self, x: np.ndarray) -> Any:
        with Client(self.socket, timeout_s=10) as client:
            return client.predict(x)

    def current(self) -> str | None:
        link = self.root / "state" / "models" / "default" / "current"
        return link.readlink().name if link.is_symlink() else None


class Watcher:
    """Collects the device's events and reported state from the broker."""

    def __init__(self, broker, device: str) -> None:  # type: ignore[no-untyped-def]
        self.topics = Topics(PREFIX)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reported: dict[str, Any] = {}
        self.session = MqttSession(
            BrokerConfig(broker.host, broker.port), f"watch-{device}-{time.monotonic_ns()}"
        )
        self.session.subscribe(self.topics.events(device), lambda m: self.events.put(json.loads(m.payload)))
        self.session.subscribe(self.topics.reported(device), self._on_reported)
        self.session.start()
        assert self.session.wait_connected(5)

    def _on_reported(self, msg) -> None:  # type: ignore[no-untyped-def]
        if msg.payload:
            self.reported = json.loads(msg.payload)

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if pred(ev):
                return ev
        raise AssertionError("expected event did not arrive")

    def wait_active(self, ref: BundleRef, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.reported.get("models", {}).get("default", {})
            if (model.get("bundle") or {}).get("sha256") == ref.sha256 and model.get("state") == "idle":
                return model
            time.sleep(0.1)
        raise AssertionError(f"{ref.version} did not become active; reported: {self.reported}")

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def device(
    tmp_path: Path, mosquitto, bundles: Bundles, registry: Registry
) -> Iterator[tuple[AgentProcess, Watcher]]:  # type: ignore[no-untyped-def]
    name = f"dev-{os.getpid()}-{time.monotonic_ns() % 100000}"
    agent = AgentProcess(tmp_path, mosquitto, bundles, name)
    watcher = Watcher(mosquitto, name)
    agent.start()
    try:
        yield agent, watcher
    finally:
        agent.stop()
        watcher.close()
        # Clear the retained docs so later tests start clean.
        s = MqttSession(BrokerConfig(mosquitto.host, mosquitto.port), f"clean-{name}").start()
        s.wait_connected(5)
        for topic in (Topics(PREFIX).device_desired(name), Topics(PREFIX).reported(name)):
            s.publish(topic, b"", retain=True)
        time.sleep(0.1)
        s.close()


def _push(mosquitto, bundles: Bundles, device: str, ref: BundleRef, *, rollback: bool = False):  # type: ignore[no-untyped-def]
    with FleetConnection(
        BrokerConfig(mosquitto.host, mosquitto.port), Topics(PREFIX), f"push-{time.monotonic_ns()}"
    ) as conn:
        publish_desired(conn, Target("device", device), "default", ref, bundles.key, rollback=rollback)
        return wait_for(conn, [device], "default", ref, 90, lambda line: None)[0]


class Load:
    """A client sending requests the whole time; any failure is recorded."""

    def __init__(self, agent: AgentProcess, x: np.ndarray) -> None:
        self.agent, self.x = agent, x
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with Client(self.agent.socket, timeout_s=10) as client:
            while not self._stop.is_set():
                try:
                    client.predict(self.x)
                    self.ok += 1
                except Exception as exc:  # every failure counts
                    self.failures.append(repr(exc))
                time.sleep(0.005)


def test_push_upgrade_and_rollback(mosquitto, bundles: Bundles, device) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = device
    x = bundles.golden.only_input[:1]
    result = _push(mosquitto, bundles, agent.device, bundles.refs["v1"])
    assert result.ok, result.detail
    assert "accuracy" in result.detail
    model = watcher.wait_active(bundles.refs["v1"])
    assert model["runtime"] == "onnxruntime"
    assert model["acceptance"]["passed"] is True
    pred = agent.predict(x)
    assert pred.version == "1.0.0"
    assert int(np.argmax(pred.output)) == int(bundles.golden.labels[0])

    with Load(agent, x) as load:
        result = _push(mosquitto, bundles, agent.device, bundles.refs["v2"])
        assert result.ok, result.detail
        model = watcher.wait_active(bundles.refs["v2"])
        assert model["runtime"] == "litert"
        assert model["previous"]["version"] == "1.0.0"
        time.sleep(0.2)
    assert load.failures == [] and load.ok > 0
    assert agent.predict(x).version == "1.1.0"

    # A rollback is a signed desired doc pointing at the previous bundle, downgrade allowed.
    result = _push(mosquitto, bundles, agent.device, bundles.refs["v1"], rollback=True)
    assert result.ok, result.detail
    watcher.wait_active(bundles.refs["v1"])
    assert agent.predict(x).version == "1.0.0"


def test_bad_input_is_refused_and_the_model_keeps_serving(mosquitto, bundles: Bundles, device) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = device
    x = bundles.golden.only_input[:1]
    assert _push(mosquitto, bundles, agent.device, bundles.refs["v1"]).ok
    watcher.wait_active(bundles.refs["v1"])
    topics = Topics(PREFIX)
    desired = topics.device_desired(agent.device)
    raw = MqttSession(BrokerConfig(mosquitto.host, mosquitto.port), f"raw-{time.monotonic_ns()}").start()
    assert raw.wait_connected(5)
    try:
        with Load(agent, x) as load:
            # A model that fails acceptance: rolled back, with the number that missed.
            result = _push(mosquitto, bundles, agent.device, bundles.refs["bad_gate"])
            assert not result.ok and "accuracy" in result.detail and "0.999" in result.detail
            # A bundle signed by a key the device does not trust.
            result = _push(mosquitto, bundles, agent.device, bundles.refs["untrusted"])
            assert not result.ok and "unknown_key" in result.detail
            # A downgrade without --rollback.
            result = _push(mosquitto, bundles, agent.device, bundles.refs["old"])
            assert not result.ok and "downgrade" in result.detail
            # Unsigned and replayed desired docs, garbage, an oversized message.
            seq = int(time.time() * 1000) + 10_000
            doc = DesiredState(
                seq=seq, target=f"device:{agent.device}", models={"default": bundles.refs["v2"]}
            )
            watcher.drain()
            raw.publish(desired, unsigned_document(doc), retain=False)
            assert watcher.wait_event(lambda e: e["kind"] == "refused")["code"] == "missing_signature"
            old = DesiredState(seq=5, target=f"device:{agent.device}", models={"default": bundles.refs["v2"]})
            watcher.drain()
            raw.publish(desired, sign_document(old, bundles.key), retain=False)
            assert watcher.wait_event(lambda e: e["kind"] == "refused")["code"] == "replayed"
            watcher.drain()
            for junk in (b"{", b"[]", b'{"v": 1, "payload": "{}"}', os.urandom(300), b"x" * 200_000):
                raw.publish(desired, junk, retain=False)
            assert watcher.wait_event(lambda e: e["kind"] == "refused")["code"] == "malformed_message"
            for topic in (topics.blocks(agent.device), topics.cmd(agent.device)):
                raw.publish(topic, os.urandom(1000))
            time.sleep(0.5)
    finally:
        raw.close()
    assert load.failures == [] and load.ok > 0
    assert agent.proc is not None and agent.proc.poll() is None, "the agent survived"
    assert agent.predict(x).version == "1.0.0"
    assert agent.current() == bundles.refs["v1"].sha256


# The smoke set of whole-process kills: every state x every fault runs in-process in
# tests/test_deploy_engine.py; these prove the real process, journal and links agree.
@pytest.mark.parametrize("state", ["downloading", "validating", "activating", "committed"])
def test_killed_at_every_state_resumes(
    state: str, tmp_path: Path, mosquitto, bundles: Bundles, registry
) -> None:  # type: ignore[no-untyped-def]
    name = f"crash-{state}-{time.monotonic_ns() % 100000}"
    agent = AgentProcess(tmp_path, mosquitto, bundles, name)
    watcher = Watcher(mosquitto, name)
    counter = tmp_path / "crash-counter"
    try:
        agent.start()
        assert _push(mosquitto, bundles, name, bundles.refs["v1"]).ok
        # Deploy v2, SIGKILLed on entering `state` the first time.
        agent.stop()
        agent.start(env={"EDGE_TEST_CRASH_AT": f"{state}:1", "EDGE_TEST_CRASH_COUNTER": str(counter)})
        with FleetConnection(
            BrokerConfig(mosquitto.host, mosquitto.port), Topics(PREFIX), f"p-{name}"
        ) as conn:
            publish_desired(conn, Target("device", name), "default", bundles.refs["v2"], bundles.key)
        assert agent.wait_exit(60) == -signal.SIGKILL
        # Exactly one consistent active model at the moment of the crash.
        active = agent.current()
        assert active in (bundles.refs["v1"].sha256, bundles.refs["v2"].sha256)
        assert (tmp_path / "state" / "bundles" / active / "manifest.json").exists()
        # Restart without the crash point: the deployment completes from the journal.
        agent.start(env={"EDGE_TEST_CRASH_AT": f"{state}:1", "EDGE_TEST_CRASH_COUNTER": str(counter)})
        watcher.wait_active(bundles.refs["v2"], timeout=60)
        assert agent.predict(bundles.golden.only_input[:1]).version == "1.1.0"
        assert not list((tmp_path / "state" / "bundles").glob(".*partial*"))
    finally:
        agent.stop()
        watcher.close()


def test_killed_while_rolling_back_resumes_the_rollback(
    tmp_path: Path, mosquitto, bundles: Bundles, registry
) -> None:  # type: ignore[no-untyped-def]
    name = f"crash-rb-{time.monotonic_ns() % 100000}"
    agent = AgentProcess(tmp_path, mosquitto, bundles, name)
    watcher = Watcher(mosquitto, name)
    env = {"EDGE_TEST_CRASH_AT": "rolling_back:1", "EDGE_TEST_CRASH_COUNTER": str(tmp_path / "n")}
    try:
        agent.start()
        assert _push(mosquitto, bundles, name, bundles.refs["v1"]).ok
        agent.stop()
        agent.start(env=env)
        with FleetConnection(
            BrokerConfig(mosquitto.host, mosquitto.port), Topics(PREFIX), f"p-{name}"
        ) as conn:
            publish_desired(conn, Target("device", name), "default", bundles.refs["bad_gate"], bundles.key)
        assert agent.wait_exit(60) == -signal.SIGKILL
        journal = json.loads((tmp_path / "state" / "journal" / "default.json").read_text())
        assert journal["state"] == "rolling_back" and journal["code"] == "acceptance_failed"
        watcher.drain()
        agent.start(env=env)
        outcome = watcher.wait_event(lambda e: e["kind"] == "outcome")
        assert outcome["ok"] is False and outcome["code"] == "acceptance_failed"
        assert agent.current() == bundles.refs["v1"].sha256
        assert agent.predict(bundles.golden.only_input[:1]).version == "1.0.0"
    finally:
        agent.stop()
        watcher.close()


def test_signed_commands(mosquitto, bundles: Bundles, device, capsys) -> None:  # type: ignore[no-untyped-def]
    from edgeagent.cli.common import build_parser, run
    from edgeagent.protocol import Command, CommandReply
    from fleet.edgectl import COMMANDS, DESCRIPTION

    agent, _watcher = device
    assert _push(mosquitto, bundles, agent.device, bundles.refs["v1"]).ok
    base = [
        "--device",
        agent.device,
        "--key",
        str(bundles.keys / "release.key"),
        "--broker",
        f"mqtt://{mosquitto.host}:{mosquitto.port}",
        "--prefix",
        PREFIX,
        "--timeout",
        "30",
    ]
    edgectl = build_parser("edgectl", DESCRIPTION, COMMANDS)
    assert run(edgectl, ["command", "bench", *base]) == 0
    out = capsys.readouterr().out
    assert (
        "OK (ok)" in out
        and "default: passed on onnxruntime/CPUExecutionProvider" in out
        and "accuracy" in out
    )
    assert run(edgectl, ["command", "refresh", *base]) == 0

    # The same signed command twice: the replay is refused, and the sender is told why.
    replies: queue.Queue[bytes] = queue.Queue()
    topics = Topics(PREFIX)
    s = MqttSession(BrokerConfig(mosquitto.host, mosquitto.port), f"cmd-{time.monotonic_ns()}")
    s.subscribe(topics.cmd_reply(agent.device), lambda m: replies.put(m.payload))
    s.start()
    assert s.wait_connected(5)
    try:
        time.sleep(0.2)
        command = Command(
            seq=int(time.time() * 1000) + 5000, id="again", target=f"device:{agent.device}", name="refresh"
        )
        signed = sign_document(command, bundles.key)
        for _ in range(2):
            s.publish(topics.cmd(agent.device), signed)
        got = [CommandReply.model_validate_json(replies.get(timeout=10)) for _ in range(2)]
        assert sorted((r.ok, r.code) for r in got) == [(False, "replayed"), (True, "ok")]
        # Signed by a key the device does not trust.
        other = Command(
            seq=int(time.time() * 1000) + 9000, id="intruder", target=f"device:{agent.device}", name="refresh"
        )
        s.publish(topics.cmd(agent.device), sign_document(other, bundles.intruder))
        reply = CommandReply.model_validate_json(replies.get(timeout=10))
        assert (reply.id, reply.ok, reply.code) == ("intruder", False, "unknown_key")
    finally:
        s.close()
