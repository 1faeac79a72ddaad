"""The local inference server: HTTP/1.1 on a Unix socket, one thread per keep-alive connection.

Endpoints (see ``docs/runtimes.md`` for bodies and examples):

=======  ===============================  =============================================
GET      /v1/health                       200 when at least one model is served, else 503
GET      /v1/models                       every served model: bundle, version, io specs,
                                          runtime, delegate, selection decision, verdict
GET      /v1/models/{name}                one of them
POST     /v1/predict                      the default (or only) model
POST     /v1/models/{name}/predict        a named model
GET      /v1/stats                        latency percentiles and errors per
                                          (model, version, runtime, delegate)
=======  ===============================  =============================================

Inference runs on the connection's own thread, so a request costs no hand-off between
threads; ONNX Runtime releases the GIL while it runs, LiteRT sessions serialise on their
own lock. Nothing a client sends can stop the server: every failure of one request
becomes a 4xx/5xx with a JSON reason on that connection only.
"""

from __future__ import annotations

import contextlib
import enum
import json
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
from edgeagent.serving.http import Connection, HttpError, HttpLimits, Request, response_bytes
from edgeagent.serving.protocol import (
    CONTENT_TYPES,
    JSON,
    decode_inputs,
    encode_outputs,
    error_body,
    parse_raw_flag,
)
from edgeagent.serving.recent import DEFAULT_CAPACITY, RecentPredictions
from edgeagent.serving.slots import Lease, ModelSlot, ServedModel
from edgeagent.serving.stats import RequestStats

log = logging.getLogger(__name__)

_MODEL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class ServerLimits:
    http: HttpLimits = field(default_factory=HttpLimits)
    max_connections: int = 64  # more are answered 503 and closed
    socket_mode: int = 0o660  # the socket file: owner and group (the application's user) may connect


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

    def served(self) -> dict[str, ServedModel]:
        with self._lock:
            slots = list(self._slots.values())
        return {s.name: m for s in slots if (m := s.current) is not None}

    def _slot(self, name: str | None) -> ModelSlot:
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
        self, feeds: np.ndarray | Mapping[str, Any], *, model: str | None = None, raw: bool = False
    ) -> Prediction:
        """Run one prediction in this process, timed and recorded exactly as a socket request.

        Raises UsageError when no such model is served, InputError, InferenceError.
        """
        try:
            slot = self._slot(model)
        except HttpError as exc:
            raise UsageError(exc.message) from exc
        lease = slot.acquire()
        if lease is None:
            raise UsageError(f"model {slot.name!r} is being removed")
        try:
            return self._run(lease, time.perf_counter(), lambda: (feeds, None), raw)
        finally:
            slot.release(lease)

    def _run(
        self,
        lease: Lease,
        start: float,
        decode: Callable[[], tuple[np.ndarray | Mapping[str, Any], bool | None]],
        raw: bool,
    ) -> Prediction:
        served = lease.served
        try:
            feeds, body_raw = decode()
            outputs = served.model.predict(feeds, raw=raw or bool(body_raw))
        except InputError:
            self.stats.error(served.key, client=True)
            raise
        except InferenceError:
            self.stats.error(served.key, client=False)
            raise
        elapsed = time.perf_counter() - start
        self.stats.record(served.key, elapsed)
        pid = self.recent.new_id()
        self.recent.add(pid, served.key, outputs[0])
        return Prediction(pid, served, outputs, elapsed * 1e3)

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
                        _error(503, "too_many_connections", "the server is at its connection limit", False)
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
        conn = Connection(sock, self.limits.http)
        try:
            while self.state is ServerState.SERVING:
                try:
                    request = conn.read_request()
                except HttpError as exc:
                    sock.sendall(_error(exc.status, exc.code, exc.message, False))
                    break
                if request is None:
                    break
                response, keep_open = self._respond(request)
                sock.sendall(response)
                if not keep_open:
                    break
        except OSError:
            pass  # the client went away; nothing to answer
        finally:
            sock.close()
            with self._lock:
                self._connections.discard(sock)
                self._threads.discard(threading.current_thread())

    # -- routing --------------------------------------------------------------------------

    def _respond(self, request: Request) -> tuple[bytes, bool]:
        keep = request.keep_alive
        try:
            status, content_type, body, headers = self._route(request)
        except HttpError as exc:
            keep = keep and not exc.close
            return _error(exc.status, exc.code, exc.message, keep), keep
        except InputError as exc:
            status = 400 if exc.code == "bad_body" else 422
            return _error(status, exc.code, str(exc), keep), keep
        except InferenceError as exc:
            return _error(500, "inference_failed", str(exc), keep), keep
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return _error(500, "internal", "unexpected server error; see the agent log", keep), keep
        return response_bytes(status, content_type, body, keep_alive=keep, extra=headers), keep

    def _route(self, request: Request) -> tuple[int, str, bytes, str]:
        path = request.path
        if path == "/v1/predict":
            _method(request, "POST")
            return self._predict(request, None)
        parts = path.split("/")
        if len(parts) >= 4 and parts[:3] == ["", "v1", "models"] and parts[3]:
            if len(parts) == 5 and parts[4] == "predict":
                _method(request, "POST")
                return self._predict(request, parts[3])
            if len(parts) == 4:
                _method(request, "GET")
                served = self._slot(parts[3]).current
                if served is None:
                    raise HttpError(
                        404, "unknown_model", f"no model named {parts[3]!r} is served", close=False
                    )
                return _json(200, served.describe())
        if path == "/v1/models":
            _method(request, "GET")
            return _json(
                200, {"default": self._default, "models": [m.describe() for m in self.served().values()]}
            )
        if path == "/v1/health":
            _method(request, "GET")
            live = self.served()
            body = {
                "status": "ok" if live else "no_models",
                "default": self._default,
                "models": {n: m.version for n, m in live.items()},
            }
            return _json(200 if live else 503, body)
        if path == "/v1/stats":
            _method(request, "GET")
            rows = [{**key._asdict(), **stats.summary()} for key, stats in self.stats.snapshot().items()]
            recent = {
                "size": len(self.recent),
                "capacity": self.recent.capacity,
                "evicted": self.recent.evicted,
            }
            return _json(200, {"stats": rows, "recent_predictions": recent})
        raise HttpError(404, "not_found", f"no endpoint {path!r}", close=False)

    def _predict(self, request: Request, name: str | None) -> tuple[int, str, bytes, str]:
        start = time.perf_counter()
        content_type = request.content_type
        if content_type not in CONTENT_TYPES:
            raise HttpError(
                415,
                "unsupported_media_type",
                f"Content-Type must be one of {', '.join(CONTENT_TYPES)}",
                close=False,
            )
        accept = request.headers.get("accept", "").strip().lower()
        reply_type = accept if accept in CONTENT_TYPES else content_type
        raw = parse_raw_flag(request.query.get("raw"))
        slot = self._slot(name)
        lease = slot.acquire()
        if lease is None:
            raise HttpError(503, "no_model", f"model {slot.name!r} is being replaced or removed", close=False)
        try:
            result = self._run(lease, start, lambda: decode_inputs(content_type, request.body), raw)
            served = result.served
            meta = {**served.meta, "id": result.id, "latency_ms": round(result.latency_ms, 4)}
            out_type, body, headers = encode_outputs(
                reply_type, served.model.output_names, result.outputs, meta, served.reply_headers
            )
        finally:
            slot.release(lease)
        return 200, out_type, body, headers


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise HttpError(
            405, "method_not_allowed", f"{request.path} takes {allowed}, not {request.method}", close=False
        )


def _json(status: int, doc: Any) -> tuple[int, str, bytes, str]:
    return status, JSON, json.dumps(doc).encode(), ""


def _error(status: int, code: str, message: str, keep_alive: bool) -> bytes:
    return response_bytes(status, JSON, error_body(code, message), keep_alive=keep_alive)


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
