"""The agent's telemetry loop: every interval, one :class:`~edgeagent.protocol.Telemetry` message.

Each interval takes the serving statistics (and resets them, so counts and percentiles are
per interval), adds process/system figures, the active bundles' acceptance, online accuracy
and drift, and hands the message to the broker or, when the broker is away, to the on-disk
:class:`~edgeagent.telemetry.spool.Spool`.

Delivery: a message is sent directly when the session is up and nothing older waits on disk;
it is forgotten only once the broker acknowledged it (QoS 1 PUBACK). Messages still
unacknowledged when the connection drops go to the spool, and the spool is sent oldest first
after reconnect with a bounded window in flight, each file deleted on its acknowledgement. So
the collector receives every message in sequence order, possibly twice (a message the broker
got but whose PUBACK was lost); it de-duplicates by (device, seq).

Online accuracy and drift accumulate *since the version became active* (per stats key), since
one interval's handful of labels says little; the counts in each message are per interval.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeagent.protocol import AcceptanceSummary, ModelTelemetry, SpoolTelemetry, Telemetry, Verdict
from edgeagent.serving.stats import KeyStats, RequestStats, StatsKey
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.system import SystemProbe

log = logging.getLogger(__name__)

DRIFT_MIN_PREDICTIONS = 50  # below this a class distribution is noise, not drift
FLUSH_WINDOW = 32  # spooled messages in flight after a reconnect
PUMP_S = 0.05  # how often acknowledgements are checked while something is in flight


class _Tracked(Protocol):
    def is_published(self) -> bool: ...


class TelemetrySession(Protocol):
    """What the reporter needs from :class:`~edgeagent.mqtt.MqttSession`."""

    @property
    def connected(self) -> bool: ...

    def publish_tracked(self, topic: str, payload: bytes | str, *, qos: int = 1) -> Any: ...


@dataclass
class _Since:
    """Cumulative figures of one stats key since it first answered."""

    labelled: int = 0
    correct: int = 0
    predicted: Counter[int] = field(default_factory=Counter)


@dataclass
class _InFlight:
    seq: int
    payload: bytes
    info: _Tracked
    spooled: bool  # the payload is also on disk (delete the file on acknowledgement)


@dataclass(frozen=True)
class ActiveModel:
    """What the reporter needs to know about a served model (from the server's slots)."""

    version: str
    runtime: str
    delegate: str
    verdict: Verdict | None
    bundle: str | None = None  # the bundle's name (the model slot may be named differently)


def total_variation(observed: Mapping[int, int], reference: Mapping[int, int]) -> float:
    """Half the L1 distance between two class distributions: 0 = identical, 1 = disjoint."""
    n_obs, n_ref = sum(observed.values()), sum(reference.values())
    if not n_obs or not n_ref:
        return 0.0
    classes = set(observed) | set(reference)
    return 0.5 * sum(abs(observed.get(c, 0) / n_obs - reference.get(c, 0) / n_ref) for c in classes)


class TelemetryReporter:
    """Builds and delivers telemetry; :meth:`start` runs it on its own thread."""

    def __init__(
        self,
        *,
        device_id: str,
        topic: str,
        session: TelemetrySession | None,
        stats: RequestStats,
        active: Callable[[], Mapping[str, ActiveModel]],
        probe: SystemProbe,
        spool: Spool,
        interval_s: float,
        groups: list[str] | None = None,
        profile: str | None = None,
        mqtt_counters: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.device_id = device_id
        self.topic = topic
        self.session = session
        self.stats = stats
        self.active = active
        self.probe = probe
        self.spool = spool
        self.interval_s = interval_s
        self.groups = list(groups or [])
        self.profile = profile
        self._mqtt_counters = mqtt_counters
        self._clock = clock
        self._wall = wall
        self._since: dict[StatsKey, _Since] = {}
        self._last_collect = clock()
        self._inflight: deque[_InFlight] = deque()
        self._lock = threading.Lock()  # collect/deliver vs close
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0  # acknowledged by the broker, this run

    # --- building a message --------------------------------------------------------------

    def collect(self) -> Telemetry:
        """One interval's message (resets the serving statistics' interval)."""
        now = self._clock()
        elapsed = max(now - self._last_collect, 1e-6)
        self._last_collect = now
        snapshot = self.stats.snapshot(reset=True)
        active = dict(self.active())
        models = [self._model(key, stats, elapsed, active) for key, stats in sorted(snapshot.items())]
        self._forget_retired(set(snapshot), active)
        return Telemetry(
            device=self.device_id,
            seq=self.spool.next_seq(),
            at=self._wall(),
            interval_s=max(round(elapsed, 3), 0.001),
            groups=self.groups,
            profile=self.profile,
            models=models,
            acceptance={name: _acceptance(model) for name, model in sorted(active.items())},
            process=self.probe.process(),
            system=self.probe.system(),
            spool=SpoolTelemetry(
                queued=len(self.spool), dropped=self.spool.dropped, dropped_total=self.spool.dropped_total
            ),
            mqtt=dict(self._mqtt_counters()) if self._mqtt_counters else {},
        )

    def _model(
        self, key: StatsKey, stats: KeyStats, elapsed: float, active: Mapping[str, ActiveModel]
    ) -> ModelTelemetry:
        since = self._since.setdefault(key, _Since())
        since.labelled += stats.labelled
        since.correct += stats.correct
        since.predicted.update(stats.predicted)
        summary = stats.summary()
        drift = None
        model = active.get(key.model)
        if model is not None and model.version != key.version:
            model = None  # a retired version still answering requests that started before the swap
        reference = _reference_classes(model) if model is not None else None
        if reference and sum(since.predicted.values()) >= DRIFT_MIN_PREDICTIONS:
            drift = round(total_variation(since.predicted, reference), 4)
        return ModelTelemetry(
            model=key.model,
            bundle=model.bundle if model is not None else None,
            version=key.version,
            runtime=key.runtime,
            delegate=key.delegate,
            count=stats.latency.count,
            client_errors=stats.client_errors,
            server_errors=stats.server_errors,
            throughput_rps=round(stats.latency.count / elapsed, 3),
            p50_ms=summary["p50_ms"],
            p90_ms=summary["p90_ms"],
            p99_ms=summary["p99_ms"],
            p999_ms=summary["p999_ms"],
            max_ms=summary["max_ms"],
            latency_hist=stats.latency.to_dict() if stats.latency.count else None,
            labelled=stats.labelled,
            correct=stats.correct,
            online_accuracy=round(since.correct / since.labelled, 4) if since.labelled else None,
            predicted={str(c): n for c, n in sorted(stats.predicted.items())},
            drift=drift,
        )

    def _forget_retired(self, seen: set[StatsKey], active: Mapping[str, ActiveModel]) -> None:
        # Keys of versions no longer served and silent this interval will not come back
        # (a new activation is a new key); dropping them keeps memory bounded.
        live = {(name, m.version, m.runtime, m.delegate) for name, m in active.items()}
        for key in list(self._since):
            if key not in seen and tuple(key) not in live:
                del self._since[key]

    # --- delivery ------------------------------------------------------------------------

    def submit(self, message: Telemetry) -> None:
        """Send ``message`` now when possible, else put it in the spool."""
        payload = message.model_dump_json(exclude_none=True).encode()
        with self._lock:
            self._settle()  # acknowledged spool messages leave it, so this one can go directly
            if self._can_send() and not len(self.spool):
                info = self._publish(payload)
                if info is not None:
                    self._inflight.append(_InFlight(message.seq, payload, info, spooled=False))
                    return
            self.spool.put(message.seq, payload)

    def pump(self) -> None:
        """Settle acknowledgements, spill to disk on disconnect, send the spool after reconnect."""
        with self._lock:
            self._settle()
            if not self._can_send():
                self._spill()
                return
            room = FLUSH_WINDOW - len(self._inflight)
            if room <= 0:
                return
            flying = {f.seq for f in self._inflight}
            waiting = [seq for seq in self.spool.seqs() if seq not in flying]
            for seq in waiting[:room]:
                payload = self.spool.read(seq)
                if payload is None:
                    continue
                info = self._publish(payload)
                if info is None:
                    break
                self._inflight.append(_InFlight(seq, payload, info, spooled=True))

    @property
    def backlog(self) -> int:
        """Messages not yet acknowledged (in flight or on disk)."""
        with self._lock:
            self._settle()
            on_disk = set(self.spool.seqs())
            return len(on_disk) + sum(1 for f in self._inflight if f.seq not in on_disk)

    def _can_send(self) -> bool:
        return self.session is not None and self.session.connected

    def _publish(self, payload: bytes) -> _Tracked | None:
        assert self.session is not None
        info: _Tracked | None = self.session.publish_tracked(self.topic, payload, qos=1)
        return info

    def _settle(self) -> None:
        remaining: deque[_InFlight] = deque()
        for flight in self._inflight:
            if flight.info.is_published():
                self.sent += 1
                if flight.spooled:
                    self.spool.remove(flight.seq)
            else:
                remaining.append(flight)
        self._inflight = remaining

    def _spill(self) -> None:
        # Unacknowledged messages may or may not have reached the broker: keep them on disk
        # and send them again (the collector drops a duplicate seq).
        for flight in self._inflight:
            if not flight.spooled:
                self.spool.put(flight.seq, flight.payload)
        self._inflight.clear()

    # --- thread --------------------------------------------------------------------------

    def start(self) -> TelemetryReporter:
        self._last_collect = self._clock()
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop; what is not acknowledged yet stays in the spool for the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            self._settle()
            self._spill()

    def _loop(self) -> None:
        due = self._clock() + self.interval_s
        while not self._stop.is_set():
            busy = bool(self._inflight) or bool(len(self.spool))
            wait = due - self._clock()
            self._stop.wait(max(0.0, min(wait, PUMP_S) if busy else min(wait, 1.0)))
            if self._stop.is_set():
                return
            try:
                if self._clock() >= due:
                    self.submit(self.collect())
                    # The next interval starts now: a slow interval does not cause a burst.
                    due = max(due + self.interval_s, self._clock())
                self.pump()
            except Exception:  # a telemetry bug must not take inference down with it
                log.exception("telemetry: interval failed")
                due = self._clock() + self.interval_s


def _reference_classes(model: ActiveModel) -> dict[int, int] | None:
    counts = model.verdict.predicted_classes if model.verdict is not None else None
    if counts is None:
        return None
    try:
        return {int(c): int(n) for c, n in counts.items()}
    except (TypeError, ValueError):
        return None


def _acceptance(model: ActiveModel) -> AcceptanceSummary:
    return AcceptanceSummary.of(
        model.verdict, version=model.version, runtime=model.runtime, delegate=model.delegate
    )


def session_counters(session: Any) -> Callable[[], dict[str, int]]:
    """A counters callable over :class:`~edgeagent.mqtt.SessionStats` (a dataclass)."""
    return lambda: {k: int(v) for k, v in dataclasses.asdict(session.stats).items()}
