"""The deployer thread: resume, reconcile, heal on schedule, and end the process on a bug.

Everything a step may raise on purpose (:class:`~edgeagent.errors.EdgeError`,
:class:`OSError`) is handled inside the engine. What reaches the supervisor is a bug (an
:class:`~edgeagent.deploy.machine.IllegalTransition`, a ``TypeError``): it saves the journal,
logs one line and calls ``on_fatal``, which ends the process with a non-zero status so
systemd restarts it into the journal. A half-alive agent whose deployer died while the
watchdog kept pinging systemd is exactly what this prevents.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from edgeagent.deploy.engine import Engine
from edgeagent.desired import Wanted

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        engine: Engine,
        wanted: Callable[[], Mapping[str, Wanted]],
        *,
        on_fatal: Callable[[str], None],
        heal: Callable[[], None] | None = None,
        heal_interval_s: float = 3600.0,
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.wanted = wanted
        self.on_fatal = on_fatal
        self.heal = heal
        self.heal_interval_s = heal_interval_s
        self.poll_s = poll_s
        self.clock = clock
        self.wake = threading.Event()
        self.fatal: str | None = None
        self._refresh = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stop(self) -> threading.Event:
        return self.engine.stop

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self.main, name="deployer", daemon=True)
        self._thread.start()
        self.wake.set()
        return self

    def close(self, timeout_s: float = 4.0) -> bool:
        """Stop and wait up to ``timeout_s`` seconds; True if the thread ended."""
        self.stop.set()
        self.wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the deployer did not stop within %.0f s; its journal resumes it", timeout_s)
            return False
        return True

    def request_refresh(self) -> None:
        """``command refresh``: clear the failed marks of the desired bundles, then reconcile.

        Done on the deployer's thread, so it never races a deployment saving its journal.
        """
        self._refresh.set()
        self.wake.set()

    def main(self) -> None:
        """The thread's body (tests call it directly)."""
        try:
            self._loop()
        except Exception as exc:  # a bug: see the module docstring
            self.fatal = f"{type(exc).__name__}: {exc}"
            self.engine.save_active(f"agent exited on a bug: {self.fatal}")
            log.critical("deployment engine bug, exiting so systemd restarts the agent: %s", self.fatal)
            self.on_fatal(self.fatal)

    def _loop(self) -> None:
        self.engine.resume_all()
        next_heal = self.clock() + self.heal_interval_s
        while not self.stop.is_set():
            if self.heal is not None and self.clock() >= next_heal:
                self.heal()
                next_heal = self.clock() + self.heal_interval_s
            if self._refresh.is_set():
                self._refresh.clear()
                cleared = self.engine.refresh(self.wanted())
                if cleared:
                    log.info("refresh: trying %s again", ", ".join(cleared))
            self.engine.reconcile(self.wanted())
            retry = self.engine.next_retry_s()
            wait = min(
                self.poll_s, retry if retry is not None else self.poll_s, max(0.0, next_heal - self.clock())
            )
            self.wake.wait(wait)
            self.wake.clear()
