"""Named model slots with hot swap: requests in flight finish on the model they started on.

A request :meth:`ModelSlot.acquire`\\ s the slot's current :class:`Lease` (a reference count
+1) and releases it when its reply is ready. :meth:`ModelSlot.swap` makes a new model
current at once, so every later request gets it, and retires the old lease; the old
model is closed by whichever thread drops its last reference — immediately when it was
idle, or when the last request running on it finishes. No request ever sees a closed
model, and none waits for a swap.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgeagent.protocol import Decision, Verdict
from edgeagent.runtimes.model import LoadedModel
from edgeagent.serving.frames import static_meta
from edgeagent.serving.protocol import reply_headers
from edgeagent.serving.stats import StatsKey
from edgeagent.state import StateCarrier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model and what the agent knows about where it came from."""

    name: str  # the served name: /v1/models/{name}/predict
    model: LoadedModel
    bundle: str
    version: str
    bundle_sha256: str | None = None
    decision: Decision | None = None  # how selection chose the runtime and artifact
    verdict: Verdict | None = None  # the chosen artifact's acceptance verdict
    state: StateCarrier | None = None  # set for a stateful model: requests go through sessions
    key: StatsKey = field(init=False)
    meta: dict[str, str] = field(init=False)  # what every reply says about the model
    reply_headers: str = field(init=False)  # the same, as header lines of binary replies
    frame_meta: bytes = field(init=False)  # the same, as the fixed part of a framed reply's head

    def __post_init__(self) -> None:
        runtime, delegate = self.model.runtime, self.model.delegate
        meta = {"model": self.name, "version": self.version, "runtime": runtime, "delegate": delegate}
        object.__setattr__(self, "key", StatsKey(self.name, self.version, runtime, delegate))
        object.__setattr__(self, "meta", meta)
        object.__setattr__(self, "reply_headers", reply_headers(meta, self.model.output_names))
        object.__setattr__(self, "frame_meta", static_meta(self.name, self.version, runtime, delegate))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bundle": self.bundle,
            "version": self.version,
            "bundle_sha256": self.bundle_sha256,
            **self.model.describe(),
            "decision": self.decision.model_dump(mode="json") if self.decision else None,
            "acceptance": self.verdict.model_dump(mode="json") if self.verdict else None,
            "state": self.state.describe() if self.state is not None else None,
        }


class Lease:
    """One activation of a model in a slot, reference-counted by the requests using it."""

    __slots__ = ("_refs", "activated_at", "retired", "served")

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self._refs = 0
        self.retired = False
        self.activated_at = time.time()


class ModelSlot:
    """The current model of one served name, swappable while requests run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._current: Lease | None = None
        self.swaps = 0

    @property
    def current(self) -> ServedModel | None:
        lease = self._current
        return lease.served if lease is not None else None

    def acquire(self) -> Lease | None:
        """The current lease with one more reference, or None when the slot is empty."""
        with self._lock:
            lease = self._current
            if lease is not None:
                lease._refs += 1
            return lease

    def release(self, lease: Lease) -> None:
        with self._lock:
            lease._refs -= 1
            close = lease.retired and lease._refs == 0
        if close:
            _close(lease)

    def swap(self, served: ServedModel | None) -> ServedModel | None:
        """Make ``served`` current (None empties the slot); returns the model it replaced.

        The replaced model is closed once no request holds it; the caller must not close it.
        """
        new = Lease(served) if served is not None else None
        with self._lock:
            old, self._current = self._current, new
            self.swaps += 1
            close = False
            if old is not None:
                old.retired = True
                close = old._refs == 0
        if old is not None and close:
            _close(old)
        return old.served if old is not None else None


def _close(lease: Lease) -> None:
    served = lease.served
    try:
        served.model.close()
    except Exception:  # a runtime failing to free must not take a request thread down
        log.exception("closing %s %s failed", served.name, served.version)
    else:
        log.info(
            "closed %s %s (%s/%s)", served.name, served.version, served.model.runtime, served.model.delegate
        )
