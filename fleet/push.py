"""Host side of a deployment: put a bundle in the registry, publish signed desired state,
follow the devices until they report the outcome; roll back the same way."""

from __future__ import annotations

import logging
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeagent.bundle.reader import VerifiedBundle, verify_bundle
from edgeagent.errors import EdgeError, MalformedMessage, SignatureError, UsageError
from edgeagent.mqtt import BrokerConfig, Message, MqttSession
from edgeagent.protocol import (
    BundleRef,
    DesiredState,
    Event,
    Reported,
    Topics,
    open_envelope,
    parse,
    sign_document,
    verdict_in,
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


@dataclass(frozen=True)
class Result:
    device: str
    ok: bool
    detail: str


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


def _next_seq(previous: int) -> int:
    # Milliseconds since the epoch: increases across hosts without coordination, and
    # never below the last published doc's seq + 1.
    return max(previous + 1, int(time.time() * 1000))


def read_desired(conn: FleetConnection, target: Target, public: Ed25519PublicKey) -> DesiredState | None:
    """The target's retained desired doc, checked against our key (None when there is none)."""
    payload = conn.retained(target.desired_topic(conn.topics)).get(target.desired_topic(conn.topics))
    if not payload:
        return None
    try:
        opened = open_envelope(payload, KeyRing([public]), insecure=True)
    except SignatureError as exc:
        raise PushError(
            f"the desired doc of {target.id} is signed by another key ({exc}); push with that key"
        ) from exc
    except MalformedMessage as exc:
        raise PushError(f"the retained desired doc of {target.id} is unreadable: {exc}") from exc
    return parse(DesiredState, opened.payload, "desired document")


def publish_desired(
    conn: FleetConnection,
    target: Target,
    model: str,
    ref: BundleRef,
    key: SigningKey,
    *,
    rollback: bool = False,
) -> DesiredState:
    """Merge ``model -> ref`` into the target's desired doc and publish it, signed, retained."""
    current = read_desired(conn, target, key.private.public_key())
    models = dict(current.models) if current else {}
    models[model] = ref
    doc = DesiredState(
        seq=_next_seq(current.seq if current else 0), target=target.id, models=models, rollback=rollback
    )
    payload = sign_document(doc, key)
    if not conn.session.publish(target.desired_topic(conn.topics), payload, qos=1, retain=True):
        raise PushError("lost the broker connection while publishing the desired doc")
    return doc


def devices_of(conn: FleetConnection, target: Target) -> list[str]:
    if target.kind == "device":
        return [target.name]
    found = []
    for topic, payload in conn.retained(conn.topics.all_devices("reported")).items():
        try:
            reported = Reported.model_validate_json(payload)
        except ValueError:
            continue
        if target.name in reported.groups:
            found.append(conn.topics.device_of(topic) or reported.device)
    return sorted(found)


def wait_for(
    conn: FleetConnection,
    devices: list[str],
    model: str,
    ref: BundleRef,
    timeout_s: float,
    say: Callable[[str], None],
) -> list[Result]:
    """Follow events and reported state until every device has an outcome for ``ref``."""
    pending = set(devices)
    results: dict[str, Result] = {}
    for device in devices:
        conn.subscribe(conn.topics.events(device))
        conn.subscribe(conn.topics.reported(device))
    deadline = time.monotonic() + timeout_s
    last_pct: dict[str, int] = {}
    while pending and (left := deadline - time.monotonic()) > 0:
        try:
            msg = conn.inbox.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        who = conn.topics.device_of(msg.topic)
        if who is None or who not in pending:
            continue
        if msg.topic.endswith("/reported"):
            try:
                reported = Reported.model_validate_json(msg.payload)
            except ValueError:
                continue
            status = reported.models.get(model)
            if status and status.bundle and status.bundle.sha256 == ref.sha256 and status.state == "idle":
                results[who] = Result(who, True, f"active on {status.runtime}/{status.delegate}")
                pending.discard(who)
            continue
        try:
            event = Event.model_validate_json(msg.payload)
        except ValueError:
            continue
        if event.bundle is not None and event.bundle.sha256 != ref.sha256:
            continue
        if event.kind == "progress" and event.total:
            pct = int(100 * (event.received or 0) / event.total)
            if pct // 10 != last_pct.get(who, -1) // 10:
                last_pct[who] = pct
                say(f"{who}: downloading {pct}%")
        elif event.kind == "state":
            say(f"{who}: {event.state}")
        elif event.kind in ("outcome", "refused") and event.ok is not True and event.model in (model, None):
            results[who] = Result(who, False, f"{event.code}: {event.reason}")
            pending.discard(who)
        elif event.kind == "outcome" and event.ok:
            verdict = verdict_in(event.detail)
            checks = ", ".join(
                f"{c.name} {c.value:.4g} (bound {c.op} {c.bound:.4g})"
                for c in (verdict.checks if verdict is not None else [])
                if c.value is not None
            )
            results[who] = Result(who, True, f"committed; acceptance: {checks or 'no bounds'}")
            pending.discard(who)
    for device in pending:
        results[device] = Result(device, False, f"no outcome within {timeout_s:.0f} s")
    return [results[d] for d in devices]
