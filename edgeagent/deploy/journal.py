"""The typed journal of one model name's deployment, saved atomically before every step.

Besides the state and target of the deployment in progress it keeps what must survive a
restart to stop a device from looping: how many times the target was started (the loop
breaker), when a transient failure may be retried, and the documents that failed for good
(``failed``) so a restart does not re-run a bundle that acceptance already refused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.deploy.machine import State
from edgeagent.protocol import BundleRef
from edgeagent.storage import atomic_write_bytes

log = logging.getLogger(__name__)

MAX_FAILED = 32  # failed documents remembered per model name (oldest forgotten first)


@dataclass(frozen=True)
class DocKey:
    """One desired document's request for one model: a newer doc naming the same bundle is new."""

    sha256: str
    source: str  # 'device:ID', 'group:NAME', or 'journal' for a resumed deployment
    seq: int


@dataclass(frozen=True)
class Failed:
    """A document that is not deployed again until a newer one (or ``command refresh``) comes."""

    key: DocKey
    code: str


@dataclass
class Journal:
    """What one model name's deployment is doing, saved before each step."""

    model: str
    state: State = State.IDLE
    target: BundleRef | None = None
    previous: str | None = None  # the sha256 that was current when the deployment started
    doc: DocKey | None = None  # the document that asked for target
    reason: str = ""
    code: str = ""
    attempts: int = 0  # starts and resumes of target's deployment (the loop breaker counts them)
    retry_at: float = 0.0  # unix time before which a transient failure of target is not retried
    failed: list[Failed] = field(default_factory=list)
    updated: float = 0.0

    def start(self, target: BundleRef, doc: DocKey, *, previous: str | None) -> None:
        """Begin deploying ``target``; attempts carry over only while the document stays the same
        (a retry, a resume), so a newer push gets a fresh count."""
        if self.doc != doc:
            self.attempts = 0
        self.retry_at = 0.0
        self.target, self.doc, self.previous = target, doc, previous
        self.code, self.reason = "", ""

    def is_failed(self, key: DocKey) -> bool:
        return any(f.key == key for f in self.failed)

    def mark_failed(self, key: DocKey, code: str) -> None:
        self.failed = [*[f for f in self.failed if f.key != key][-(MAX_FAILED - 1) :], Failed(key, code)]

    def clear_failed(self, sha256: str) -> bool:
        """Forget failures of ``sha256`` (``command refresh``); True if there were any."""
        before = len(self.failed)
        self.failed = [f for f in self.failed if f.key.sha256 != sha256]
        cleared = len(self.failed) != before
        if self.target is not None and self.target.sha256 == sha256 and (self.attempts or self.retry_at):
            self.attempts, self.retry_at, cleared = 0, 0.0, True
        return cleared

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "state": self.state.value,
            "target": self.target.model_dump() if self.target else None,
            "previous": self.previous,
            "doc": _key_json(self.doc) if self.doc else None,
            "reason": self.reason,
            "code": self.code,
            "attempts": self.attempts,
            "retry_at": self.retry_at,
            "failed": [{**_key_json(f.key), "code": f.code} for f in self.failed],
            "updated": self.updated,
        }
        return json.dumps(body, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Journal:
        body = json.loads(data)
        return cls(
            model=str(body["model"]),
            state=State(body["state"]),
            target=BundleRef.model_validate(body["target"]) if body.get("target") else None,
            previous=body.get("previous"),
            doc=_key(body["doc"]) if body.get("doc") else None,
            reason=str(body.get("reason", "")),
            code=str(body.get("code", "")),
            attempts=int(body.get("attempts", 0)),
            retry_at=float(body.get("retry_at", 0.0)),
            failed=[Failed(_key(f), str(f["code"])) for f in body.get("failed", [])],
            updated=float(body.get("updated", 0.0)),
        )


def _key_json(key: DocKey) -> dict[str, Any]:
    return {"sha256": key.sha256, "source": key.source, "seq": key.seq}


def _key(body: dict[str, Any]) -> DocKey:
    return DocKey(str(body["sha256"]), str(body["source"]), int(body["seq"]))


class JournalFile:
    def __init__(self, folder: Path, model: str) -> None:
        self.path = folder / f"{model}.json"
        self.model = model

    def load(self) -> Journal:
        try:
            return Journal.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return Journal(self.model)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # A journal we cannot read is treated as "nothing in progress": the links on
            # disk still say what is active, and the desired state will be reconciled again.
            log.error("journal %s is unreadable (%s); starting from idle", self.path, exc)
            return Journal(self.model)

    def save(self, journal: Journal) -> None:
        journal.updated = time.time()
        atomic_write_bytes(self.path, journal.to_json())


def journal_names(folder: Path) -> list[str]:
    """Model names that have a journal in ``folder``."""
    try:
        return sorted(p.stem for p in folder.glob("*.json"))
    except OSError:
        return []
