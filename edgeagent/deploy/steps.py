"""One function per state of a deployment, over the injected ports.

Each step returns the event that leaves its state, and is safe to run again after a crash:
it skips what is already done (a finished download, an installed bundle) and rewrites the
same links. A step raises :class:`~edgeagent.errors.EdgeError` or :class:`OSError` to fail
the deployment (the engine rolls back), :class:`~edgeagent.errors.TransferPaused` to leave
it where it is until the broker is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from edgeagent.deploy.journal import Journal
from edgeagent.deploy.machine import Event, State
from edgeagent.deploy.ports import (
    ClockPort,
    DownloaderPort,
    FetchesMorePort,
    ReporterPort,
    ServerPort,
    StorePort,
)
from edgeagent.errors import (
    AcceptanceFailed,
    DeploymentError,
    EdgeError,
    InsufficientSpace,
    NoCandidate,
)
from edgeagent.protocol import BundleRef

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass
class Ports:
    store: StorePort
    downloader: DownloaderPort | None
    server: ServerPort
    reporter: ReporterPort
    clock: ClockPort


@dataclass
class Context:
    """What the steps of one deployment share: the ports, the stop, the loaded model."""

    ports: Ports
    stop: threading.Event
    margin_bytes: int
    prepared: object | None = None  # the model validating loaded, handed to activating


def _target(journal: Journal) -> BundleRef:
    if journal.target is None:  # the engine only runs journals that have a target
        raise DeploymentError(f"journal of {journal.model} has no target", code="bug")
    return journal.target


def check_space(ctx: Context, needed: int, what: str) -> None:
    """Refuse with ``insufficient_space`` unless ``needed`` bytes plus the margin are free."""
    free = ctx.ports.store.free_bytes()
    if free < needed + ctx.margin_bytes:
        raise InsufficientSpace(
            f"{what} needs {(needed + ctx.margin_bytes) / MiB:.1f} MiB (margin included), "
            f"the store has {free / MiB:.1f} MiB free",
            needed=needed + ctx.margin_bytes,
            free=free,
        )


def download(ctx: Context, journal: Journal) -> Event:
    ref = _target(journal)
    store = ctx.ports.store
    if store.has_bundle(ref.sha256):
        return Event.DOWNLOADED
    if ctx.ports.downloader is None:
        raise DeploymentError("no broker configured to download from", code="no_broker")
    # The download and its extraction live side by side until install drops the download;
    # a tar's members take no more room than the tar itself, so twice the size is the bound.
    check_space(ctx, 2 * ref.size - store.download_bytes(ref.sha256), "the download")
    reporter = ctx.ports.reporter
    ctx.ports.downloader.fetch(
        ref,
        progress=lambda got, total: reporter.progress(journal.model, ref, got, total),
        stop=ctx.stop,
    )
    return Event.DOWNLOADED


def verify(ctx: Context, journal: Journal) -> Event:
    ref = _target(journal)
    store = ctx.ports.store
    if not store.has_bundle(ref.sha256):
        extracted = store.verify_download(ref)
        check_space(ctx, extracted, "extracting the bundle")
    return Event.VERIFIED


def install(ctx: Context, journal: Journal) -> Event:
    ref = _target(journal)
    if not ctx.ports.store.has_bundle(ref.sha256):
        ctx.ports.store.install(ref)
    ctx.ports.store.remember(ref)
    return Event.INSTALLED


def validate(ctx: Context, journal: Journal) -> Event:
    """Load and prove the bundle; a partial bundle whose artifacts all failed gets the next
    candidate's artifacts fetched and is proved again, until one passes or none is left."""
    ref = _target(journal)
    downloader = ctx.ports.downloader
    fetched: set[str] = set()
    while True:
        try:
            ctx.prepared = ctx.ports.server.prepare(journal.model, ref.sha256)
            return Event.ACCEPTED
        except (AcceptanceFailed, NoCandidate) as exc:
            if not isinstance(downloader, FetchesMorePort):
                raise
            more = downloader.fetch_more(ref, after=exc.code, reason=str(exc), stop=ctx.stop)
            if not more or fetched.issuperset(more):  # bounded: each round adds an artifact
                raise
            fetched.update(more)
            log.warning("%s %s: %s; fetched the next candidate's %s", ref.name, ref.version, exc.code, more)


def activate(ctx: Context, journal: Journal) -> Event:
    ref = _target(journal)
    store = ctx.ports.store
    if ctx.prepared is None:  # resumed straight into activating: load and prove it again
        ctx.prepared = ctx.ports.server.prepare(journal.model, ref.sha256)
    if journal.previous and journal.previous != ref.sha256:
        store.set_link(journal.model, "previous", journal.previous)
    store.set_link(journal.model, "current", ref.sha256)
    ctx.ports.server.activate(journal.model, ctx.prepared)
    ctx.prepared = None
    return Event.ACTIVATED


def commit(ctx: Context, journal: Journal) -> Event:
    ref = _target(journal)
    ctx.ports.reporter.outcome(journal.model, ref, ok=True, code="committed", reason="", detail={})
    collect_garbage(ctx.ports.store, keep={ref.sha256})
    return Event.DONE


def roll_back(ctx: Context, journal: Journal, *, keep_partial: bool) -> Event:
    """Serve what served before the deployment again, then drop what the deployment left."""
    ref = _target(journal)
    store, server, name = ctx.ports.store, ctx.ports.server, journal.model
    previous = journal.previous
    if store.current(name) != previous:
        store.set_link(name, "current", previous)
        if previous is None:
            server.deactivate(name)
        else:
            try:
                server.activate(name, server.prepare(name, previous))
            except EdgeError as exc:  # the links are right; the healer's check handles the rest
                log.error("could not serve %s's previous bundle again: %s", name, exc)
    if store.current(name) != ref.sha256 and store.previous(name) != ref.sha256:
        store.discard(ref.sha256, keep_partial=keep_partial)
    collect_garbage(store, keep=set())
    return Event.ROLLED_BACK


def collect_garbage(store: StorePort, keep: set[str]) -> None:
    """Clean the store; a failure here never fails the deployment that asked for it."""
    try:
        store.collect_garbage(keep)
    except OSError as exc:
        log.warning("store clean-up failed: %s", exc)


Step = Callable[[Context, Journal], Event]

STEPS: dict[State, Step] = {
    State.DOWNLOADING: download,
    State.VERIFYING: verify,
    State.INSTALLING: install,
    State.VALIDATING: validate,
    State.ACTIVATING: activate,
    State.COMMITTED: commit,
}
