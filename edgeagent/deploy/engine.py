"""The deployment engine: decides what to deploy, runs the steps, classifies failures.

One :class:`Engine` serves every model name of a device, one deployment at a time (the
supervisor's thread calls it). For each desired model it checks the journal first: a
document that failed for good is skipped, a transient failure waits for its retry time, a
crash loop is broken after ``max_attempts`` starts. Then it saves the journal before each
step (:func:`_enter`), runs the step, and follows the transition table.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgeagent.deploy import steps
from edgeagent.deploy.journal import DocKey, Journal, JournalFile, journal_names
from edgeagent.deploy.machine import WORKING, Event, State, crash_point, next_state, resume_state
from edgeagent.deploy.retry import Backoff, Kind, kind_of
from edgeagent.desired import Wanted, check_not_downgrade
from edgeagent.errors import DocumentRefused, EdgeError, TransferError, TransferPaused

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Settings:
    backoff: Backoff = field(default_factory=Backoff)
    max_bundle_bytes: int = 2 * GiB  # the largest bundle a desired doc may name
    margin_bytes: int = 16 * MiB  # free space left over after a download and its extraction


def failure_code(exc: BaseException) -> str:
    """The outcome code of an exception a step raised."""
    if isinstance(exc, EdgeError):
        return exc.code
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "insufficient_space"
    return "io_error"


class Engine:
    def __init__(
        self,
        ports: steps.Ports,
        journal_dir: Path,
        settings: Settings,
        stop: threading.Event,
        *,
        states: dict[str, State] | None = None,
    ) -> None:
        self.ports = ports
        self.journal_dir = journal_dir
        self.settings = settings
        self.stop = stop
        self.states: dict[str, State] = {} if states is None else states  # model -> state now
        self.active: tuple[JournalFile, Journal] | None = None  # the deployment running now

    # --- what to deploy ---------------------------------------------------------------

    def resume_all(self) -> None:
        """Finish (or roll back) every deployment a previous process left in a journal."""
        for name in journal_names(self.journal_dir):
            jf = JournalFile(self.journal_dir, name)
            journal = jf.load()
            if journal.state is State.IDLE or journal.target is None:
                continue
            state = resume_state(journal.state)
            log.warning(
                "resuming the deployment of %s %s from %s (saved in %s)",
                name,
                journal.target.version,
                state.value,
                journal.state.value,
            )
            if journal.doc is None:
                journal.doc = DocKey(journal.target.sha256, "journal", 0)
            self._run(jf, journal, state)
            if self.stop.is_set():
                return

    def reconcile(self, wanted: Mapping[str, Wanted]) -> None:
        for name, want in sorted(wanted.items()):
            if self.stop.is_set():
                return
            self.consider(name, want)

    def consider(self, name: str, want: Wanted) -> None:
        """Deploy ``want`` to ``name`` unless it runs already, failed for good or waits for a retry."""
        store = self.ports.store
        if want.bundle.sha256 == store.current(name):
            return
        jf = JournalFile(self.journal_dir, name)
        journal = jf.load()
        key = DocKey(want.bundle.sha256, want.source, want.seq)
        if journal.is_failed(key):
            return
        # A retry waits for its time; a newer document naming the same bundle asks anew.
        if journal.doc == key and journal.retry_at > self.ports.clock.now():
            return
        refusal = self._refusal(name, want)
        if refusal is not None:
            code, reason = refusal
            journal.mark_failed(key, code)
            jf.save(journal)
            self.ports.reporter.refused(name, want.bundle, code=code, reason=reason)
            self.ports.reporter.outcome(name, want.bundle, ok=False, code=code, reason=reason, detail={})
            return
        journal.start(want.bundle, key, previous=store.current(name))
        self._run(jf, journal, State.DOWNLOADING)

    def _refusal(self, name: str, want: Wanted) -> tuple[str, str] | None:
        """Why ``want`` is refused before anything is written for it, or None."""
        if want.bundle.size > self.settings.max_bundle_bytes:
            return "too_large", (
                f"the bundle is {want.bundle.size / MiB:.1f} MiB; this device takes at most "
                f"{self.settings.max_bundle_bytes / MiB:.0f} MiB (max_bundle_mb)"
            )
        current = self.ports.store.current(name)
        try:
            check_not_downgrade(want, self.ports.store.version_of(current) if current else None)
        except DocumentRefused as exc:
            return exc.code, str(exc)
        return None

    def refresh(self, wanted: Mapping[str, Wanted]) -> list[str]:
        """``command refresh``: forget failures of the desired bundles; return the model names cleared.

        Call it on the deployer's thread only (:meth:`Supervisor.request_refresh`): it rewrites journals.
        """
        cleared = []
        for name, want in sorted(wanted.items()):
            jf = JournalFile(self.journal_dir, name)
            journal = jf.load()
            if journal.clear_failed(want.bundle.sha256):
                jf.save(journal)
                cleared.append(name)
        return cleared

    # --- one deployment ---------------------------------------------------------------

    def _enter(self, jf: JournalFile, journal: Journal, state: State) -> None:
        journal.state = state
        jf.save(journal)  # before the step acts on the device
        self.states[journal.model] = state
        self.ports.reporter.state(journal.model, journal.target, state.value)
        crash_point(state)

    def _run(self, jf: JournalFile, journal: Journal, state: State) -> None:
        self.active = (jf, journal)
        self._run_active(jf, journal, state)
        self.active = None  # kept when it raised: the supervisor saves why the process ends

    def _run_active(self, jf: JournalFile, journal: Journal, state: State) -> None:
        if state in WORKING:
            journal.attempts += 1
            if journal.attempts > self.settings.backoff.max_attempts:
                # A deployment that never got through (a crash loop): stop trying it.
                journal.code = "too_many_attempts"
                journal.reason = f"{journal.attempts - 1} starts did not finish; giving up"
                state = next_state(state, Event.FAILED)
        ctx = steps.Context(self.ports, self.stop, self.settings.margin_bytes)
        try:
            while state not in (State.IDLE, State.ROLLING_BACK):
                if self.stop.is_set():
                    raise TransferPaused("stopping", sha256=journal.target.sha256 if journal.target else "-")
                self._enter(jf, journal, state)
                state = next_state(state, steps.STEPS[state](ctx, journal))
        except (EdgeError, OSError) as exc:
            if isinstance(exc, TransferPaused) or (isinstance(exc, TransferError) and self.stop.is_set()):
                journal.attempts -= 1  # an interruption is not a try
                jf.save(journal)
                log.warning("deployment of %s paused in %s: %s", journal.model, journal.state.value, exc)
                return
            journal.code, journal.reason = failure_code(exc), str(exc) or repr(exc)
            log.error("deployment of %s failed in %s: %s", journal.model, state.value, journal.reason)
            state = next_state(state, Event.FAILED)  # from committed: IllegalTransition, a bug
        if state is State.ROLLING_BACK:
            self._roll_back(jf, journal, ctx)
        else:  # committed: nothing left to retry
            journal.attempts, journal.retry_at = 0, 0.0
        journal.state = State.IDLE
        jf.save(journal)
        self.states[journal.model] = State.IDLE
        self.ports.reporter.state(journal.model, journal.target, State.IDLE.value)

    def _roll_back(self, jf: JournalFile, journal: Journal, ctx: steps.Context) -> None:
        kind = kind_of(journal.code)
        retry = kind is Kind.TRANSIENT and journal.attempts < self.settings.backoff.max_attempts
        detail: dict[str, object] = {"kind": kind.value, "attempts": journal.attempts}
        if retry:  # decided and saved before the clean-up, which keeps what a retry resumes
            delay = self.settings.backoff.delay_s(journal.attempts, self.ports.clock.random)
            journal.retry_at = self.ports.clock.now() + delay
            detail["retry_in_s"] = round(delay, 1)
        else:
            journal.retry_at = 0.0
        self._enter(jf, journal, State.ROLLING_BACK)
        steps.roll_back(ctx, journal, keep_partial=retry and journal.code == "transfer_failed")
        next_state(State.ROLLING_BACK, Event.ROLLED_BACK)
        if not retry and journal.doc is not None:
            journal.mark_failed(journal.doc, journal.code)
        if journal.target is not None:
            self.ports.reporter.outcome(
                journal.model,
                journal.target,
                ok=False,
                code=journal.code,
                reason=journal.reason,
                detail=detail,
            )

    def save_active(self, reason: str) -> None:
        """Record why the process is ending in the journal of the deployment in progress."""
        if self.active is None:
            return
        jf, journal = self.active
        journal.reason = reason
        try:
            jf.save(journal)
        except OSError as exc:  # the journal saved before the step still stands
            log.error("could not save the journal of %s: %s", journal.model, exc)

    def next_retry_s(self) -> float | None:
        """Seconds until the earliest scheduled retry, None when none is scheduled."""
        now = self.ports.clock.now()
        due = [
            j.retry_at - now
            for name in journal_names(self.journal_dir)
            if (j := JournalFile(self.journal_dir, name).load()).retry_at > now
        ]
        return max(0.0, min(due)) if due else None
