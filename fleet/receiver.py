"""The collector's MQTT side, in a process of its own.

paho handles every packet in Python (a few syscalls and a PUBACK per message). In one process
with the writer thread, the two shared one interpreter lock: each message cost both threads a
lock hand-over, and bench/telemetry.py sustained half the target rate. Here a child process
owns the MQTT session and ships what arrives to the parent in pickled batches every few
milliseconds, so the receiving and the storing run on two cores.

The child keeps the session semantics of :class:`~edgeagent.mqtt.MqttSession` (reconnect with
backoff, TLS, subscriptions restored on connect) with a persistent session when asked. It
stops when the parent says so or goes away; if it dies, the parent starts a new one (the
broker has kept the session). Oversize messages are counted and dropped in the child, so
they never cross the pipe.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as paho

from edgeagent.mqtt import Backoff, BrokerConfig, Message, MqttSession
from edgeagent.protocol import Topics

log = logging.getLogger(__name__)

KINDS = ("telemetry", "reported", "events")
FLUSH_S = 0.005  # how often the child ships what arrived
BATCH_MAX = 2000  # items per pickled batch

# (kind, topic, payload, retained, received at as Unix s, ack token: 0, or the connection's
# generation << 16 | the packet id when the collector acknowledges after its commit)
Item = tuple[str, str, bytes, bool, float, int]
# Routed to by the topic's last level: (message, ack token).
Route = Callable[[Message, int], None]


@dataclass(frozen=True)
class ReceiverConfig:
    broker: BrokerConfig
    client_id: str
    prefix: str
    persistent: bool
    max_message_bytes: int
    pending_max: int = 100_000  # items the child holds when the parent does not read
    log_level: int = logging.WARNING
    share: str | None = None  # telemetry and events through $share/{share}/...: collectors split them
    ack_after_commit: bool = False  # PUBACK only once the collector committed the message


@dataclass
class ReceiverCounters:
    """Cumulative counts of the current child (a restarted child starts again at 0)."""

    oversize: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dropped: int = 0  # the parent did not read fast enough


class _IngestSession(MqttSession):
    """The MQTT session (reconnect, TLS, re-subscribing on connect) with a persistent session when
    asked (the broker keeps the subscriptions and queues QoS 1 messages while the collector
    restarts) and one route per message by the topic's last level: fleet topics are unbounded
    (one per device), so MqttSession's per-topic route cache would only churn here.

    With ``manual_ack`` paho sends no PUBACK by itself: :meth:`ack` sends it once the collector
    committed the message, so a collector killed before its commit leaves the message with the
    broker, which sends it again when the session reconnects. Packet ids are per connection, so
    an ack token carries the connection's generation and a stale one is ignored (the broker
    resends that message on the new connection, where it is acknowledged in turn).
    """

    def __init__(self, broker: BrokerConfig, client_id: str, *, persistent: bool, manual_ack: bool) -> None:
        self._persistent = persistent
        self._manual_ack = manual_ack
        self._routes: dict[str, Route] = {}
        self.generation = 0
        super().__init__(
            broker, client_id, queue_size=1, clean_session=not persistent, on_connect=self._next_generation
        )
        if manual_ack:
            self._client.manual_ack_set(True)

    def _next_generation(self) -> None:
        # paho's network thread: runs before any message of the new connection is handled.
        self.generation = (self.generation + 1) % (1 << 40)
        if self.unsubscribed is not None:
            self._unsubscribe_all()  # the broker kept them in the session: ask again

    unsubscribed: threading.Event | None = None  # set once the broker confirmed (retiring)
    _retired: tuple[str, ...] = ()

    def retire(self) -> threading.Event:
        """Unsubscribe from every topic (and never subscribe again on a reconnect); the event
        is set once the broker confirmed it: from then on it sends nothing new, only what
        it already holds for this session."""
        with self._subs_lock:
            self._retired = tuple(s.topic_filter for s in self._subs)
            self._subs.clear()
        self._client.on_unsubscribe = self._handle_unsubscribe
        self.unsubscribed = threading.Event()
        if self.connected:
            self._unsubscribe_all()
        return self.unsubscribed

    def _unsubscribe_all(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._client.unsubscribe(list(self._retired))

    def _handle_unsubscribe(self, *_args: Any) -> None:
        if self.unsubscribed is not None:
            self.unsubscribed.set()

    def route(self, topic_filter: str, handler: Route) -> None:
        """Subscribe (QoS 1) and send messages whose topic ends like ``topic_filter`` to ``handler``."""
        self._routes[topic_filter.rsplit("/", 1)[1]] = handler
        self.subscribe(topic_filter, _unused_handler, qos=1, inline=True)

    def ack(self, tokens: list[int]) -> None:
        generation = self.generation
        for token in tokens:
            if token and token >> 16 == generation:
                self._client.ack(token & 0xFFFF, 1)

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.stats.received += 1
        token = (self.generation << 16 | msg.mid) if self._manual_ack and msg.qos > 0 else 0
        handler = self._routes.get(msg.topic.rsplit("/", 1)[-1])
        if handler is None:
            self.stats.dropped_unrouted += 1
            self.ack([token])
            return
        handler(Message(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos)), token)


def _unused_handler(_message: Message) -> None:
    """MqttSession wants a handler per subscription; _IngestSession routes by itself."""


class Receiver:
    """Runs the child and hands each batch to ``deliver`` on the parent's reader thread."""

    def __init__(self, config: ReceiverConfig, deliver: Callable[[list[Item]], None]) -> None:
        self.config = config
        self.counters = ReceiverCounters()
        self.restarts = 0
        self._deliver = deliver
        self._on_counters: Callable[[ReceiverCounters], None] = lambda _c: None
        self._connected = threading.Event()
        self._unsubscribed = threading.Event()
        self._stopping = threading.Event()
        self._ctx = mp.get_context("spawn")  # fork is unsafe in a process that has threads
        self._proc: Any = None
        self._data: Connection | None = None
        self._cmd: Connection | None = None
        self._cmd_lock = threading.Lock()  # the writer thread's acks and stop() share the pipe
        self._reader = threading.Thread(target=self._read_loop, name="collector-receiver", daemon=True)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def on_counters(self, callback: Callable[[ReceiverCounters], None]) -> None:
        self._on_counters = callback

    def start(self) -> None:
        self._spawn()
        self._reader.start()

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge committed messages to the broker (``ack_after_commit``). Tokens of a
        receiver that has since died are ignored: the broker sends those messages again."""
        tokens = [t for t in tokens if t]
        if not tokens or self._cmd is None:
            return
        with self._cmd_lock, contextlib.suppress(OSError, ValueError):  # the child is gone
            self._cmd.send(("ack", tokens))

    def retire(self, timeout_s: float) -> bool:
        """Unsubscribe from every topic; True once the broker confirmed it."""
        self._unsubscribed.clear()
        if self._cmd is not None:
            with self._cmd_lock, contextlib.suppress(OSError):
                self._cmd.send("retire")
        return self._unsubscribed.wait(timeout_s)

    def stop(self, timeout_s: float = 15.0, *, forget_session: bool = False) -> None:
        """Ask the child to disconnect (and with ``forget_session``, to remove its session at the
        broker); return once its last batch was delivered."""
        self._stopping.set()
        if self._cmd is not None:
            with self._cmd_lock, contextlib.suppress(OSError):  # already gone
                self._cmd.send("forget" if forget_session else "stop")
        self._reader.join(timeout=timeout_s)
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
        self._close_pipes()
        self._connected.clear()

    def _close_pipes(self) -> None:
        for conn in (self._data, self._cmd):
            if conn is not None:
                conn.close()

    def _spawn(self) -> None:
        self._close_pipes()  # a dead child's
        data_r, data_w = self._ctx.Pipe(duplex=False)
        cmd_r, cmd_w = self._ctx.Pipe(duplex=False)
        self._proc = self._ctx.Process(
            target=_child_main, args=(data_w, cmd_r, self.config), name="edgectl-collector-mqtt", daemon=True
        )
        self._proc.start()
        data_w.close()  # the child's ends: EOF on ours when it exits
        cmd_r.close()
        self._data, self._cmd = data_r, cmd_w
        self.counters = ReceiverCounters()

    def _read_loop(self) -> None:
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        while self._data is not None:
            try:
                message = self._data.recv()
            except (EOFError, OSError):
                self._connected.clear()
                if self._stopping.is_set():
                    return
                code = self._proc.exitcode if self._proc is not None else None
                delay = backoff.next_delay()
                log.error(
                    "the MQTT receiver process exited (code %s); starting another in %.1f s", code, delay
                )
                if self._stopping.wait(delay):
                    return
                self.restarts += 1
                self._spawn()
                continue
            what = message[0]
            if what == "batch":
                self._deliver(message[1])
            elif what == "unsubscribed":
                self._unsubscribed.set()
            elif what in ("status", "stopped"):
                backoff.reset()
                if message[1]:
                    self._connected.set()
                else:
                    self._connected.clear()
                self.counters = message[2]
                self._on_counters(self.counters)
                if what == "stopped":
                    return


# --- the child process --------------------------------------------------------------------


def _child_main(data: Connection, cmd: Connection, config: ReceiverConfig) -> None:
    # Ctrl-C in a terminal and systemd's SIGTERM reach every process of the group; the parent
    # decides when the receiver stops (it stores the last batch first), and a receiver whose
    # parent is gone stops on the pipe's EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level, format="%(levelname)s %(name)s: %(message)s")
    pending: list[Item] = []
    lock = threading.Lock()
    counters = ReceiverCounters()
    topics = Topics(config.prefix)

    session = _IngestSession(
        config.broker, config.client_id, persistent=config.persistent, manual_ack=config.ack_after_commit
    )

    def on_message(kind: str, msg: Message, token: int) -> None:
        if len(msg.payload) > config.max_message_bytes:
            counters.oversize[kind] += 1
            log.warning("dropped a %d-byte message on %s (limit %d)", len(msg.payload), msg.topic,
                        config.max_message_bytes)  # fmt: skip
            session.ack([token])  # refused for good: redelivering it would not help
            return
        with lock:
            if len(pending) >= config.pending_max:
                counters.dropped += 1  # not acknowledged: the broker sends it again after a reconnect
                return
            pending.append((kind, msg.topic, msg.payload, msg.retain, time.time(), token))

    for kind in KINDS:
        topic_filter = topics.all_devices(kind)
        # Retained reported states are not delivered to shared subscriptions, and every
        # collector keeps the device table: reported is never shared.
        if config.share and kind != "reported":
            topic_filter = f"$share/{config.share}/{topic_filter}"
        session.route(topic_filter, functools.partial(on_message, kind))
    stop = threading.Event()
    forget = threading.Event()
    retired: list[threading.Event] = []

    def watch_parent() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                # ("ack", tokens), "retire", "stop", "forget" (stop and remove the session), or
                # EOF when the parent is gone.
                order = cmd.recv()
                if order in ("stop", "forget"):
                    if order == "forget":
                        forget.set()
                    break
                if order == "retire":
                    retired.append(session.retire())
                    continue
                session.ack(order[1])
        stop.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    session.start()
    last: tuple[object, ...] = ()

    def ship(final: bool = False) -> None:
        nonlocal last
        with lock:
            batch = pending[:]
            pending.clear()
        for i in range(0, len(batch), BATCH_MAX):
            data.send(("batch", batch[i : i + BATCH_MAX]))
        if retired and retired[0].is_set():
            data.send(("unsubscribed",))
            retired.clear()
        state = (session.connected, counters.dropped, tuple(counters.oversize.values()))
        if final or state != last:
            data.send(("stopped" if final else "status", session.connected and not final, counters))
            last = state

    try:
        while not stop.wait(FLUSH_S):
            ship()
        session.close()  # DISCONNECT: a persistent session stays at the broker
        if forget.is_set():
            _forget_session(config)
        ship(final=True)
    except (BrokenPipeError, EOFError, OSError):
        session.close()  # the parent is gone


def _forget_session(config: ReceiverConfig) -> None:
    """Remove this client id's session at the broker: connect once with a clean session (MQTT
    5: clean start, no session expiry) and disconnect. Only after the old session's messages
    were stored and acknowledged: the broker drops whatever the session still held."""
    forgetting = MqttSession(config.broker, config.client_id, clean_session=True, queue_size=1)
    try:
        forgetting.start()
        if not forgetting.wait_connected(10):
            log.error("could not reconnect to remove the session of %s at the broker", config.client_id)
    finally:
        forgetting.close()
