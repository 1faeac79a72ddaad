"""Per-device identity against a real Mosquitto running the shipped TLS + ACL configuration
(deploy/mosquitto): each device's certificate CN is its MQTT username, and the ACL pins every
topic a device may write to that name.

A publish the ACL denies is dropped silently (an MQTT 3.1.1 client still gets its PUBACK), so
each test proves a refusal by ordering, not by waiting: the attacker publishes the forged
message first and then a sentinel that the same subscriber is allowed to see; the broker
forwards one client's messages in order, so once the sentinel is in, a forged message that had
got through would be in too.
"""

from __future__ import annotations

import hashlib
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.mqtt import Backoff, Message, MqttSession
from edgeagent.protocol import BlockReply, BlockRequest, BlockStatus, Topics
from fleet.registry import Registry
from tests.pki_support import FleetBroker

pytestmark = pytest.mark.mosquitto

TOPICS = Topics()  # the shipped ACL names the default prefix
A, B = "dev-a", "dev-b"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    fleet = FleetBroker(tmp_path / "broker")
    try:
        yield fleet
    finally:
        fleet.stop()


class Client:
    """One identity's session that records what it receives."""

    def __init__(
        self, broker: FleetBroker, cn: str, *subscriptions: str, client_id: str | None = None
    ) -> None:
        self.got: queue.Queue[Message] = queue.Queue()
        self.session = MqttSession(broker.config(cn), client_id or f"{cn}-{time.monotonic_ns()}")
        for topic in subscriptions:
            self.session.subscribe(topic, self.got.put)
        self.session.start()
        assert self.session.wait_connected(10), f"{cn} could not connect over mutual TLS"
        # On the device listener the broker names the client by its CN, whatever id it asked for.
        broker.wait_subscribed(self.session.client_id if broker.is_host(cn) else cn, len(subscriptions))

    def publish(self, topic: str, payload: bytes | str) -> None:
        assert self.session.publish(topic, payload, qos=1)

    def until(self, topic: str, timeout: float = 10) -> list[Message]:
        """Everything received up to and including the first message on ``topic``."""
        seen: list[Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.got.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(msg)
            if msg.topic == topic:
                return seen
        raise AssertionError(f"nothing arrived on {topic}; got {[m.topic for m in seen]}")

    def close(self) -> None:
        self.session.close()


def test_a_device_cannot_publish_as_another(broker: FleetBroker) -> None:
    host = Client(
        broker, "_edgectl", *(TOPICS.all_devices(leaf) for leaf in ("reported", "events", "telemetry"))
    )
    attacker = Client(broker, A)
    try:
        for leaf in (TOPICS.reported, TOPICS.events, TOPICS.telemetry):
            attacker.publish(leaf(B), b'{"forged": true}')
        attacker.publish(TOPICS.reported(A), b'{"own": true}')
        attacker.publish(TOPICS.events(A), b'{"sentinel": true}')
        seen = host.until(TOPICS.events(A))
    finally:
        attacker.close()
        host.close()
    assert [m.topic for m in seen] == [TOPICS.reported(A), TOPICS.events(A)]
    assert "Denied PUBLISH from" in broker.log.read_text()


def _bundle(folder: Path) -> tuple[str, int]:
    data = bytes(range(256)) * 64  # 16 KiB: four 4 KiB blocks
    (folder / "x.bundle").write_bytes(data)
    return hashlib.sha256(data).hexdigest(), len(data)


def _request(device: str, sha: str, first: int = 0) -> str:
    return BlockRequest(device=device, sha256=sha, first=first, count=1, block_size=4096).model_dump_json()


def test_a_device_cannot_ask_for_or_answer_another_devices_blocks(
    broker: FleetBroker, tmp_path: Path
) -> None:
    folder = tmp_path / "bundles"
    folder.mkdir()
    sha, size = _bundle(folder)
    # One worker: requests are handled in the order the broker delivers them.
    registry = Registry(broker.config("_registry"), folder, workers=1).start()
    assert registry.session.wait_connected(10)
    victim = Client(broker, B, TOPICS.blocks(B))
    attacker = Client(broker, A, TOPICS.all_devices("blocks"))  # tries to read every device's blocks
    try:
        attacker.publish(TOPICS.registry_get(B), _request(B, sha))  # B's request topic: ACL denies
        attacker.publish(TOPICS.registry_get(A), _request(B, sha))  # own topic, B in the payload
        forged = BlockReply(BlockStatus.NOT_FOUND, sha, 0, 4096, 0, b"no such bundle")
        attacker.publish(TOPICS.blocks(B), forged.pack())  # B's blocks topic: ACL denies
        attacker.publish(TOPICS.registry_get(A), _request(A, sha, first=1))  # its own, honest
        attacker_got = attacker.until(TOPICS.blocks(A))
        victim.publish(TOPICS.registry_get(B), _request(B, sha, first=2))
        victim_got = victim.until(TOPICS.blocks(B))
    finally:
        attacker.close()
        victim.close()
        registry.close()
    # The attacker saw only its own answer, and the victim only the answer to its own request.
    assert [m.topic for m in attacker_got] == [TOPICS.blocks(A)]
    assert BlockReply.unpack(attacker_got[0].payload).index == 1
    assert len(victim_got) == 1
    reply = BlockReply.unpack(victim_got[0].payload)
    assert (reply.status, reply.index, reply.total_size) == (BlockStatus.OK, 2, size)
    # The registry never saw the request on B's topic and refused the one naming B on A's.
    assert (registry.stats.requests, registry.stats.foreign, registry.stats.blocks_served) == (2, 1, 2)


def test_a_device_cannot_knock_another_off_the_broker(broker: FleetBroker) -> None:
    # MQTT lets a new connection with a client id in use take it over. On the device
    # listener the broker replaces every client id with the certificate's CN, so the
    # attacker's connection under the victim agent's id is its own, and the victim stays on.
    host = Client(broker, "_edgectl", TOPICS.all_devices("events"))
    victim = Client(broker, B, client_id=f"edgeagent-{B}")
    attacker = Client(
        broker, A, client_id=f"edgeagent-{B}"
    )  # connected: the takeover, had it happened, is done
    try:
        victim.publish(TOPICS.events(B), b'{"still": "here"}')
        assert [m.topic for m in host.until(TOPICS.events(B))] == [TOPICS.events(B)]
        assert (victim.session.stats.connects, victim.session.stats.disconnects) == (1, 0)
        # Nor can a device certificate use the host listener, where client ids are free.
        sneaky = MqttSession(
            broker.config(A, port=broker.host_port), f"edgeagent-{B}", backoff=Backoff(base_s=0.05, cap_s=0.1)
        )
        with sneaky:
            assert not sneaky.wait_connected(3)
        assert (victim.session.stats.connects, victim.session.stats.disconnects) == (1, 0)
    finally:
        attacker.close()
        victim.close()
        host.close()


def _rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_acl_in_the_docs_is_the_shipped_one() -> None:
    shipped = (Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "edge.acl").read_text()
    page = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    block = page.split("`edge.acl`:\n\n```\n", 1)[1].split("```", 1)[0]
    assert _rules(block) == _rules(shipped)
