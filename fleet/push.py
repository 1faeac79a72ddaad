"""Host side of a deployment: put a bundle in the registry, publish signed desired state,
follow the devices until they report the outcome; roll back the same way."""

from __future__ import annotations

import json
import logging
import queue
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeagent.bundle.reader import VerifiedBundle, verify_bundle
from edgeagent.desired import SEQ_FUTURE_ALLOWANCE_MS
from edgeagent.errors import EdgeError, UsageError
from edgeagent.mqtt import BrokerConfig, Message, MqttSession
from edgeagent.protocol import (
    BundleRef,
    DesiredState,
    Reported,
    Topics,
    sign_document,
)
from edgeagent.signing import KeyRing, SigningKey
from edgeagent.storage import atomic_writer, hash_file

log = logging.getLogger(__name__)


class PushError(EdgeError):
    """A push or rollback could not be completed; the message says what happened."""


@dataclass(frozen=True)
class Target:
    kind: str  # "device" | "group"
    name: str

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    def desired_topic(self, topics: Topics) -> str:
        return topics.device_desired(self.name) if self.kind == "device" else topics.group_desired(self.name)

    def model_topic(self, topics: Topics, model: str) -> str:
        """The model's own desired doc (docs/protocol.md)."""
        if self.kind == "device":
            return topics.device_desired_model(self.name, model)
        return topics.group_desired_model(self.name, model)


@dataclass(frozen=True)
class Result:
    device: str
    ok: bool
    detail: str
    status: str = "committed"  # committed | failed | refused | superseded | timeout (docs/cli.md)


class FleetConnection:
    """A short-lived MQTT session for host commands, with helpers to read retained state."""

    def __init__(self, broker: BrokerConfig, topics: Topics, client_id: str) -> None:
        self.topics = topics
        self.session = MqttSession(broker, client_id, connect_log_level=logging.DEBUG)
        self.inbox: queue.Queue[Message] = queue.Queue()

    def __enter__(self) -> FleetConnection:
        self.session.start()
        if not self.session.wait_connected(10):
            self.session.close()
            reason = self.session.last_connect_error or "no answer"
            raise PushError(f"cannot connect to the broker at {self.session.broker.url} ({reason})")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.session.close()

    def subscribe(self, topic_filter: str) -> None:
        self.session.subscribe(topic_filter, self.inbox.put, max_bytes=1 << 20)

    def retained(self, topic_filter: str, settle_s: float = 1.0) -> dict[str, bytes]:
        """Retained messages on ``topic_filter`` (topic -> payload), collected for ``settle_s``."""
        found: dict[str, bytes] = {}
        box: queue.Queue[Message] = queue.Queue()
        self.session.subscribe(topic_filter, box.put, max_bytes=1 << 20)
        deadline = time.monotonic() + settle_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = box.get(timeout=left)
            except queue.Empty:
                break
            if msg.retain:
                found[msg.topic] = msg.payload
        return found


def verify_own_bundle(bundle: Path, key: SigningKey) -> VerifiedBundle:
    """The bundle must be intact and signed by the key we push with."""
    ring = KeyRing([key.private.public_key()])
    return verify_bundle(bundle, ring)


def check_registry(registry_dir: Path) -> None:
    """UsageError unless ``registry_dir`` is a folder (checked before anything is connected or copied)."""
    if not registry_dir.is_dir():
        raise UsageError(f"{registry_dir}: no such registry folder")


def add_to_registry(bundle: Path, verified: VerifiedBundle, registry_dir: Path) -> Path:
    """Copy the bundle into the registry folder (atomically) unless it is already there."""
    check_registry(registry_dir)
    dest = registry_dir / verified.manifest.bundle_filename
    if dest.exists():
        if hash_file(dest)[1] == verified.sha256:
            return dest
        raise UsageError(f"{dest} holds a different bundle with the same name and version; bump the version")
    with bundle.open("rb") as src, atomic_writer(dest) as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


def next_seq(previous: int, *, reset: bool = False, jitter: bool = True) -> int:
    """The seq of a new desired doc: milliseconds since the epoch, never below ``previous`` + 1.

    Milliseconds increase across hosts without coordination; a random sub-second offset keeps
    concurrent pushes (several processes in the same millisecond, or all of them at
    ``previous`` + 1 while a device's seq is ahead of the clock) from sharing one seq. A
    ``reset`` doc takes the clock as it is: its purpose is to bring a stored seq back down.
    Commands, which have no ``previous`` to read, go without the offset (``jitter=False``):
    with it, a command sent right after another could draw a lower seq and be refused.
    """
    now = int(time.time() * 1000)
    offset = secrets.randbelow(1000) if jitter else 0
    if reset:
        return now + offset
    seq = max(previous + 1, now) + offset
    if seq > now + SEQ_FUTURE_ALLOWANCE_MS:
        ahead_h = (previous - now) / 3_600_000
        raise PushError(
            f"the newest seq for this target ({previous}) is {ahead_h:.1f} h ahead of this host's clock, "
            "so devices would refuse the next one (seq_in_future); push with --reset-seq (docs/protocol.md)"
        )
    return seq


@dataclass(frozen=True)
class Published:
    """A desired doc as published: where, its exact bytes, and the doc."""

    topic: str
    payload: bytes
    doc: DesiredState

    @property
    def seq(self) -> int:
        return self.doc.seq


def seq_floor(conn: FleetConnection, target: Target, reported: dict[str, bytes] | None = None) -> int:
    """The highest seq a new doc for ``target``'s models must exceed: the retained docs of the
    target (its own doc and every model's) and what its devices report having accepted.

    Retained docs are read without their signatures (only their seq is used), and a seq too far
    ahead of this clock is ignored: a device would have refused that doc anyway.
    """
    limit = int(time.time() * 1000) + SEQ_FUTURE_ALLOWANCE_MS
    seqs = [0]
    base = target.desired_topic(conn.topics)
    for payload in conn.retained(f"{base}/#").values():
        seqs.append(_seq_of(payload))
    if reported is None:
        reported = conn.retained(conn.topics.all_devices("reported"))
    for payload in reported.values():
        try:
            accepted = Reported.model_validate_json(payload).desired_seq
        except ValueError:
            continue
        seqs += [seq for key, seq in accepted.items() if key == target.id or key.startswith(target.id + "/")]
    return max(seq for seq in seqs if seq <= limit)


def _seq_of(envelope: bytes) -> int:
    try:
        seq = json.loads(json.loads(envelope)["payload"]).get("seq")
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0
    return seq if type(seq) is int else 0


def publish_desired(
    conn: FleetConnection,
    target: Target,
    model: str,
    ref: BundleRef,
    key: SigningKey,
    *,
    rollback: bool = False,
    reset_seq: bool = False,
    floor: int | None = None,
) -> Published:
    """Publish ``model -> ref`` as the model's own desired doc for ``target``, signed, retained.

    One doc per model: a concurrent push of another model cannot drop this entry, as a
    read-merge-publish of one shared doc could. ``floor`` (default: :func:`seq_floor`) is the
    seq the new one must exceed.
    """
    if floor is None:
        floor = seq_floor(conn, target)
    doc = DesiredState(
        seq=next_seq(floor, reset=reset_seq),
        target=target.id,
        models={model: ref},
        rollback=rollback,
        reset_seq=reset_seq,
    )
    topic = target.model_topic(conn.topics, model)
    payload = sign_document(doc, key)
    if not conn.session.publish(topic, payload, qos=1, retain=True):
        raise PushError("lost the broker connection while publishing the desired doc")
    return Published(topic, payload, doc)


def devices_of(conn: FleetConnection, target: Target, reported: dict[str, bytes] | None = None) -> list[str]:
    """The devices a push to ``target`` concerns (a group's: those whose reported state lists it)."""
    if target.kind == "device":
        return [target.name]
    if reported is None:
        reported = conn.retained(conn.topics.all_devices("reported"))
    found = []
    for topic, payload in reported.items():
        try:
            state = Reported.model_validate_json(payload)
        except ValueError:
            continue
        if target.name in state.groups:
            found.append(conn.topics.device_of(topic) or state.device)
    return sorted(found)


def wait_for(
    conn: FleetConnection,
    devices: list[str],
    model: str,
    ref: BundleRef,
    timeout_s: float,
    say: Callable[[str], None],
) -> list[Result]:
    """Follow events and reported state until every device has an outcome for ``ref``.

    Subscribes only now: a refusal sent before this call is missed. ``edgectl push`` uses
    :class:`fleet.follow.Follower`, which subscribes before publishing and attributes
    refusals by seq.
    """
    from fleet.follow import Follower

    return Follower(conn, devices, model, ref, say).follow(None, timeout_s)
