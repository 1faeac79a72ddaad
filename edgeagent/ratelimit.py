"""Bounded cost of hostility: refusals are reported at a bounded rate, the rest summarised.

Anyone who can publish to a device's desired or command topic can send it thousands of
unsigned or malformed documents a second. Each is refused, but a refusal that costs a
WARNING line and a QoS 1 event amplifies the flood into the journal and back onto the
broker. :class:`RateLimiter` lets the first ``burst`` refusals of each interval through and
counts the rest by reason code; when an interval with suppressed refusals ends, one summary
(count and codes) is handed to ``on_summary`` from a timer thread, so the last interval of a
flood is summarised even when nothing follows it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BURST = 10
DEFAULT_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Summary:
    """What one interval let through and what it held back."""

    passed: int
    suppressed: int
    by_key: dict[str, int]
    interval_s: float


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)


class RateLimiter:
    """First ``burst`` calls of :meth:`admit` per ``interval_s`` pass; the rest are counted."""

    def __init__(
        self,
        on_summary: Callable[[Summary], None],
        *,
        burst: int = DEFAULT_BURST,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        timers: bool = True,
    ) -> None:
        if burst < 1 or interval_s <= 0:
            raise ValueError("a rate limiter needs burst >= 1 and interval_s > 0")
        self.on_summary = on_summary
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self.timers = timers  # False: the caller (a test with a fake clock) calls flush()
        self.suppressed_total = 0
        self._window: _Window | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def admit(self, key: str) -> bool:
        """True: report this one. False: it is counted under ``key`` for the interval's summary."""
        now = self.clock()
        ended = None
        with self._lock:
            window = self._window
            if window is not None and now >= window.start + self.interval_s:
                ended, window = self._close(window), None
            if window is None:
                window = self._window = _Window(now)
            if window.passed < self.burst:
                window.passed += 1
                admitted = True
            else:
                window.suppressed[key] += 1
                self.suppressed_total += 1
                admitted = False
                self._arm(window, now)
        if ended is not None:
            self.on_summary(ended)
        return admitted

    def flush(self) -> Summary | None:
        """End the current interval now; hand its summary over if it suppressed anything."""
        with self._lock:
            window, self._window = self._window, None
            ended = self._close(window) if window is not None else None
        if ended is not None:
            self.on_summary(ended)
        return ended

    def close(self) -> None:
        """Summarise what is pending and stop the timer."""
        self.flush()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _close(self, window: _Window) -> Summary | None:
        # Called with the lock held; None when the interval suppressed nothing.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not window.suppressed:
            return None
        return Summary(
            window.passed, sum(window.suppressed.values()), dict(window.suppressed), self.interval_s
        )

    def _arm(self, window: _Window, now: float) -> None:
        if not self.timers or self._timer is not None:
            return
        self._timer = threading.Timer(max(0.0, window.start + self.interval_s - now), self._expire, (window,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, window: _Window) -> None:
        with self._lock:
            if self._window is not window:
                return  # already closed by admit() or flush()
            self._timer = None
            self._window = None
            ended = self._close(window)
        if ended is not None:
            self.on_summary(ended)


class RefusalReporter:
    """Log and publish refusals through a :class:`RateLimiter`; summaries the same way.

    ``publish(kind, **fields)`` sends an event (the agent's ``_event``).
    """

    def __init__(self, publish: Callable[..., None], **limits: Any) -> None:
        self.publish = publish
        self.limiter = RateLimiter(self._summarise, **limits)

    def refused(self, what: str, code: str, reason: str, detail: dict[str, Any]) -> bool:
        """Report one refusal unless over the rate; True when it was reported."""
        if not self.limiter.admit(code):
            return False
        log.warning("refused %s on %s: %s", what, detail.get("topic", "?"), reason)
        self.publish("refused", code=code, reason=reason, detail=detail)
        return True

    def _summarise(self, summary: Summary) -> None:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(summary.by_key.items()))
        reason = (
            f"{summary.suppressed} more refusals in {summary.interval_s:.0f} s were not reported "
            f"one by one ({codes})"
        )
        log.warning("%s", reason)
        detail = {
            "suppressed": summary.suppressed,
            "by_code": summary.by_key,
            "interval_s": summary.interval_s,
        }
        self.publish("refused", code="refusals_suppressed", reason=reason, detail=detail)

    def close(self) -> None:
        self.limiter.close()
