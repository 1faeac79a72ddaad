"""A store that heals: the active bundle's files are checked against its signed manifest.

On start (before anything is served) and then on a schedule, every model's current bundle
is hashed against the manifest it was installed with, and the manifest against its
signature. A bundle that no longer matches is never served: the model falls back to its
previous bundle when that one is intact, the broken one is removed, and the event and the
reported outcome say ``store_corrupt``. The desired state still names the broken bundle, so
the engine then downloads it again: the device repairs itself without a person.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from edgeagent.deploy.ports import ReporterPort, ServerPort
from edgeagent.errors import EdgeError

log = logging.getLogger(__name__)


class CheckedStore(Protocol):
    def current(self, name: str) -> str | None: ...

    def previous(self, name: str) -> str | None: ...

    def set_link(self, name: str, which: str, sha256: str | None) -> None: ...

    def check_bundle(self, sha256: str) -> str | None:
        """None when the installed bundle matches its signed manifest, else the first problem."""
        ...

    def discard(self, sha256: str, *, keep_partial: bool) -> None: ...


def heal(
    store: CheckedStore,
    reporter: ReporterPort,
    names: Iterable[str],
    *,
    server: ServerPort | None = None,
) -> list[str]:
    """Check each model's current bundle; fall back where it is broken. Return the names healed.

    With ``server`` the fallback is loaded and switched in now; without it (on start, before
    anything is served) only the links change and the caller serves what they point at.
    """
    healed = []
    for name in names:
        current = store.current(name)
        if current is None:
            continue
        problem = store.check_bundle(current)
        if problem is None:
            continue
        fallback = store.previous(name)
        if fallback == current or (fallback is not None and store.check_bundle(fallback) is not None):
            fallback = None
        detail: dict[str, object] = {"bundle": current, "problem": problem, "fallback": fallback}
        if fallback is None:
            # Nothing intact to fall back to: the model loaded from it (if any) keeps serving
            # until a deployment replaces it; "nothing" is never better.
            log.error(
                "%s: bundle %s is corrupt (%s) and no intact previous bundle exists",
                name,
                current[:12],
                problem,
            )
            reporter.store_event(
                name, code="store_corrupt", reason=f"{problem}; no intact previous bundle", detail=detail
            )
            continue
        log.error(
            "%s: bundle %s is corrupt (%s); falling back to %s", name, current[:12], problem, fallback[:12]
        )
        store.set_link(name, "current", fallback)
        store.set_link(name, "previous", None)
        if server is not None:
            try:
                server.activate(name, server.prepare(name, fallback))
            except EdgeError as exc:
                log.error("could not serve %s's fallback %s: %s", name, fallback[:12], exc)
        store.discard(current, keep_partial=False)
        reporter.store_event(
            name, code="store_corrupt", reason=f"{problem}; fell back to the previous bundle", detail=detail
        )
        healed.append(name)
    return healed
