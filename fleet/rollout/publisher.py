"""Per-device signed desired documents, many at a time, through :func:`fleet.push.publish_desired`.

``publish_desired`` reads the target's retained document before it merges and signs the new
one (so other models on the device keep theirs and the sequence only grows). Read one by one,
that costs a one-second settle per device: an hour for a large rollout. :class:`CachedConnection`
reads every device's retained document once, with one wildcard subscription, answers
``publish_desired``'s reads from that copy, and keeps the copy up to date with what it
publishes; the merge, sequence and signing rules stay those of :mod:`fleet.push`.
"""

from __future__ import annotations

import logging
import time

from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import BundleRef, DesiredState, Topics, sign_document
from edgeagent.signing import SigningKey
from fleet.push import FleetConnection, Target, publish_desired

log = logging.getLogger(__name__)


class CachedConnection(FleetConnection):
    """A :class:`FleetConnection` whose device desired documents are read once and cached."""

    def __init__(self, broker: BrokerConfig, topics: Topics, client_id: str) -> None:
        super().__init__(broker, topics, client_id)
        self._docs: dict[str, bytes] | None = None

    def preload(self, settle_s: float = 2.0) -> int:
        """Read every device's retained desired document; returns how many there were."""
        self._docs = dict(super().retained(self.topics.all_devices("desired"), settle_s))
        return len(self._docs)

    def retained(self, topic_filter: str, settle_s: float = 1.0) -> dict[str, bytes]:
        # Only one device's desired topic is served from the copy; anything else is read live.
        one_doc = "+" not in topic_filter and topic_filter.endswith("/desired")
        if self._docs is not None and one_doc and self.topics.device_of(topic_filter) is not None:
            payload = self._docs.get(topic_filter)
            return {topic_filter: payload} if payload else {}
        return super().retained(topic_filter, settle_s)

    def remember(self, topic: str, doc: DesiredState, key: SigningKey) -> None:
        if self._docs is not None:
            self._docs[topic] = sign_document(doc, key)


class Publisher:
    """Publishes one model's bundle to devices, one signed device document each."""

    def __init__(self, conn: CachedConnection, key: SigningKey, model: str) -> None:
        self.conn = conn
        self.key = key
        self.model = model

    def publish(self, device: str, ref: BundleRef, *, rollback: bool = False) -> int:
        """Publish and return the document's sequence number."""
        target = Target("device", device)
        doc = publish_desired(self.conn, target, self.model, ref, self.key, rollback=rollback)
        self.conn.remember(target.desired_topic(self.conn.topics), doc, self.key)
        return doc.seq


def connect(broker: BrokerConfig, topics: Topics, client_id: str | None = None) -> CachedConnection:
    conn = CachedConnection(broker, topics, client_id or f"edgectl-rollout-{time.monotonic_ns()}")
    conn.__enter__()
    count = conn.preload()
    log.info("read %d retained device desired documents", count)
    return conn
