"""The collector: every device's reported state, events and telemetry, from MQTT into the fleet
database (SQLite, or PostgreSQL shared by several collectors: fleet/fleetdb.py).

    broker ──QoS 1──▶ receiver process ──batches──▶ bounded queue ──▶ writer thread ──▶ fleet.db
                      (the MQTT session,                             (parse, validate,  └─▶ FleetState
                       fleet/receiver.py)                             de-duplicate, one     (Prometheus)
                                                                      transaction a batch)

The MQTT side runs in a process of its own (fleet/receiver.py says why), so a slow disk never
stalls the connection and receiving and storing use two cores. The writer takes whatever has
queued since its last commit as one transaction, so batches grow with the load. A full queue
drops (counted, logged). Malformed messages (not JSON, wrong schema, a device id in the body
that differs from the topic's, over the size bound, an integer no database column holds) are
counted by reason and logged at most once per interval; none stops it. A batch the database
refuses is stored again message by message, so a message it cannot take costs only itself.

The session is persistent by default (clean session off, a fixed client id): while the
collector is away the broker queues its QoS 1 messages (up to Mosquitto's
``max_queued_messages``), and a restart picks them up. A clean :meth:`Collector.stop`
stores everything received before it returns; a kill loses what was queued in memory, unless
``ack_after_commit``: then each message is acknowledged to the broker only after its commit,
and the broker sends the rest again when the collector comes back. ``share`` splits telemetry
and events between the collectors of one MQTT shared-subscription group.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeagent.errors import MalformedMessage, UsageError
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import Event, Reported, Telemetry, Topics, parse
from fleet import fleetdb
from fleet.collector_stats import CollectorStats, RateLimitedLog
from fleet.receiver import KINDS, Item, Receiver, ReceiverConfig, ReceiverCounters
from fleet.state import FleetState

log = logging.getLogger(__name__)

DEFAULT_CLIENT_ID = "edgectl-collector"
DEFAULT_RETENTION_S = 7 * 86400.0
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
# Why a message was not stored although it arrived (edge_collector_malformed_total{reason}).
MALFORMED_REASONS = ("not_json", "schema", "device_mismatch", "oversize", "out_of_bounds", "unstorable")


class CollectorState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Collector:
    """Subscribe to every device's reported/events/telemetry and store them; usable in-process:

    >>> collector = Collector(BrokerConfig.from_url("mqtt://localhost:1883"), Path("fleet.db")).start()
    >>> ...
    >>> collector.stop()
    """

    def __init__(
        self,
        broker: BrokerConfig,
        db: str | Path,
        *,
        topics: Topics | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        persistent: bool = True,
        retention_s: float | None = DEFAULT_RETENTION_S,
        queue_size: int = 100_000,
        batch_max: int = 5000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        heartbeat_s: float = 5.0,
        share: str | None = None,
        ack_after_commit: bool = False,
    ) -> None:
        if retention_s is not None and retention_s <= 0:
            raise UsageError(f"retention must be positive, not {retention_s} s")
        if ack_after_commit and not persistent:
            # Without a session the broker forgets an unacknowledged message when we disconnect.
            raise UsageError("acknowledging after commit needs a persistent session (no --clean-session)")
        if share is not None and not share.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"--share {share!r}: letters, digits, '-' and '_' only")
        self.broker = broker
        self.db = db
        self.topics = topics or Topics()
        self.client_id = client_id
        self.persistent = persistent
        self.retention_s = retention_s
        self.batch_max = batch_max
        self.max_message_bytes = max_message_bytes
        self.heartbeat_s = heartbeat_s
        self.ack_after_commit = ack_after_commit
        self.stats = CollectorStats()
        self.fleet = FleetState()
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        # Each counter has one writer (reader thread, writer thread): no lock on the hot path.
        self._enqueued = 0
        self._processed = 0
        self._stopping = threading.Event()
        self._state = CollectorState.NEW
        self._malformed_log = RateLimitedLog()
        self._drop_log = RateLimitedLog()
        self._store_log = RateLimitedLog()
        self._conn = fleetdb.open_for_writing(db)  # a bad --db fails here, before any connection
        # One heartbeat per collector where several share a database (PostgreSQL).
        self._heartbeat_name = client_id if self._conn.kind == "postgresql" else ""
        config = ReceiverConfig(broker, client_id, self.topics.prefix, persistent, max_message_bytes,
                                log_level=logging.getLogger().getEffectiveLevel(), share=share,
                                ack_after_commit=ack_after_commit)  # fmt: skip
        self._receiver = Receiver(config, self._on_batch)
        self._receiver.on_counters(self._on_counters)
        self._queue_drops = 0
        self._oversize_seen = dict.fromkeys(KINDS, 0)
        self._writer = threading.Thread(target=self._write_loop, name="collector-writer", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def state(self) -> CollectorState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._receiver.connected

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> Collector:
        if self._state is not CollectorState.NEW:
            raise UsageError(f"cannot start a collector that is {self._state.value}; make a new one")
        self._state = CollectorState.RUNNING
        self._writer.start()
        self._receiver.start()
        return self

    def wait_connected(self, timeout_s: float) -> bool:
        return self._receiver.wait_connected(timeout_s)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything received so far is committed; False on timeout."""
        target = self._enqueued
        deadline = time.monotonic() + timeout_s
        while self._processed < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Disconnect, store what was received, close the database. Idempotent."""
        if self._state is not CollectorState.RUNNING:
            self._state = CollectorState.STOPPED
            self._conn.close()
            return
        self._state = CollectorState.STOPPED
        if self.ack_after_commit:
            # Commit and acknowledge what arrived while the receiver is still connected: an
            # acknowledgement after its disconnect is lost, and the broker would send those
            # messages again to the next process with this client id (stored once, but counted twice).
            self.flush(timeout_s)
        self._receiver.stop()  # no message arrives after this
        self._stopping.set()
        self._writer.join(timeout=timeout_s)
        if self._writer.is_alive():
            log.error("the writer did not finish within %.0f s; %d messages lost",
                      timeout_s, self._queue.qsize())  # fmt: skip
        else:
            self._conn.close()

    def retire(self, quiet_s: float = 2.0, timeout_s: float = 120.0) -> bool:
        """Leave for good, losing nothing: unsubscribe from every topic (so the broker stops
        giving this member a share), store and acknowledge what the broker still sends from
        this session's queue until nothing arrives for ``quiet_s``, then disconnect and remove
        the session at the broker (so it queues nothing more for it). False when the broker
        did not confirm or the queue did not drain within ``timeout_s`` (the session is then
        kept: a later ``retire`` finishes the job)."""
        if self._state is not CollectorState.RUNNING:
            raise UsageError(f"cannot retire a collector that is {self._state.value}")
        deadline = time.monotonic() + timeout_s
        if not self._receiver.wait_connected(timeout_s) or not self._receiver.retire(
            max(deadline - time.monotonic(), 0.0)
        ):
            log.error("the broker did not confirm the unsubscribe; stopping with the session kept")
            self.stop()
            return False
        drained = self._drain(quiet_s, deadline)
        if drained:
            self._state = CollectorState.STOPPED
            self._receiver.stop(forget_session=True)
            self._stopping.set()
            self._writer.join(timeout=max(deadline - time.monotonic(), 5.0))
            self._conn.close()
        else:
            log.error("messages kept arriving for %.0f s; stopping with the session kept", timeout_s)
            self.stop()
        return drained

    def _drain(self, quiet_s: float, deadline: float) -> bool:
        """Wait until nothing arrived for ``quiet_s`` and all of it is committed and
        acknowledged (the broker sends a session's queue as acknowledgements free it)."""
        while time.monotonic() < deadline:
            seen = self._enqueued
            if not self.flush(max(deadline - time.monotonic(), 0.0)):
                return False
            time.sleep(quiet_s)
            if self._enqueued == seen and self.flush(max(deadline - time.monotonic(), 0.0)):
                return True
        return False

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- receiver's reader thread ----------------------------------------------------------

    def _on_batch(self, items: list[Item]) -> None:
        for item in items:
            self.stats.received[item[0]] += 1
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._queue_drops += 1
                self.stats.dropped = self._queue_drops + self._receiver.counters.dropped
                self._drop_log.warning("queue full (%d), dropped a message on %s; the database cannot "
                                       "keep up", self._queue.maxsize, item[1])  # fmt: skip
                continue
            self._enqueued += 1

    def _on_counters(self, counters: ReceiverCounters) -> None:
        for kind, n in counters.oversize.items():
            # A restarted receiver counts from 0 again.
            new = n - self._oversize_seen[kind] if n >= self._oversize_seen[kind] else n
            self._oversize_seen[kind] = n
            if new:
                self.stats.received[kind] += new
                self.stats.malformed["oversize"] += new
        self.stats.dropped = self._queue_drops + counters.dropped

    # --- writer thread -----------------------------------------------------------------

    def _write_loop(self) -> None:
        # Retention runs often enough that a retention of minutes works, rarely enough to cost nothing.
        retention_every = min(max((self.retention_s or 0) / 20, 1.0), 300.0)
        next_heartbeat = 0.0
        next_retention = time.monotonic() + retention_every
        was_connected = False
        while not (self._stopping.is_set() and self._queue.empty()):
            items = self._take()
            if items:
                self._store(items)
            now = time.monotonic()
            if now >= next_heartbeat or self.connected != was_connected:  # views show a (dis)connect at once
                next_heartbeat = now + self.heartbeat_s
                was_connected = self.connected
                self._guard(fleetdb.write_heartbeat, self._conn, self._heartbeat(), self._heartbeat_name)
            if self.retention_s is not None and now >= next_retention:
                next_retention = now + retention_every
                self._apply_retention()
        self._guard(fleetdb.write_heartbeat, self._conn, self._heartbeat(stopped=True), self._heartbeat_name)

    def _take(self) -> list[Item]:
        """Whatever queued since the last commit (at least one item, or none after 0.2 s)."""
        try:
            items = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(items) < self.batch_max:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _store(self, items: list[Item]) -> None:
        batch = fleetdb.Batch()
        for item in items:
            self._parse_into(batch, *item)
        try:
            self._commit(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._refused(batch, exc)
            else:
                # One message the database refuses must not cost the others of its batch: store
                # them one by one, so only the refused one is lost (and counted).
                log.warning("a batch of %d messages failed (%s); storing them one by one", len(batch), exc)
                for single in batch.split():
                    try:
                        self._commit(single)
                    except Exception as single_exc:
                        self._refused(single, single_exc)
        if self.ack_after_commit:
            # Committed, or refused for good and counted: the broker may forget them now.
            self._receiver.ack([item[5] for item in items])
        self._processed += len(items)

    def _refused(self, batch: fleetdb.Batch, exc: Exception) -> None:
        if fleetdb.is_data_error(exc):
            self.stats.malformed["unstorable"] += len(batch)
            self._malformed_log.warning("the database refused a message: %s", exc)
        else:
            # A full disk or a locked file must not kill the collector; the message is lost, counted.
            self.stats.store_failed += len(batch)
            self._store_log.warning("could not store a message: %s", exc)

    def _commit(self, batch: fleetdb.Batch) -> None:
        stored = fleetdb.write_batch(self._conn, batch)
        self.stats.batches += 1
        self.stats.duplicates += stored.duplicates
        self.stats.stored["telemetry"] += len(stored.telemetry)
        self.stats.stored["events"] += stored.events
        self.stats.stored["reported"] += len(batch.reported)
        # Reported states first: telemetry of the same batch is labelled with their bundle names.
        for device, reported, received, retained in batch.reported:
            seen = fleetdb.reported_seen(reported, received, retained) if reported else None
            self.fleet.set_reported(device, reported, seen)
        self.fleet.add_telemetry(stored.telemetry)
        for event, _payload, received in batch.events:
            self.fleet.add_event(event.device, received, event)

    def _parse_into(
        self,
        batch: fleetdb.Batch,
        kind: str,
        topic: str,
        payload: bytes,
        retained: bool,
        received: float,
        _token: int = 0,
    ) -> None:
        device = self.topics.device_of(topic) or "?"
        try:
            if kind == "reported" and not payload:
                # An empty retained message clears the device's state: it left the fleet.
                batch.reported.append((device, None, received, retained))
                return
            if kind == "telemetry":
                telemetry = parse(Telemetry, payload, "telemetry")
                _check_device(device, telemetry.device)
                fleetdb.check_bounds(telemetry)
                batch.telemetry.append((telemetry, received))
            elif kind == "reported":
                reported = parse(Reported, payload, "reported state")
                _check_device(device, reported.device)
                batch.reported.append((device, reported, received, retained))
            else:
                event = parse(Event, payload, "event")
                _check_device(device, event.device)
                batch.events.append((event, payload, received))
        except MalformedMessage as exc:
            reason = _reason(exc)
            self.stats.malformed[reason] += 1
            self._malformed_log.warning("malformed %s from %s (%s): %s", kind, device, reason, exc)

    def _apply_retention(self) -> None:
        if self.retention_s is None:
            return
        cutoff = time.time() - self.retention_s
        deleted = self._guard(fleetdb.delete_older_than, self._conn, cutoff)
        if deleted:
            self.stats.retention_deleted += deleted
            log.info("retention removed %d rows older than %.0f s", deleted, self.retention_s)
        self.fleet.forget(cutoff)

    def _heartbeat(self, *, stopped: bool = False) -> dict[str, Any]:
        return {
            **self.stats.as_dict(),
            "connected": self.connected and not stopped,
            "stopped": stopped,
            "queue": self._queue.qsize(),
            "broker": self.broker.url,
            "client_id": self.client_id,
        }

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            log.exception("%s failed", getattr(fn, "__name__", fn))
            return None


class _DeviceMismatch(MalformedMessage):
    code = "device_mismatch"


def _check_device(topic_device: str, body_device: str) -> None:
    if topic_device != body_device:
        raise _DeviceMismatch(f"the topic names device {topic_device!r}, the message {body_device!r}")


def _reason(exc: MalformedMessage) -> str:
    if isinstance(exc, _DeviceMismatch | fleetdb.OutOfBounds):
        return exc.code
    cause = exc.__cause__
    if isinstance(cause, ValidationError) and any(e["type"] == "json_invalid" for e in cause.errors()):
        return "not_json"
    return "schema"
