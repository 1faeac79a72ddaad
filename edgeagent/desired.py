"""Desired state: accept signed documents, refuse replays, merge device and group docs.

A desired document comes from ``.../device/{id}/desired`` or ``.../group/{g}/desired``
(both retained), or from one model's own topic below them (``.../desired/{model}``, which
``edgectl push`` writes so that concurrent pushes of different models never overwrite each
other). The agent accepts one only if it is signed by a trusted key (or the agent runs in
insecure demo mode), names the target whose topic it came on (and, on a model's topic,
carries exactly that model), and carries a sequence number newer than the last one accepted
for that topic but not further ahead of the device clock than ``SEQ_FUTURE_ALLOWANCE_MS``.
The same document delivered again (a retained message after a reconnect) is not a refusal,
just nothing new. Accepted sequence numbers are saved, so a restart does not reopen the door
to replays. A signed document with ``reset_seq`` lowers a stored seq that is stuck ahead of
the clock; each reset must be newer than the last reset, so a reset cannot be replayed.

The effective desired state merges the docs model by model: groups in the order the
configuration lists them (a later group overrides an earlier one), then the device doc,
which wins over every group. Within one target, the newest seq names a model's bundle,
whether it came in the target's doc or in the model's own doc.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import (
    DowngradeRefused,
    EdgeError,
    MalformedMessage,
    ReplayedDocument,
    SeqInFuture,
)
from edgeagent.protocol import BundleRef, DesiredState, Topics, open_envelope, parse
from edgeagent.signing import KeyRing
from edgeagent.storage import atomic_write_bytes

log = logging.getLogger(__name__)

# How far a seq may be ahead of the device clock (ms). edgectl uses milliseconds since the
# epoch, so this is the clock skew tolerated between a host and a device; a signed document
# further ahead would lock out every later push until the clock caught up with it.
SEQ_FUTURE_ALLOWANCE_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Wanted:
    """What one model name should run, and which document said so."""

    bundle: BundleRef
    rollback: bool
    source: str  # 'device:ID' or 'group:NAME'
    seq: int


class DesiredTracker:
    def __init__(
        self,
        state_file: Path,
        trusted: KeyRing,
        *,
        device_id: str,
        groups: list[str],
        topics: Topics,
        insecure: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_file = state_file
        self.trusted = trusted
        self.device_id = device_id
        self.groups = groups
        self.topics = topics
        self.insecure = insecure
        self.clock = clock
        # Keys: 'device:ID' / 'group:G' (a target's doc), 'device:ID/MODEL' (a model's own doc),
        # 'cmd:ID' (commands).
        self.docs: dict[str, DesiredState] = {}
        self.seqs: dict[str, int] = {}
        self.resets: dict[str, int] = {}  # key -> seq of the last accepted reset
        # Documents refused only for being ahead of the clock: offered again by effective()
        # (a device that boots with a stale clock accepts them once NTP has set it).
        self.deferred: dict[str, tuple[str, bytes]] = {}
        # offer() runs on the MQTT handler thread, effective() (which may accept a deferred
        # doc) on the deployer's: one lock keeps the maps consistent between them.
        self._lock = threading.RLock()
        self._load()

    def _load(self) -> None:
        try:
            body = json.loads(self.state_file.read_bytes())
            self.seqs = {str(k): int(v) for k, v in body.get("seqs", {}).items()}
            self.resets = {str(k): int(v) for k, v in body.get("resets", {}).items()}
            self.docs = {k: DesiredState.model_validate(v) for k, v in body.get("docs", {}).items()}
        except FileNotFoundError:
            return
        except (ValueError, TypeError, AttributeError) as exc:
            log.error(
                "desired-state file %s is unreadable (%s); waiting for fresh documents", self.state_file, exc
            )

    def _save(self) -> None:
        body = {
            "seqs": self.seqs,
            "resets": self.resets,
            "docs": {k: v.model_dump(mode="json") for k, v in self.docs.items()},
        }
        atomic_write_bytes(self.state_file, json.dumps(body, indent=2).encode())

    def topic_filters(self) -> list[str]:
        """Every topic the agent subscribes to for desired docs (targets' and models' own)."""
        bases = [self.topics.device_desired(self.device_id)]
        bases += [self.topics.group_desired(g) for g in self.groups]
        return bases + [f"{b}/+" for b in bases]

    def target_of(self, topic: str) -> tuple[str, str | None]:
        """('device:ID' or 'group:G', the model of a model's own topic or None)."""
        base, _, model = topic.rpartition("/")
        for candidate, name in ((topic, None), (base, model)):
            if candidate == self.topics.device_desired(self.device_id):
                return f"device:{self.device_id}", name
            for group in self.groups:
                if candidate == self.topics.group_desired(group):
                    return f"group:{group}", name
        raise MalformedMessage(f"desired document on an unexpected topic {topic}")

    def offer(self, topic: str, payload: bytes) -> DesiredState | None:
        """Check a document; return it when it is new, None when it is the one we have.

        Raises MalformedMessage, a SignatureError, ReplayedDocument or SeqInFuture.
        """
        with self._lock:
            return self._offer(topic, payload)

    def _offer(self, topic: str, payload: bytes) -> DesiredState | None:
        target, model = self.target_of(topic)
        key = target if model is None else f"{target}/{model}"
        opened = open_envelope(payload, self.trusted, insecure=self.insecure)
        if opened.key_id is None:
            log.warning("INSECURE: accepted an unsigned desired document for %s", target)
        doc = parse(DesiredState, opened.payload, "desired document")
        if doc.target != target:
            raise MalformedMessage(f"document for {doc.target!r} arrived on the topic of {target!r}")
        if model is not None and set(doc.models) != {model}:
            raise MalformedMessage(f"the document on {model!r}'s own topic must carry exactly that model")
        if doc.seq == self.seqs.get(key) and self.docs.get(key) == doc:
            return None
        # A target's doc speaks for all its models: it must be newer than each model's own doc;
        # a model's doc, newer than its target's doc (other models' docs do not matter, so
        # concurrent pushes of different models never refuse each other).
        if model is None:
            related = [seq for k, seq in self.seqs.items() if k == key or k.startswith(key + "/")]
        else:
            related = [self.seqs.get(key, 0), self.seqs.get(target, 0)]
        try:
            self._check_seq(key, doc.seq, reset=doc.reset_seq, last=max(related, default=0))
        except SeqInFuture:
            self.deferred[key] = (topic, payload)
            raise
        self.deferred.pop(key, None)
        self.docs[key] = doc
        self._save()
        return doc

    def accept_command_seq(self, seq: int, *, reset: bool = False) -> None:
        """Record a command's sequence number; raise ReplayedDocument unless it is newer."""
        with self._lock:
            self._check_seq(f"cmd:{self.device_id}", seq, reset=reset, what="command")
            self._save()

    def _check_seq(
        self, key: str, seq: int, *, reset: bool, what: str = "document", last: int | None = None
    ) -> None:
        """Refuse a seq ahead of the clock or not newer than ``last`` (default: the key's); else record it."""
        last = self.seqs.get(key, 0) if last is None else last
        limit = int(self.clock() * 1000) + SEQ_FUTURE_ALLOWANCE_MS
        if seq > limit:
            ahead_h = (seq - limit + SEQ_FUTURE_ALLOWANCE_MS) / 3_600_000
            raise SeqInFuture(
                f"{key}: {what} sequence {seq} is {ahead_h:.1f} h ahead of this device's clock "
                f"(at most {SEQ_FUTURE_ALLOWANCE_MS / 3_600_000:.0f} h allowed)",
                seq=seq,
                last=last,
            )
        if reset:
            mark = self.resets.get(key, 0)
            if seq <= mark:
                raise ReplayedDocument(
                    f"{key}: reset to sequence {seq} is not newer than the last reset ({mark})",
                    seq=seq,
                    last=last,
                )
            if seq < last:
                log.warning("%s: signed reset of the sequence from %d to %d", key, last, seq)
            self.resets[key] = seq
        elif seq <= last:
            raise ReplayedDocument(
                f"{key}: {what} sequence {seq} is not newer than {last}", seq=seq, last=last
            )
        self.seqs[key] = seq

    def retry_deferred(self) -> list[DesiredState]:
        """Offer again the documents that were ahead of the clock; return those now accepted."""
        accepted = []
        for topic, payload in list(self.deferred.values()):
            try:
                doc = self.offer(topic, payload)
            except EdgeError as exc:
                log.debug("deferred desired document on %s still refused: %s", topic, exc)
                continue
            if doc is not None:
                log.info("accepted deferred desired document %s seq %d", doc.target, doc.seq)
                accepted.append(doc)
        return accepted

    def effective(self) -> dict[str, Wanted]:
        with self._lock:
            return self._effective()

    def _effective(self) -> dict[str, Wanted]:
        if self.deferred:
            self.retry_deferred()
        wanted: dict[str, Wanted] = {}
        sources = [f"group:{g}" for g in self.groups] + [f"device:{self.device_id}"]
        for source in sources:
            # The target's doc and its models' own docs, oldest first: the newest names a model.
            docs = sorted(
                (doc for key, doc in self.docs.items() if key == source or key.startswith(source + "/")),
                key=lambda d: d.seq,
            )
            for doc in docs:
                for name, ref in doc.models.items():
                    wanted[name] = Wanted(ref, doc.rollback, source, doc.seq)
        return wanted


def payload_digest(payload: bytes) -> str:
    """First 32 hex digits of the sha256 of a message as it travelled."""
    return hashlib.sha256(payload).hexdigest()[:32]


_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+.*)?$")


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key with semver precedence (a pre-release sorts before its release)."""
    match = _SEMVER.match(version)
    if not match:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, pre = match.groups()
    if pre is None:
        return int(major), int(minor), int(patch), 1, ()
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return int(major), int(minor), int(patch), 0, parts


def check_not_downgrade(wanted: Wanted, current_version: str | None) -> None:
    """Refuse a lower version than what runs unless the document is a signed rollback."""
    if current_version is None or wanted.rollback:
        return
    if semver_key(wanted.bundle.version) < semver_key(current_version):
        raise DowngradeRefused(
            f"{wanted.bundle.name} {wanted.bundle.version} is older than the running {current_version}; "
            "push it with --rollback to allow that"
        )


def refusal_detail(topic: str, payload: bytes, exc: Exception) -> dict[str, object]:
    """What a ``refused`` event carries besides the code: the topic, a digest of the exact
    message (a pusher matches it against what it published: a forged message cannot pass for
    its own), and the refused seq and the device's last seq where known. The seq of a document
    refused before its signature was checked is a hint only."""
    detail: dict[str, object] = {"topic": topic, "digest": payload_digest(payload)}
    seq, last = getattr(exc, "seq", None), getattr(exc, "last", None)
    if seq is None:
        try:
            body = json.loads(json.loads(payload)["payload"])
            hint = body.get("seq")
            seq = hint if type(hint) is int else None
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    if seq is not None:
        detail["seq"] = seq
    if last is not None:
        detail["last"] = last
    return detail
