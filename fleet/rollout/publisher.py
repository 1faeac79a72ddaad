"""Per-device signed desired documents, many at a time, through :func:`fleet.push.publish_desired`.

``publish_desired`` publishes the model's own document for a device with a sequence above a
floor; left to itself it finds the floor by reading the device's retained documents and every
device's reported state, a settle of a second or two per device: an hour for a large rollout.
:class:`Publisher` reads those once (two wildcard subscriptions), keeps each device's floor,
raises it with every document it publishes, and hands it to ``publish_desired``; signing, the
topic and the sequence rule stay those of :mod:`fleet.push`.
"""

from __future__ import annotations

import json
import logging
import time

from edgeagent.desired import SEQ_FUTURE_ALLOWANCE_MS
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import BundleRef, Reported, Topics
from edgeagent.signing import SigningKey
from fleet.push import FleetConnection, Target, publish_desired

log = logging.getLogger(__name__)


def _seq_of(envelope: bytes) -> int:
    # Only the seq is needed (a floor), so the signature is not checked here; the devices do.
    try:
        seq = json.loads(json.loads(envelope)["payload"]).get("seq")
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0
    return seq if type(seq) is int else 0


def read_floors(conn: FleetConnection, settle_s: float = 2.0) -> dict[str, int]:
    """Per device, the highest seq a new document must exceed: its retained documents (its own
    and every model's) and what it reports having accepted; seqs too far ahead of this clock
    are ignored (a device refuses those anyway), as :func:`fleet.push.seq_floor` does."""
    limit = int(time.time() * 1000) + SEQ_FUTURE_ALLOWANCE_MS
    floors: dict[str, int] = {}

    def raise_to(device: str | None, seq: int) -> None:
        if device is not None and seq <= limit:
            floors[device] = max(floors.get(device, 0), seq)

    for topic, payload in conn.retained(conn.topics.all_devices("desired") + "/#", settle_s).items():
        raise_to(conn.topics.device_of(topic), _seq_of(payload))
    for topic, payload in conn.retained(conn.topics.all_devices("reported"), settle_s).items():
        try:
            accepted = Reported.model_validate_json(payload).desired_seq
        except ValueError:
            continue
        device = conn.topics.device_of(topic)
        for key, seq in accepted.items():
            if key == f"device:{device}" or key.startswith(f"device:{device}/"):
                raise_to(device, seq)
    return floors


class Publisher:
    """Publishes one model's bundle to devices, one signed device document each."""

    def __init__(self, conn: FleetConnection, key: SigningKey, model: str, floors: dict[str, int]) -> None:
        self.conn = conn
        self.key = key
        self.model = model
        self.floors = floors  # shared by the publishers of one connection

    def publish(self, device: str, ref: BundleRef, *, rollback: bool = False) -> int:
        """Publish and return the document's sequence number."""
        floor = self.floors.get(device, 0)
        published = publish_desired(
            self.conn, Target("device", device), self.model, ref, self.key, rollback=rollback, floor=floor
        )
        self.floors[device] = max(floor, published.seq)
        return published.seq


def connect(
    broker: BrokerConfig, topics: Topics, client_id: str | None = None
) -> tuple[FleetConnection, dict[str, int]]:
    """A connected :class:`FleetConnection` and every device's sequence floor."""
    conn = FleetConnection(broker, topics, client_id or f"edgectl-rollout-{time.monotonic_ns()}")
    conn.__enter__()
    floors = read_floors(conn)
    log.info("read the sequence floors of %d devices", len(floors))
    return conn, floors
