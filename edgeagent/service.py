"""The agent's service lifecycle: start, tell systemd, run periodic work, stop on a signal.

This is the main loop the rest of the agent plugs into (:mod:`edgeagent.agent` runs MQTT
deployment, local serving and telemetry in threads around it). It:

- sends ``READY=1`` with a ``STATUS=`` line once configuration, hardware detection and the
  store have been read;
- runs :class:`PeriodicTask` s from one main loop. The systemd watchdog ping is one of
  them, so a task that hangs the loop stops the pings and systemd restarts the agent;
- refreshes ``STATUS=`` with the active bundle of each model (``systemctl status edgeagent``
  shows it);
- on SIGTERM or SIGINT sends ``STOPPING=1``, finishes the task in progress and returns 0.

Other parts add tasks with :meth:`AgentService.add_task` before :meth:`AgentService.run`,
and threads they start (the MQTT session) watch :attr:`AgentService.stop` and call
``stop.request(reason)`` to end the service.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from devices.detect import Detection
from edgeagent import sdnotify
from edgeagent.bundle.manifest import MANIFEST_NAME, parse_manifest
from edgeagent.config import AgentConfig
from edgeagent.errors import BundleError
from edgeagent.store import BUNDLE_ID

log = logging.getLogger(__name__)


class ServiceState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class PeriodicTask:
    """Work the main loop runs every ``interval_s`` seconds, first right after start.

    ``run`` must return promptly: the loop is single-threaded, and the watchdog ping
    waits for it. An exception from ``run`` is a bug; it ends the service (systemd restarts).
    """

    name: str
    interval_s: float
    run: Callable[[], None]

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"task {self.name!r}: interval_s must be > 0, got {self.interval_s}")


class StopSignal:
    """A stop request that signal handlers and other threads can raise and the loop can wait on.

    A self-pipe rather than :class:`threading.Event`: setting an Event from a signal handler
    can deadlock if the signal lands while the main thread holds the Event's lock.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._reason: str | None = None
        self._exit_code = 0
        self._closed = False
        # Re-entrant: a signal handler runs on the main thread, possibly inside request().
        self._lock = threading.RLock()

    @property
    def requested(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def exit_code(self) -> int:
        return self._exit_code

    def request(self, reason: str, *, exit_code: int = 0) -> None:
        """Ask the service to stop; the first reason is kept. Safe from handlers and threads.

        A non-zero ``exit_code`` (a bug in a thread) wins over 0 whatever came first, so
        systemd restarts the agent.
        """
        with self._lock:
            if self._reason is None:
                self._reason = reason
            if exit_code:
                self._exit_code = self._exit_code or exit_code
            if not self._closed:  # a closed descriptor number may already belong to another file
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._write, b"\0")

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` seconds or until a stop is requested; True if requested."""
        if not self.requested:
            with contextlib.suppress(InterruptedError):
                select.select([self._read], [], [], max(0.0, timeout_s))
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._read, 4096)
        return self.requested

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


@dataclass(frozen=True)
class ActiveModel:
    """What ``<state_dir>/models/<name>/current`` points at."""

    name: str
    bundle_id: str | None  # sha256 of the bundle (its folder name), None when nothing is active
    bundle_name: str | None = None
    bundle_version: str | None = None

    def describe(self) -> str:
        if self.bundle_id is None:
            return f"{self.name}: no model active"
        label = f"{self.bundle_name} {self.bundle_version}" if self.bundle_name else "unreadable manifest"
        return f"{self.name}: {label} ({self.bundle_id[:12]})"


def read_active_models(state_dir: Path) -> list[ActiveModel]:
    """The active bundle of every model in the store, sorted by model name.

    Reads the layout ``models/<name>/current -> ../../bundles/<sha256>/`` only; the store
    (a later issue) owns writing it. A missing store is an empty list, not an error.
    """
    models_dir = state_dir / "models"
    try:
        entries = sorted(p for p in models_dir.iterdir() if p.is_dir())
    except OSError:
        return []
    return [_active_model(entry) for entry in entries]


def _active_model(model_dir: Path) -> ActiveModel:
    current = model_dir / "current"
    try:
        bundle_id = current.readlink().name
    except OSError:
        return ActiveModel(model_dir.name, None)
    if not BUNDLE_ID.match(bundle_id):
        log.warning("%s points at %r, which is not a bundle id", current, bundle_id)
    try:
        manifest = parse_manifest((current / MANIFEST_NAME).read_bytes())
    except (OSError, BundleError) as exc:
        log.warning("cannot read the manifest of %s: %s", current, exc)
        return ActiveModel(model_dir.name, bundle_id)
    return ActiveModel(model_dir.name, bundle_id, manifest.name, manifest.version)


def status_line(detection: Detection, models: list[ActiveModel]) -> str:
    """The one-line STATUS= text: profile, then each model's active bundle."""
    profile = detection.profile
    if detection.host_profile:
        profile = f"{profile} on {detection.host_profile}"
    if any(m.bundle_id is not None for m in models):
        body = "; ".join(m.describe() for m in models)
    else:
        body = "no model active"
    return f"profile {profile} ({detection.source}); {body}"


class AgentService:
    """The main loop of ``edgeagent run``. Create, add tasks, :meth:`run` once."""

    def __init__(
        self,
        config: AgentConfig,
        detection: Detection,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.detection = detection
        self.stop = StopSignal()
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._state = ServiceState.CREATED
        self._tasks: list[PeriodicTask] = []
        self._status = ""
        self.add_task(PeriodicTask("status", config.status_interval_s, self._refresh_status))
        ping_s = sdnotify.watchdog_ping_interval_s(config.watchdog_fraction, self._environ)
        if ping_s is not None:
            self.add_task(PeriodicTask("watchdog", ping_s, self._ping_watchdog))
            log.info("systemd watchdog on: pinging every %.3f s", ping_s)

    @property
    def state(self) -> ServiceState:
        return self._state

    def add_task(self, task: PeriodicTask) -> None:
        """Register periodic work; only before :meth:`run`."""
        if self._state is not ServiceState.CREATED:
            raise RuntimeError(f"cannot add task {task.name!r} to a {self._state.value} service")
        self._tasks.append(task)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or ``stop.request()``; returns the exit status (0, or the
        non-zero code a ``stop.request(..., exit_code=)`` asked for).

        Must be called from the main thread (signal handlers are installed there).
        """
        if self._state is not ServiceState.CREATED:
            raise RuntimeError(f"cannot run a {self._state.value} service (create a new one)")
        self._state = ServiceState.RUNNING
        try:
            with self._signal_handlers():
                try:
                    self._status = self._status_text()
                    log.info("ready: %s", self._status)
                    self._notify("READY=1", f"STATUS={self._status}")
                    self._loop()
                finally:
                    reason = self.stop.reason or "error"
                    log.info("stopping (%s)", reason)
                    self._notify("STOPPING=1", f"STATUS=stopping ({reason})")
                    self._state = ServiceState.STOPPED
        finally:
            code = self.stop.exit_code
            self.stop.close()  # after the handlers are gone, so none can write to a closed pipe
        return code

    def _loop(self) -> None:
        due = {task.name: self._clock() for task in self._tasks}
        while not self.stop.requested:
            for task in self._tasks:
                if self.stop.requested:
                    return
                if due[task.name] <= self._clock():
                    task.run()
                    # Next run one interval after this one ended: no burst of catch-up runs.
                    due[task.name] = self._clock() + task.interval_s
            self.stop.wait(min(due.values()) - self._clock())

    def _status_text(self) -> str:
        return status_line(self.detection, read_active_models(self.config.state_dir))

    def _refresh_status(self) -> None:
        text = self._status_text()
        if text != self._status:
            self._status = text
            log.info("status: %s", text)
            self._notify(f"STATUS={text}")

    def _ping_watchdog(self) -> None:
        self._notify("WATCHDOG=1")

    def _notify(self, *lines: str) -> None:
        sdnotify.notify(*lines, environ=self._environ)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.stop.request(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
