"""What the engine needs from the device, as small Protocols it is handed.

The agent wires the real ones (:mod:`edgeagent.deploy.device`); the fault-table tests hand
in-memory fakes that fail on cue. Each method may raise :class:`~edgeagent.errors.EdgeError`
(a refusal with a ``code``) or :class:`OSError` (the disk); the engine classifies both.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from edgeagent.protocol import BundleRef


class StorePort(Protocol):
    """Downloads, installed bundles and the current/previous links of each model name."""

    def has_bundle(self, sha256: str) -> bool: ...

    def current(self, name: str) -> str | None: ...

    def previous(self, name: str) -> str | None: ...

    def set_link(self, name: str, which: str, sha256: str | None) -> None: ...

    def version_of(self, sha256: str) -> str | None:
        """The installed bundle's version (from its manifest), None when unreadable."""
        ...

    def download_bytes(self, sha256: str) -> int:
        """Bytes the (partial) download of ``sha256`` already holds on disk."""
        ...

    def free_bytes(self) -> int:
        """Bytes the store's filesystem can still give an unprivileged writer."""
        ...

    def verify_download(self, ref: BundleRef) -> int:
        """Check the finished download against ``ref`` and its signature; return its extracted bytes."""
        ...

    def install(self, ref: BundleRef) -> None:
        """Extract the verified download into the store (all or nothing), then drop the download."""
        ...

    def remember(self, ref: BundleRef) -> None:
        """Record what ``ref.sha256`` is (name, version) for reports."""
        ...

    def discard(self, sha256: str, *, keep_partial: bool) -> None:
        """Remove the download of ``sha256`` (its partial file too unless ``keep_partial``) and the
        bundle itself unless a link points at it."""
        ...

    def collect_garbage(self, keep: set[str]) -> None:
        """Remove bundles beyond the configured history and downloads nobody is working on."""
        ...


class DownloaderPort(Protocol):
    def fetch(
        self,
        ref: BundleRef,
        *,
        progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Path: ...


@runtime_checkable
class FetchesMorePort(Protocol):
    """A downloader that can add the next candidate's artifacts to a partial bundle (optional)."""

    def fetch_more(
        self, ref: BundleRef, *, after: str, reason: str, stop: threading.Event | None = None
    ) -> list[str]:
        """Fetch the artifacts selection would try next into ``ref``'s bundle; [] when none is left."""
        ...


class ServerPort(Protocol):
    """Loads, proves and serves models; ``prepare`` is the acceptance run."""

    def prepare(self, name: str, sha256: str) -> object:
        """Load the bundle's best candidate and prove it on the golden set; the handle activates it."""
        ...

    def activate(self, name: str, prepared: object) -> None: ...

    def deactivate(self, name: str) -> None: ...


class ReporterPort(Protocol):
    def state(self, name: str, ref: BundleRef | None, state: str) -> None: ...

    def progress(self, name: str, ref: BundleRef, received: int, total: int) -> None: ...

    def outcome(
        self, name: str, ref: BundleRef, *, ok: bool, code: str, reason: str, detail: dict[str, object]
    ) -> None: ...

    def refused(self, name: str, ref: BundleRef, *, code: str, reason: str) -> None: ...

    def store_event(self, name: str, *, code: str, reason: str, detail: dict[str, object]) -> None: ...


class ClockPort(Protocol):
    def now(self) -> float:
        """Unix time, seconds."""
        ...

    def random(self) -> float:
        """Uniform in [0, 1): the backoff's jitter."""
        ...


class SystemClock:
    """The ClockPort of a real device: wall time and jitter."""

    def now(self) -> float:
        return time.time()

    def random(self) -> float:
        return random.random()  # noqa: S311 - jitter, not a secret
