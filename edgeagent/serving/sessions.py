"""Per-client state of stateful models: sessions, bounded in number and in idle time.

A request to a stateful model (:class:`~edgeagent.state.StateCarrier`) names a session
(``X-Session`` header, a frame's session field, ``Client.session()``): its state is carried
from one request of that session to the next, and no other session sees it. A request
without a session starts from the initial state and its state is dropped afterwards.

The store keeps at most ``max_sessions`` sessions (the least recently used is evicted) and
drops one idle for ``idle_s`` seconds; a session whose model was swapped since its last
request starts again from the new model's initial state. Requests of one session run one
at a time (a step needs the previous step's state); sessions run in parallel.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeagent.errors import InputError
from edgeagent.runtimes.model import Feeds, LoadedModel
from edgeagent.serving.slots import ServedModel
from edgeagent.state import State

DEFAULT_MAX_SESSIONS = 64
DEFAULT_IDLE_S = 600.0
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


def check_session_id(session: str) -> str:
    """``session`` when it is a valid id (1-128 letters, digits, '.', '_', ':' or '-'); else InputError."""
    if not _SESSION_ID.match(session):
        raise InputError("a session id is 1 to 128 letters, digits, '.', '_', ':' or '-'", code="bad_session")
    return session


@dataclass(eq=False)
class _Session:
    served: ServedModel  # the model this state belongs to (a swap starts the session afresh)
    state: State
    model: LoadedModel | None = None  # a variables model: this session's own instance
    last_used: float = 0.0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        """Drop the state (waits for a request running on it); later users make a new session."""
        with self.lock:
            self.closed = True
            if self.model is not None:
                self.model.close()
                self.model = None


class SessionStore:
    """Sessions of every served model, keyed by (model name, session id)."""

    def __init__(
        self,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_s: float = DEFAULT_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or idle_s <= 0:
            raise ValueError("max_sessions must be >= 1 and idle_s > 0")
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self.clock = clock
        self.evicted = 0  # dropped for the bound
        self.expired = 0  # dropped for idleness
        self._lock = threading.Lock()
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._sessions)

    def summary(self) -> dict[str, int | float]:
        """What ``/v1/stats`` reports: live sessions, the bounds, and how many each bound dropped."""
        return {
            "live": len(self._sessions),
            "max_sessions": self.max_sessions,
            "idle_s": self.idle_s,
            "evicted": self.evicted,
            "expired": self.expired,
        }

    def ids(self, model: str) -> list[str]:
        """The live session ids of ``model``, least recently used first."""
        with self._lock:
            return [sid for name, sid in self._sessions if name == model]

    def predict(self, served: ServedModel, session: str | None, feeds: Feeds, raw: bool) -> list[np.ndarray]:
        """Run one step of stateful ``served`` in ``session`` (None: from the initial state, kept nowhere)."""
        carrier = served.state
        if carrier is None:
            return served.model.predict(feeds, raw=raw)
        if session is None:
            if carrier.variables:
                fresh = carrier.fresh_model(served.model)
                try:
                    return carrier.step(fresh, feeds, carrier.initial_state(), raw=raw)[0]
                finally:
                    fresh.close()
            return carrier.step(served.model, feeds, carrier.initial_state(), raw=raw)[0]
        while True:
            entry = self._entry(served, check_session_id(session))
            with entry.lock:
                if entry.closed:  # evicted or reset between lookup and lock: take a new one
                    continue
                if carrier.variables and entry.model is None:
                    entry.model = carrier.fresh_model(served.model)
                model = entry.model or served.model
                outputs, entry.state = carrier.step(model, feeds, entry.state, raw=raw)
                return outputs

    def reset(self, model: str, session: str) -> bool:
        """Forget ``session`` of ``model``; True when it existed. Its next request starts afresh."""
        with self._lock:
            entry = self._sessions.pop((model, check_session_id(session)), None)
        if entry is None:
            return False
        entry.close()
        return True

    def drop_model(self, model: str) -> None:
        """Forget every session of ``model`` (it is no longer served)."""
        with self._lock:
            gone = [self._sessions.pop(k) for k in [k for k in self._sessions if k[0] == model]]
        for entry in gone:
            entry.close()

    def _entry(self, served: ServedModel, session: str) -> _Session:
        """The session's entry, made (or made afresh) as needed; expired and excess ones dropped."""
        now = self.clock()
        key = (served.name, session)
        dropped: list[_Session] = []
        with self._lock:
            while self._sessions:  # least recently used first: stop at the first one still fresh
                oldest_key, oldest = next(iter(self._sessions.items()))
                if now - oldest.last_used <= self.idle_s:
                    break
                dropped.append(self._sessions.pop(oldest_key))
                self.expired += 1
            entry = self._sessions.get(key)
            if entry is not None and entry.served is not served:
                dropped.append(self._sessions.pop(key))
                entry = None
            if entry is None:
                carrier = served.state
                entry = _Session(served, carrier.initial_state() if carrier is not None else {})
                self._sessions[key] = entry
                while len(self._sessions) > self.max_sessions:
                    dropped.append(self._sessions.popitem(last=False)[1])
                    self.evicted += 1
            else:
                self._sessions.move_to_end(key)
            entry.last_used = now
        for old in dropped:  # outside the store lock: closing waits for a request on it
            old.close()
        return entry
