"""Desired state: accept signed documents, refuse replays, merge device and group docs.

A desired document comes from ``.../device/{id}/desired`` or ``.../group/{g}/desired``
(both retained). The agent accepts one only if it is signed by a trusted key (or the agent
runs in insecure demo mode), names the target whose topic it came on, and carries a
sequence number newer than the last one accepted for that target. The same document
delivered again (a retained message after a reconnect) is not a refusal, just nothing new.
Accepted sequence numbers are saved, so a restart does not reopen the door to replays.

The effective desired state merges the docs model by model: groups in the order the
configuration lists them (a later group overrides an earlier one), then the device doc,
which wins over every group.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import DowngradeRefused, MalformedMessage, ReplayedDocument
from edgeagent.protocol import BundleRef, DesiredState, Topics, open_envelope, parse
from edgeagent.signing import KeyRing
from edgeagent.storage import atomic_write_bytes

log = logging.getLogger(__name__)


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
    ) -> None:
        self.state_file = state_file
        self.trusted = trusted
        self.device_id = device_id
        self.groups = groups
        self.topics = topics
        self.insecure = insecure
        self.docs: dict[str, DesiredState] = {}
        self.seqs: dict[str, int] = {}
        self._load()

    def _load(self) -> None:
        try:
            body = json.loads(self.state_file.read_bytes())
            self.seqs = {str(k): int(v) for k, v in body.get("seqs", {}).items()}
            self.docs = {k: DesiredState.model_validate(v) for k, v in body.get("docs", {}).items()}
        except FileNotFoundError:
            return
        except (ValueError, TypeError, AttributeError) as exc:
            log.error(
                "desired-state file %s is unreadable (%s); waiting for fresh documents", self.state_file, exc
            )

    def _save(self) -> None:
        body = {"seqs": self.seqs, "docs": {k: v.model_dump(mode="json") for k, v in self.docs.items()}}
        atomic_write_bytes(self.state_file, json.dumps(body, indent=2).encode())

    def target_of(self, topic: str) -> str:
        if topic == self.topics.device_desired(self.device_id):
            return f"device:{self.device_id}"
        for group in self.groups:
            if topic == self.topics.group_desired(group):
                return f"group:{group}"
        raise MalformedMessage(f"desired document on an unexpected topic {topic}")

    def offer(self, topic: str, payload: bytes) -> DesiredState | None:
        """Check a document; return it when it is new, None when it is the one we have.

        Raises MalformedMessage, a SignatureError, or ReplayedDocument.
        """
        target = self.target_of(topic)
        opened = open_envelope(payload, self.trusted, insecure=self.insecure)
        if opened.key_id is None:
            log.warning("INSECURE: accepted an unsigned desired document for %s", target)
        doc = parse(DesiredState, opened.payload, "desired document")
        if doc.target != target:
            raise MalformedMessage(f"document for {doc.target!r} arrived on the topic of {target!r}")
        last = self.seqs.get(target, 0)
        if doc.seq < last or (doc.seq == last and self.docs.get(target) != doc):
            raise ReplayedDocument(f"{target}: sequence {doc.seq} is not newer than {last}")
        if doc.seq == last:
            return None
        self.seqs[target] = doc.seq
        self.docs[target] = doc
        self._save()
        return doc

    def accept_command_seq(self, seq: int) -> None:
        """Record a command's sequence number; raise ReplayedDocument unless it is newer."""
        key = f"cmd:{self.device_id}"
        last = self.seqs.get(key, 0)
        if seq <= last:
            raise ReplayedDocument(f"command sequence {seq} is not newer than {last}")
        self.seqs[key] = seq
        self._save()

    def effective(self) -> dict[str, Wanted]:
        wanted: dict[str, Wanted] = {}
        sources = [f"group:{g}" for g in self.groups] + [f"device:{self.device_id}"]
        for source in sources:
            doc = self.docs.get(source)
            if doc is None:
                continue
            for name, ref in doc.models.items():
                wanted[name] = Wanted(ref, doc.rollback, source, doc.seq)
        return wanted


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
