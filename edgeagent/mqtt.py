"""The MQTT session: owns one paho-mqtt client and its connection, completely.

* MQTT 3.1.1 by default (5 optional); TLS and mutual TLS; a last will.
* paho's own reconnect is off: one network thread runs ``loop()`` and, when the
  connection drops, reconnects with exponential backoff and full jitter (:class:`Backoff`).
* Subscriptions are restored on every connect, then the owner's ``on_connect`` runs (the
  agent republishes its retained reported state there).
* Messages go to their handler through a bounded queue served by worker threads; a full
  queue, an oversized message or a handler that raises is logged and counted, never fatal.
  Handlers marked ``inline`` run on the network thread (block replies: a pwrite each).
* Publishing while disconnected does not queue unboundedly: it returns False and counts.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.errors import UsageError
from edgeagent.ratelimit import RateLimiter, Summary

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
CONNACK_TIMEOUT_S = 10.0
ROUTE_CACHE_SIZE = 4096  # distinct topics remembered for routing (an agent sees a handful)


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the broker; ``cert_file``+``key_file`` add mutual TLS (client certificate)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False

    @classmethod
    def from_files(cls, ca: object | None, cert: object | None, key: object | None) -> TLSConfig | None:
        """TLS from optional file paths; None when neither a CA nor a client certificate is given."""
        if not ca and not cert:
            return None
        return cls(
            ca_file=str(ca) if ca else None,
            cert_file=str(cert) if cert else None,
            key_file=str(key) if key else None,
        )


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach the broker. Build it from a URL with :meth:`from_url`."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    tls: TLSConfig | None = None
    keepalive_s: int = 30

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> BrokerConfig:
        """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://host[:8883]`` (TLS with system CAs)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
            raise UsageError(f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
        secure = parsed.scheme in ("mqtts", "ssl")
        tls = kwargs.pop("tls", None) or (TLSConfig() if secure else None)
        try:
            port = parsed.port or (8883 if secure else 1883)
        except ValueError as exc:
            raise UsageError(f"broker URL {url!r} has a bad port") from exc
        return cls(
            host=parsed.hostname,
            port=port,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            tls=tls,
            **kwargs,
        )

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)]."""

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int


Handler = Callable[[Message], None]


@dataclass
class _Subscription:
    topic_filter: str  # as subscribed (may be $share/...)
    match_filter: str  # what incoming topics are matched against
    handler: Handler
    qos: int
    inline: bool
    max_bytes: int


@dataclass
class SessionStats:
    """Counters a session keeps (exported in telemetry)."""

    connects: int = 0
    disconnects: int = 0
    received: int = 0
    dropped_queue_full: int = 0
    dropped_oversize: int = 0
    dropped_unrouted: int = 0
    handler_errors: int = 0
    publish_failed: int = 0


class SessionState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class MqttSession:
    """One connection to the broker, kept up until :meth:`close`."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
        queue_size: int = 1000,
        workers: int = 1,
        max_inflight: int = 64,
        backoff: Backoff | None = None,
        clean_session: bool = True,
        connect_log_level: int = logging.WARNING,
    ) -> None:
        self.broker = broker
        # A one-shot host command reports a failed connection in its own error line (with
        # last_connect_error), so it logs each attempt below the default level.
        self.connect_log_level = connect_log_level
        self.last_connect_error: str | None = None
        # False: the broker keeps this client id's subscriptions and queues its QoS 1 messages
        # while it is away (a collector that must not lose telemetry across a restart).
        self.clean_session = clean_session
        self.client_id = client_id
        self.stats = SessionStats()
        self._on_connect_cb = on_connect
        self._subs: list[_Subscription] = []
        # topic -> matching subscriptions: matching every filter on every message cost a
        # fifth of a busy subscriber's time. Bounded; cleared when subscriptions change.
        self._route_cache: dict[str, tuple[_Subscription, ...]] = {}
        self._subs_lock = threading.Lock()
        self._queue: queue.Queue[tuple[_Subscription, Message] | None] = queue.Queue(maxsize=queue_size)
        self._workers_n = workers
        self._threads: list[threading.Thread] = []
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._state = SessionState.NEW
        self._backoff = backoff or Backoff()
        # A flood must not become as many log lines: drops are logged at a bounded rate.
        self._drop_log = RateLimiter(self._log_drops)
        self._client = self._make_client(will, max_inflight)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> MqttSession:
        if self._state is SessionState.CLOSED:
            raise UsageError("cannot restart a closed MQTT session; make a new one")
        if self._state is SessionState.RUNNING:
            return self
        self._state = SessionState.RUNNING
        net = threading.Thread(target=self._network_loop, name=f"mqtt-{self.client_id}", daemon=True)
        self._threads.append(net)
        for i in range(self._workers_n):
            self._threads.append(
                threading.Thread(target=self._worker, name=f"mqtt-{self.client_id}-w{i}", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        return self

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def close(self, *, publish_last: tuple[str, bytes, bool] | None = None) -> None:
        """Stop the session. ``publish_last`` (topic, payload, retain) is sent first if connected
        (the agent's clean "offline" state, since a clean disconnect does not fire the will)."""
        if self._state is SessionState.CLOSED:
            return
        if publish_last is not None and self.connected:
            info = self._client.publish(publish_last[0], publish_last[1], qos=1, retain=publish_last[2])
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._state = SessionState.CLOSED
        self._stop.set()
        self._drop_log.close()
        for _ in range(self._workers_n):
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(timeout=5)
        # The network thread has stopped: send DISCONNECT and flush it from here.
        with contextlib.suppress(OSError, ValueError):
            if self._client.is_connected():
                self._client.disconnect()
                self._client.loop(timeout=0.1)

    def __enter__(self) -> MqttSession:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- subscribe / publish -----------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        inline: bool = False,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """Route messages on ``topic_filter`` (``$share/g/...`` allowed) to ``handler``."""
        match = topic_filter
        if topic_filter.startswith("$share/"):
            match = topic_filter.split("/", 2)[2]
        sub = _Subscription(topic_filter, match, handler, qos, inline, max_bytes)
        with self._subs_lock:
            self._subs.append(sub)
            self._route_cache.clear()
        if self.connected:
            self._client.subscribe(topic_filter, qos=qos)

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message for sending; False (and counted) when not connected."""
        if not self.connected:
            self.stats.publish_failed += 1
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.stats.publish_failed += 1
            return False
        return True

    def publish_tracked(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo | None:
        """Like :meth:`publish`, but returns paho's handle so the caller can tell when the broker
        acknowledged it (``is_published()``); None (and counted) when it was not queued."""
        if not self.connected:
            self.stats.publish_failed += 1
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.stats.publish_failed += 1
            return None
        return info

    # --- internals ---------------------------------------------------------------------

    def _make_client(self, will: tuple[str, bytes] | None, max_inflight: int) -> paho.Client:
        protocol = paho.MQTTv5 if self.broker.protocol == "5" else paho.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            clean_session=self.clean_session if protocol == paho.MQTTv311 else None,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(max_inflight)
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        tls = self.broker.tls
        if tls is not None:
            client.tls_set(
                ca_certs=tls.ca_file,
                certfile=tls.cert_file,
                keyfile=tls.key_file,
                cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
            )
            if tls.insecure_skip_verify:
                client.tls_insecure_set(True)
            # paho writes a publish at once in the caller's thread, but an OpenSSL connection
            # must not be written by one thread while another reads it (the network thread):
            # that broke the record stream ("bad record mac") and cost a reconnect and the
            # messages in flight. With a write callback set, paho leaves every write to
            # loop(), on the network thread, which the socketpair wakes at once.
            client.on_socket_register_write = _write_on_network_thread
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_socket_open = _no_delay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        return client

    def _network_loop(self) -> None:
        first = True
        # After CONNECT is sent, is_connected() stays False until the CONNACK (a TLS handshake
        # takes a while): starting another connect meanwhile would break the one under way.
        pending_until = 0.0
        while not self._stop.is_set():
            if not self._client.is_connected() and time.monotonic() >= pending_until:
                if not self._connect(first):
                    self._wait_backoff()
                    continue
                first = False
                pending_until = time.monotonic() + CONNACK_TIMEOUT_S
            rc = self._client.loop(timeout=0.1)
            if rc != paho.MQTT_ERR_SUCCESS and not self._stop.is_set():
                self._connected.clear()
                pending_until = 0.0
                self._wait_backoff()

    def _wait_backoff(self) -> None:
        delay = self._backoff.next_delay()
        log.info("mqtt %s: reconnecting to %s in %.1f s", self.client_id, self.broker.url, delay)
        self._stop.wait(delay)

    def _connect(self, first: bool) -> bool:
        try:
            if first:
                self._client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
            else:
                self._client.reconnect()
        except (OSError, ssl.SSLError, paho.WebsocketConnectionError) as exc:
            self.last_connect_error = str(exc)
            log.log(
                self.connect_log_level,
                "mqtt %s: cannot connect to %s: %s",
                self.client_id,
                self.broker.url,
                exc,
            )
            return False
        return True

    def _handle_connect(
        self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("mqtt %s: broker refused the connection: %s", self.client_id, reason)
            return
        self.stats.connects += 1
        self._backoff.reset()
        with self._subs_lock:
            subs = list(self._subs)
        for sub in subs:
            client.subscribe(sub.topic_filter, qos=sub.qos)
        self._connected.set()
        log.info("mqtt %s: connected to %s", self.client_id, self.broker.url)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                self.stats.handler_errors += 1
                log.exception("mqtt %s: on_connect callback failed", self.client_id)

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _p: Any
    ) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            level = logging.INFO if self._stop.is_set() else logging.WARNING
            log.log(level, "mqtt %s: disconnected from %s (%s)", self.client_id, self.broker.url, reason)
        self._connected.clear()

    def _handle_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.stats.received += 1
        subs = self._route_cache.get(msg.topic)
        if subs is None:
            with self._subs_lock:
                subs = tuple(s for s in self._subs if paho.topic_matches_sub(s.match_filter, msg.topic))
                if len(self._route_cache) >= ROUTE_CACHE_SIZE:
                    self._route_cache.clear()
                self._route_cache[msg.topic] = subs
        if not subs:
            self.stats.dropped_unrouted += 1
            return
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos))
        # Every matching subscription gets the message, each under its own size limit.
        for sub in subs:
            if len(message.payload) > sub.max_bytes:
                self.stats.dropped_oversize += 1
                if self._drop_log.admit("oversize"):
                    log.warning(
                        "mqtt: dropped %d-byte message on %s (limit %d)",
                        len(message.payload),
                        msg.topic,
                        sub.max_bytes,
                    )
            elif sub.inline:
                self._dispatch(sub, message)
            else:
                try:
                    self._queue.put_nowait((sub, message))
                except queue.Full:
                    self.stats.dropped_queue_full += 1
                    if self._drop_log.admit("queue_full"):
                        log.warning("mqtt: handler queue full, dropped a message on %s", msg.topic)

    def _log_drops(self, summary: Summary) -> None:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.by_key.items()))
        log.warning(
            "mqtt %s: dropped %d more messages in %.0f s without logging each (%s)",
            self.client_id,
            summary.suppressed,
            summary.interval_s,
            kinds,
        )

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            self._dispatch(*item)

    def _dispatch(self, sub: _Subscription, message: Message) -> None:
        try:
            sub.handler(message)
        except Exception:
            # A handler bug must not take the agent down; it is counted and logged.
            self.stats.handler_errors += 1
            log.exception("mqtt: handler for %s failed on a message on %s", sub.topic_filter, message.topic)


def _write_on_network_thread(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    """Nothing to do: being set is what makes paho defer writes to loop() (see _make_client)."""


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on, so a small message (a block request, a PUBACK) can wait for a
    # delayed ACK (~40 ms). The broker's side needs the same: Mosquitto's set_tcp_nodelay
    # (docs/protocol.md); with both, small transfer windows ran ~10x faster in bench/transfer.py.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
