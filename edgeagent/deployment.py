"""The deployment state machine of one model name: one transition table, one journal.

::

    idle -> downloading -> verifying -> installing -> validating -> activating -> committed -> idle
                 \\______________\\____________\\____________\\____________\\--> rolling_back -> idle

The journal is written atomically *before* each step that changes the device, so after a
crash :func:`resume_state` maps what was saved to a safe state to run again: every step is
idempotent (a download resumes from its bitmap, extraction is all-or-nothing, acceptance is
re-run, activation and rollback rewrite the same links). An event with no transition is a
bug: :class:`IllegalTransition` ends the process so systemd restarts it into the journal.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.errors import EdgeError
from edgeagent.protocol import BundleRef
from edgeagent.storage import atomic_write_bytes

log = logging.getLogger(__name__)

# Not EDGEAGENT_*: those are configuration settings, and the config refuses unknown ones.
CRASH_ENV = "EDGE_TEST_CRASH_AT"


class State(str, enum.Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"


class Event(str, enum.Enum):
    DEPLOY = "deploy"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    ACCEPTED = "accepted"
    ACTIVATED = "activated"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


_S, _E = State, Event
_WORKING = (_S.DOWNLOADING, _S.VERIFYING, _S.INSTALLING, _S.VALIDATING, _S.ACTIVATING)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (_S.IDLE, _E.DEPLOY): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.DOWNLOADED): _S.VERIFYING,
    (_S.VERIFYING, _E.VERIFIED): _S.INSTALLING,
    (_S.INSTALLING, _E.INSTALLED): _S.VALIDATING,
    (_S.VALIDATING, _E.ACCEPTED): _S.ACTIVATING,
    (_S.ACTIVATING, _E.ACTIVATED): _S.COMMITTED,
    (_S.COMMITTED, _E.DONE): _S.IDLE,
    **{(state, _E.FAILED): _S.ROLLING_BACK for state in _WORKING},
    (_S.ROLLING_BACK, _E.ROLLED_BACK): _S.IDLE,
}

# Where to pick up after a crash in each saved state (every step is safe to run again).
RESUME: dict[State, State] = {
    _S.IDLE: _S.IDLE,
    _S.DOWNLOADING: _S.DOWNLOADING,
    _S.VERIFYING: _S.VERIFYING,
    _S.INSTALLING: _S.INSTALLING,
    _S.VALIDATING: _S.VALIDATING,
    _S.ACTIVATING: _S.ACTIVATING,
    _S.COMMITTED: _S.COMMITTED,
    _S.ROLLING_BACK: _S.ROLLING_BACK,
}


class IllegalTransition(EdgeError):
    """An event that the table has no transition for: a bug, so the agent exits."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


@dataclass
class Journal:
    """What one model name's deployment is doing, saved before each step."""

    model: str
    state: State = State.IDLE
    target: BundleRef | None = None
    previous: str | None = None  # the sha256 that was current when the deployment started
    reason: str = ""
    code: str = ""
    attempts: int = 0
    updated: float = 0.0

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "state": self.state.value,
            "target": self.target.model_dump() if self.target else None,
            "previous": self.previous,
            "reason": self.reason,
            "code": self.code,
            "attempts": self.attempts,
            "updated": self.updated,
        }
        return json.dumps(body, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Journal:
        body = json.loads(data)
        return cls(
            model=body["model"],
            state=State(body["state"]),
            target=BundleRef.model_validate(body["target"]) if body.get("target") else None,
            previous=body.get("previous"),
            reason=body.get("reason", ""),
            code=body.get("code", ""),
            attempts=int(body.get("attempts", 0)),
            updated=float(body.get("updated", 0.0)),
        )


class JournalFile:
    def __init__(self, folder: Path, model: str) -> None:
        self.path = folder / f"{model}.json"
        self.model = model

    def load(self) -> Journal:
        try:
            return Journal.from_json(self.path.read_bytes())
        except FileNotFoundError:
            return Journal(self.model)
        except (ValueError, KeyError, TypeError) as exc:
            # A journal we cannot read is treated as "nothing in progress": the links on
            # disk still say what is active, and the desired state will be reconciled again.
            log.error("journal %s is unreadable (%s); starting from idle", self.path, exc)
            return Journal(self.model)

    def save(self, journal: Journal) -> None:
        journal.updated = time.time()
        atomic_write_bytes(self.path, journal.to_json())


def resume_state(journal: Journal) -> State:
    return RESUME[journal.state]


def crash_point(state: State) -> None:
    """Test hook: ``EDGE_TEST_CRASH_AT=<state>`` kills the process (SIGKILL) on entering it.

    Used by the crash tests to prove that every state resumes safely; never set in production.
    A ``state:N`` value crashes on the N-th entry only (so the restarted agent gets through).
    """
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != state.value:
        return
    counter = Path(os.environ.get("EDGE_TEST_CRASH_COUNTER", "/nonexistent"))
    if nth:
        try:
            seen = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(seen))
        except OSError:
            seen = 1
        if seen != int(nth):
            return
    log.warning("crash point %s reached: SIGKILL", state.value)
    os.kill(os.getpid(), signal.SIGKILL)
