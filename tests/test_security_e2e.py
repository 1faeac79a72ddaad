"""Fleet security end to end: the agent as a real process on mutual TLS behind the shipped
Mosquitto ACL (deploy/mosquitto), the registry and edgectl on their own host identities,
real ONNX Runtime sessions.

* Device A attacks device B's download (forged replies on B's blocks topic, requests on B's
  request topic and requests naming B on its own): B's deployment completes.
* Key rotation and revocation with a root-signed key set: a bundle signed by the new release
  key deploys; after the old key is revoked, what it signed is refused (``revoked_key``), and
  a replayed older key set is refused (``keyset_rollback``).
"""

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

import pytest

from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.cli.common import build_parser, run
from edgeagent.mqtt import MqttSession
from edgeagent.protocol import (
    BlockReply,
    BlockRequest,
    BlockStatus,
    BundleRef,
    DesiredState,
    Topics,
    sign_document,
)
from edgeagent.signing import SigningKey, generate_keypair
from fleet.edgectl import COMMANDS, DESCRIPTION
from fleet.push import FleetConnection, Target, publish_desired, wait_for
from fleet.registry import Registry
from tests.pki_support import FleetBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

BIN = Path(sys.executable).parent
TOPICS = Topics()  # the shipped ACL names the default prefix


class Release:
    """Keys (root, old and new release keys) and bundles signed by each release key."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.keys = root / "keys"
        for name in ("root", "old", "new"):
            generate_keypair(name, self.keys)
        self.folder = root / "trusted"  # the device's trusted_keys folder: the old key only
        self.folder.mkdir()
        (self.folder / "old.pub").write_bytes((self.keys / "old.pub").read_bytes())
        self.old, self.new = (SigningKey.load(self.keys / f"{n}.key") for n in ("old", "new"))
        self.registry = root / "registry"
        self.registry.mkdir()
        gate = AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95)
        self.refs: dict[str, BundleRef] = {}
        for label, version, key in (
            ("v1", "1.0.0", self.old),
            ("v2", "1.1.0", self.new),
            ("v3", "1.2.0", self.old),
        ):
            created = create_bundle(
                name="digits",
                version=version,
                models=[model_dir / "mlp.onnx"],
                key=key,
                out_dir=self.registry,
                golden=model_dir / "golden_mlp.npz",
                gate=gate,
            )
            self.refs[label] = BundleRef(
                name="digits", version=version, sha256=created.sha256, size=created.path.stat().st_size
            )


@pytest.fixture(scope="module")
def release(tmp_path_factory, model_dir: Path) -> Release:  # type: ignore[no-untyped-def]
    return Release(tmp_path_factory.mktemp("release"), model_dir)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    fleet = FleetBroker(tmp_path / "broker")
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def registry(broker: FleetBroker, release: Release) -> Iterator[Registry]:
    reg = Registry(broker.config("_registry"), release.registry).start()
    assert reg.session.wait_connected(10)
    yield reg
    reg.close()


class Agent:
    """``edgeagent run`` for one device, on its own client certificate."""

    def __init__(
        self, root: Path, broker: FleetBroker, release: Release, device: str, *, trust_root: bool
    ) -> None:
        cert, key = broker.folder_of(device)
        self.device = device
        root.mkdir()
        config = root / "agent.toml"
        config.write_text(
            f'device_id = "{device}"\n'
            f'state_dir = "{root / "state"}"\n'
            f'socket_path = "{root / "agent.sock"}"\n'
            f'broker_url = "{broker.url(device)}"\n'
            f'tls_ca_file = "{broker.ca.ca_file}"\n'
            f'tls_cert_file = "{cert}"\n'
            f'tls_key_file = "{key}"\n'
            f'trusted_keys = "{release.folder}"\n'
            + (f'trust_root = "{release.keys / "root.pub"}"\n' if trust_root else "")
            + 'profile = "generic-x86_64"\n'
            "transfer_block_kib = 16\n"
            "transfer_window = 8\n"
        )
        self.log = root / "agent.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "edgeagent"), "-v", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Host:
    """The operator's identity (_edgectl): follows a device's events and reported state."""

    def __init__(self, broker: FleetBroker, device: str) -> None:
        self.broker, self.device = broker, device
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reported: dict[str, Any] = {}
        self.session = MqttSession(broker.config("_edgectl"), f"host-{time.monotonic_ns()}")
        self.session.subscribe(TOPICS.events(device), lambda m: self.events.put(json.loads(m.payload)))
        self.session.subscribe(TOPICS.reported(device), self._on_reported)
        self.session.start()
        assert self.session.wait_connected(10)
        broker.wait_subscribed(self.session.client_id, 2)

    def _on_reported(self, msg) -> None:  # type: ignore[no-untyped-def]
        if msg.payload:
            self.reported = json.loads(msg.payload)

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen; reported: {self.reported}")

    def event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if pred(ev):
                return ev
        raise AssertionError("the expected event did not arrive")

    def push(self, ref: BundleRef, key: SigningKey):  # type: ignore[no-untyped-def]
        with FleetConnection(self.broker.config("_edgectl"), TOPICS, f"push-{time.monotonic_ns()}") as conn:
            publish_desired(conn, Target("device", self.device), "default", ref, key)
            return wait_for(conn, [self.device], "default", ref, 120, lambda line: None)[0]

    def publish(self, topic: str, payload: bytes) -> None:
        assert self.session.publish(topic, payload, qos=1, retain=True)

    def close(self) -> None:
        self.session.close()


def _attack(broker: FleetBroker, victim: str, ref: BundleRef, stop: threading.Event) -> None:
    """Device dev-a, with its own valid certificate, tries every way to spoil the victim's download."""
    session = MqttSession(broker.config("dev-a"), f"dev-a-{time.monotonic_ns()}").start()
    assert session.wait_connected(10)
    forged = BlockReply(BlockStatus.NOT_FOUND, ref.sha256, 0, 16384, 0, b"no such bundle").pack()
    request = BlockRequest(
        device=victim, sha256=ref.sha256, first=0, count=4, block_size=16384
    ).model_dump_json()
    try:
        while not stop.is_set():
            session.publish(TOPICS.blocks(victim), forged)
            session.publish(TOPICS.registry_get(victim), request)
            session.publish(TOPICS.registry_get("dev-a"), request)  # names the victim in the payload
            stop.wait(0.02)
    finally:
        session.close()


def test_a_deployment_completes_while_another_device_attacks_it(
    tmp_path: Path, broker: FleetBroker, release: Release, registry: Registry
) -> None:
    agent = Agent(tmp_path / "dev-b", broker, release, "dev-b", trust_root=False)
    host = Host(broker, "dev-b")
    stop = threading.Event()
    attacker = threading.Thread(target=_attack, args=(broker, "dev-b", release.refs["v1"], stop))
    attacker.start()
    try:
        result = host.push(release.refs["v1"], release.old)
    finally:
        stop.set()
        attacker.join(10)
        host.close()
        agent.stop()
    assert result.ok, f"{result.detail}\n{agent.log.read_text()[-3000:]}"
    assert registry.stats.foreign > 0  # the attack ran, and the registry refused it
    assert registry.stats.not_found == 0


def _edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


def _keys(release: Release, ks: Path, *argv: str | Path) -> None:
    assert _edgectl("keys", argv[0], "--root", release.keys / "root.key", "--set", ks, *argv[1:]) == 0


def _publish_keyset(broker: FleetBroker, ks: Path) -> None:
    cert, key = broker.folder_of("_edgectl")
    tls = ["--ca-file", broker.ca.ca_file, "--cert-file", cert, "--key-file", key]
    assert _edgectl("keys", "publish", "--set", ks, "--broker", broker.url("_edgectl"), *tls) == 0


def test_key_rotation_and_revocation_end_to_end(
    tmp_path: Path, broker: FleetBroker, release: Release, registry: Registry
) -> None:
    agent = Agent(tmp_path / "dev-c", broker, release, "dev-c", trust_root=True)
    host = Host(broker, "dev-c")
    ks = tmp_path / "keyset.json"
    try:
        host.wait("the agent's first report", lambda: host.reported.get("online") is True)
        assert host.reported["keyset_version"] is None  # the trusted_keys folder until a key set
        # Rotate: version 1 trusts the old and the new release key.
        _keys(release, ks, "rotate", "--add", release.keys / "old.pub", "--add", release.keys / "new.pub")
        v1 = ks.read_bytes()
        _publish_keyset(broker, ks)
        host.wait("key set 1", lambda: host.reported.get("keyset_version") == 1)
        result = host.push(release.refs["v2"], release.new)  # a bundle signed by the new key
        assert result.ok, result.detail

        # Revoke the old key: version 2.
        _keys(release, ks, "revoke", release.old.key_id)
        _publish_keyset(broker, ks)
        host.wait("key set 2", lambda: host.reported.get("keyset_version") == 2)
        # A desired document signed by the old key (say, by whoever leaked it) is refused...
        seq = int(time.time() * 1000) + 60_000
        doc = DesiredState(seq=seq, target="device:dev-c", models={"default": release.refs["v3"]})
        host.publish(TOPICS.device_desired("dev-c"), sign_document(doc, release.old))
        refused = host.event(lambda e: e["kind"] == "refused")
        assert refused["code"] == "revoked_key", refused
        # ...and so is a bundle it signed, even under a document signed by a trusted key.
        doc = DesiredState(seq=seq + 1, target="device:dev-c", models={"default": release.refs["v3"]})
        host.publish(TOPICS.device_desired("dev-c"), sign_document(doc, release.new))
        outcome = host.event(lambda e: e["kind"] == "outcome")
        assert (outcome["ok"], outcome["code"]) == (False, "revoked_key"), outcome

        # An older key set, replayed retained, is refused; the device keeps version 2.
        host.publish(TOPICS.trust, v1)
        refused = host.event(lambda e: e["kind"] == "refused" and e["detail"].get("topic") == TOPICS.trust)
        assert refused["code"] == "keyset_rollback", refused
        assert host.reported["keyset_version"] == 2
        host.wait("the rollback's end", lambda: host.reported["models"]["default"]["state"] == "idle")
        assert host.reported["models"]["default"]["bundle"]["version"] == "1.1.0"  # still serving
    finally:
        host.close()
        agent.stop()
    assert agent.proc.returncode == 0, agent.log.read_text()[-3000:]
    state = tmp_path / "dev-c" / "state"
    assert json.loads(json.loads((state / "keyset.json").read_bytes())["payload"])["version"] == 2
    assert os.path.exists(state / "keyset.json")
