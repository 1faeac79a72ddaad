"""The local inference server on a Unix socket: hot-swappable named models, timed requests.

Endpoints (see ``docs/runtimes.md`` for bodies and examples):

=======  ===============================  =============================================
GET      /v1/health                       200 when at least one model is served, else 503
GET      /v1/models                       every served model: bundle, version, io specs,
                                          runtime, delegate, selection decision, verdict
GET      /v1/models/{name}                one of them
POST     /v1/predict                      the default (or only) model
POST     /v1/models/{name}/predict        a named model
DELETE   /v1/sessions/{id}                forget a session's state (default model)
DELETE   /v1/models/{name}/sessions/{id}  the same for a named model
POST     /v1/feedback                     the true label of an earlier prediction
GET      /v1/stats                        latency percentiles, errors, labels and predicted
                                          classes per (model, version, runtime, delegate)
=======  ===============================  =============================================

A connection speaks HTTP/1.1, or length-prefixed binary frames when it starts with
:data:`~edgeagent.serving.frames.PREFACE` (the Python client's default: no text to parse
on either side). The wire side lives in :mod:`edgeagent.serving.endpoints`; this module
holds the models, the in-process API and the lifecycle.

Inference runs on the connection's own thread, so a request costs no hand-off between
threads; ONNX Runtime releases the GIL while it runs, LiteRT sessions serialise on their
own lock. Nothing a client sends can stop the server: every failure of one request
becomes a 4xx/5xx with a JSON reason on that connection only.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.errors import InferenceError, InputError, UsageError
from edgeagent.serving.endpoints import Endpoints, error_reply
from edgeagent.serving.http import HttpError, HttpLimits
from edgeagent.serving.recent import DEFAULT_CAPACITY, RecentPredictions
from edgeagent.serving.sessions import DEFAULT_IDLE_S, DEFAULT_MAX_SESSIONS, SessionStore
from edgeagent.serving.slots import Lease, ModelSlot, ServedModel
from edgeagent.serving.stats import RequestStats

log = logging.getLogger(__name__)

_MODEL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class ServerLimits:
    http: HttpLimits = field(default_factory=HttpLimits)
    max_connections: int = 64  # more are answered 503 and closed
    socket_mode: int = 0o660  # the socket file: owner and group (the application's user) may connect
    max_sessions: int = DEFAULT_MAX_SESSIONS  # stateful models: sessions kept (least recently used evicted)
    session_idle_s: float = DEFAULT_IDLE_S  # a session idle this long is dropped
    shared_memory: bool = True  # offer large inputs through a memfd to clients of the server's own uid


class ServerState(enum.Enum):
    NEW = "new"
    SERVING = "serving"
    CLOSED = "closed"


@dataclass
class Prediction:
    """One answered prediction (the in-process API's result)."""

    id: str
    served: ServedModel
    outputs: list[np.ndarray]
    latency_ms: float


class InferenceServer:
    """Serves named models on a Unix socket; models are swapped in with :meth:`activate`."""

    def __init__(
        self,
        socket_path: Path,
        *,
        limits: ServerLimits | None = None,
        recent_capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.socket_path = socket_path
        self.limits = limits or ServerLimits()
        self.stats = RequestStats()
        self.recent = RecentPredictions(recent_capacity)
        self.sessions = SessionStore(self.limits.max_sessions, self.limits.session_idle_s)
        self.state = ServerState.NEW
        self._slots: dict[str, ModelSlot] = {}
        self._default: str | None = None
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    # -- models ---------------------------------------------------------------------------

    def activate(self, served: ServedModel, *, default: bool = False) -> ServedModel | None:
        """Serve ``served`` under its name from the next request on; returns the model it replaced.

        Requests already running finish on the replaced model, which is closed when idle.
        """
        if not served.name or not set(served.name) <= _MODEL_NAME_CHARS:
            raise UsageError(f"model name {served.name!r} must be letters, digits, '.', '_' or '-'")
        if self.state is ServerState.CLOSED:
            raise UsageError("cannot activate a model on a closed server")
        with self._lock:
            slot = self._slots.get(served.name)
            if slot is None:
                slot = self._slots[served.name] = ModelSlot(served.name)
            if default or self._default is None:
                self._default = served.name
        old = slot.swap(served)
        log.info(
            "serving %s %s on %s/%s%s",
            served.name,
            served.version,
            served.model.runtime,
            served.model.delegate,
            f" (replaced {old.version})" if old else "",
        )
        return old

    def deactivate(self, name: str) -> None:
        """Stop serving ``name``; running requests finish, then its model is closed."""
        with self._lock:
            slot = self._slots.pop(name, None)
            if self._default == name:
                self._default = next(iter(self._slots), None)
        if slot is not None:
            slot.swap(None)
        self.sessions.drop_model(name)

    def served(self) -> dict[str, ServedModel]:
        with self._lock:
            slots = list(self._slots.values())
        return {s.name: m for s in slots if (m := s.current) is not None}

    def slot_for(self, name: str | None) -> ModelSlot:
        """The slot serving ``name`` (None: the default model); HttpError 404/503 when there is none."""
        # Reads of one dict entry are atomic; the lock guards only the changes in activate/deactivate.
        key = name if name is not None else self._default
        slot = self._slots.get(key) if key is not None else None
        if slot is None:
            if name is None:
                raise HttpError(503, "no_model", "no model is being served yet", close=False)
            raise HttpError(404, "unknown_model", f"no model named {name!r} is served", close=False)
        return slot

    # -- the in-process API ---------------------------------------------------------------

    def predict(
        self,
        feeds: np.ndarray | Mapping[str, Any],
        *,
        model: str | None = None,
        raw: bool = False,
        session: str | None = None,
    ) -> Prediction:
        """Run one prediction in this process, timed and recorded exactly as a socket request.

        ``session`` carries a stateful model's state from call to call (see
        :mod:`edgeagent.serving.sessions`). Raises UsageError when no such model is served,
        InputError, InferenceError.
        """
        try:
            slot = self.slot_for(model)
        except HttpError as exc:
            raise UsageError(exc.message) from exc
        lease = slot.acquire()
        if lease is None:
            raise UsageError(f"model {slot.name!r} is being removed")
        try:
            result = self.run(lease, time.perf_counter(), lambda: (feeds, None), raw, session)
        finally:
            slot.release(lease)
        self.stats.record(result.served.key, result.latency_ms / 1e3, result.outputs[0])
        return result

    def reset_session(self, session: str, *, model: str | None = None) -> bool:
        """Forget ``session``'s state on ``model`` (None: the default); True when it existed."""
        try:
            name = self.slot_for(model).name
        except HttpError as exc:
            raise UsageError(exc.message) from exc
        return self.sessions.reset(name, session)

    def run(
        self,
        lease: Lease,
        start: float,
        decode: Callable[[], tuple[np.ndarray | Mapping[str, Any], bool | None]],
        raw: bool,
        session: str | None = None,
    ) -> Prediction:
        """Decode and run one request on ``lease``'s model and give it an id; errors are counted.

        A stateful model runs through :attr:`sessions` (``session``: the client's session id).

        The latency (from ``start``, a ``perf_counter``) is the caller's to record with
        ``stats.record``: socket requests record it after the reply is sent.
        """
        served = lease.served
        try:
            feeds, body_raw = decode()
            if served.state is None:
                outputs = served.model.predict(feeds, raw=raw or bool(body_raw))
            else:
                outputs = self.sessions.predict(served, session, feeds, raw or bool(body_raw))
        except InputError:
            self.stats.error(served.key, client=True)
            raise
        except InferenceError:
            self.stats.error(served.key, client=False)
            raise
        elapsed = time.perf_counter() - start
        return Prediction(self.recent.add(served.key, outputs[0]), served, outputs, elapsed * 1e3)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and accept connections on a background thread."""
        if self.state is not ServerState.NEW:
            raise UsageError(f"cannot start a server that is {self.state.value}")
        self._listener = _bind(self.socket_path, self.limits.socket_mode)
        self.state = ServerState.SERVING
        self._accept_thread = threading.Thread(target=self._accept_loop, name="edgeagent-accept", daemon=True)
        self._accept_thread.start()
        log.info("inference server listening on %s", self.socket_path)

    def close(self) -> None:
        """Stop accepting, end every connection, close every model, remove the socket file."""
        if self.state is ServerState.CLOSED:
            return
        was_serving = self.state is ServerState.SERVING
        self.state = ServerState.CLOSED
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() at once
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        for name in list(self._slots):
            self.deactivate(name)
        if was_serving:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None and self.state is ServerState.SERVING:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.state is ServerState.SERVING:
                    log.exception("accept failed")
                    time.sleep(0.1)
                continue
            with self._lock:
                full = len(self._connections) >= self.limits.max_connections
                if not full:
                    self._connections.add(sock)
            if full:
                with contextlib.suppress(OSError):
                    sock.sendall(
                        error_reply(
                            503, "too_many_connections", "the server is at its connection limit", False
                        )
                    )
                sock.close()
                continue
            thread = threading.Thread(
                target=self._serve_connection, args=(sock,), name="edgeagent-conn", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve_connection(self, sock: socket.socket) -> None:
        try:
            Endpoints(self).serve(sock)
        except OSError:
            pass  # the client went away; nothing to answer
        finally:
            sock.close()
            with self._lock:
                self._connections.discard(sock)
                self._threads.discard(threading.current_thread())

    @property
    def serving(self) -> bool:
        return self.state is ServerState.SERVING

    @property
    def default(self) -> str | None:
        """The model ``/v1/predict`` serves."""
        return self._default


def _bind(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at ``path``; a stale socket file left by a dead server is replaced."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: stale
        else:
            raise UsageError(f"{path} is in use by a running server")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {path}: {exc}") from exc
    os.chmod(path, mode)  # noqa: PTH101 - the socket path, not a file opened here
    listener.listen(128)
    listener.settimeout(0.5)  # lets the accept loop notice close()
    return listener
