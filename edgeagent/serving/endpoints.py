"""The wire side of the inference server: one connection's loop, HTTP/1.1 or frames, and routing.

A connection that starts with :data:`~edgeagent.serving.frames.PREFACE` is served frames for
its whole life; any other is HTTP/1.1. Both end in the same handlers, so validation,
errors, timing and prediction ids are the same whichever way a request came.

The hot path of a prediction, on the connection's own thread: read (usually one ``recv``),
look the request head up in a cache of parsed heads, run the model on zero-copy views of
the request bytes, give the prediction an id, send the reply with one ``sendall`` — and
only then record its latency and predicted class, while the client reads the reply.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from edgeagent.errors import InferenceError, InputError
from edgeagent.serving.feedback import apply_feedback, parse_feedback
from edgeagent.serving.frames import (
    CALL,
    FLAG_RAW,
    FLAG_SESSION,
    FLAG_SHM,
    FRAME,
    OPTIONS,
    PREDICT,
    PREFACE,
    FrameError,
    Parts,
    Received,
    call_head,
    encode_call_reply,
    encode_error,
    encode_reply,
    feeds,
    predict_head,
    split_session,
)
from edgeagent.serving.http import Connection, HttpError, Request, media_type, response_bytes, split_target
from edgeagent.serving.protocol import (
    CONTENT_TYPES,
    JSON,
    decode_inputs,
    encode_outputs,
    error_body,
    parse_raw_flag,
)
from edgeagent.serving.shm import InputMaps
from edgeagent.serving.sockets import close_all, peer_uid, send_parts
from edgeagent.serving.stats import StatsKey

if TYPE_CHECKING:
    from edgeagent.serving.server import InferenceServer

log = logging.getLogger(__name__)

Accounting = tuple[StatsKey, float, np.ndarray]  # stats.record's arguments: key, seconds, first output


class Answer(NamedTuple):
    """A routed request's reply, before it is framed for the wire."""

    status: int
    content_type: str
    body: bytes
    headers: str = ""  # further HTTP header lines (binary predict replies), each ending in CRLF
    done: Accounting | None = None  # recorded once the reply is sent


def error_reply(status: int, code: str, message: str, keep_alive: bool) -> bytes:
    """A complete HTTP error response with the JSON reason."""
    return response_bytes(status, JSON, error_body(code, message), keep_alive=keep_alive)


def failure(exc: Exception, what: str) -> tuple[int, str, str, bool]:
    """(status, code, message, connection still usable) for an error answering one request."""
    if isinstance(exc, HttpError):
        return exc.status, exc.code, exc.message, not exc.close
    if isinstance(exc, FrameError):
        return 400, exc.code, str(exc), True
    if isinstance(exc, InputError):
        return (400 if exc.code == "bad_body" else 422), exc.code, str(exc), True
    if isinstance(exc, InferenceError):
        return 500, "inference_failed", str(exc), True
    log.error("unexpected error answering %s", what, exc_info=exc)
    return 500, "internal", "unexpected server error; see the agent log", True


class Endpoints:
    """Serves one connection of ``server``."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.limits = server.limits.http
        self._maps: InputMaps | None = None  # set when the client negotiated shared memory

    def serve(self, sock: socket.socket) -> None:
        """Answer requests on ``sock`` until the client closes, framing is lost, or the server stops."""
        conn = Connection(sock, self.limits)
        try:
            framed = conn.take_preface(PREFACE)
        except HttpError as exc:
            sock.sendall(error_reply(exc.status, exc.code, exc.message, False))
            return
        if framed:
            self._serve_frames(conn)
        else:
            self._serve_http(conn)

    # -- connections ----------------------------------------------------------------------

    def _serve_http(self, conn: Connection) -> None:
        sock, server = conn.sock, self.server
        while server.serving:
            try:
                request = conn.read_request()
            except HttpError as exc:
                sock.sendall(error_reply(exc.status, exc.code, exc.message, False))
                return
            if request is None:
                return
            keep = request.keep_alive
            try:
                answer = self.route(request)
            except Exception as exc:
                status, code, message, usable = failure(exc, f"{request.method} {request.path}")
                keep = keep and usable
                sock.sendall(error_reply(status, code, message, keep))
            else:
                sock.sendall(
                    response_bytes(
                        answer.status, answer.content_type, answer.body, keep_alive=keep, extra=answer.headers
                    )
                )
                if answer.done is not None:
                    server.stats.record(*answer.done)
            if not keep:
                return

    def _serve_frames(self, conn: Connection) -> None:
        sock, server = conn.sock, self.server
        max_size = 8 + self.limits.max_head_bytes + self.limits.max_body_bytes
        try:
            while server.serving:
                try:
                    frame = conn.read_frame(max_size)
                except HttpError as exc:  # framing is lost: answer, then close
                    sock.sendall(encode_error(exc.status, error_body(exc.code, exc.message)))
                    return
                if frame is None:
                    return
                fds = conn.take_fds()
                try:
                    reply, done = self._frame(frame, fds, conn)
                finally:
                    close_all(fds)  # mappings hold their own reference; nothing else keeps these
                send_parts(sock, reply)
                if done is not None:
                    server.stats.record(*done)
        finally:
            close_all(conn.take_fds())
            if self._maps is not None:
                self._maps.close()

    # -- frames ---------------------------------------------------------------------------

    def _frame(self, frame: Received, fds: list[int], conn: Connection) -> tuple[Parts, Accounting | None]:
        """The reply to one frame; errors become error frames (the frame boundary is intact)."""
        start = time.perf_counter()
        _, kind, flags, head_len = FRAME.unpack_from(frame)
        data_start = 8 + head_len
        try:
            if head_len % 8 or data_start > len(frame):
                raise FrameError(f"head length {head_len} is not a multiple of 8 within the frame")
            if fds and not (kind == PREDICT and flags & FLAG_SHM):
                raise FrameError(
                    "file descriptors came with a frame that does not use shared memory", "bad_shm"
                )
            head = bytes(frame[8:data_start])  # no copy when the frame is bytes
            if kind == PREDICT:
                if flags & ~(FLAG_RAW | FLAG_SESSION | FLAG_SHM):
                    raise FrameError(f"unknown predict flags {flags:#04x}")
                session = None
                if flags & FLAG_SESSION:
                    session, head = split_session(head)
                return self._frame_predict(frame, head, data_start, flags, fds, start, session)
            if kind == CALL:
                return self._frame_call(frame, head, data_start)
            if kind == OPTIONS:
                return [self._frame_options(conn)], None
            raise FrameError(f"unknown frame type {kind} (1 predict, 2 call, 3 options)")
        except Exception as exc:
            status, code, message, _ = failure(exc, f"a type {kind} frame")
            body = error_body(code, message)
            if kind == CALL:
                return [encode_call_reply(status, JSON, "", body)], None
            return [encode_error(status, body)], None

    def _frame_options(self, conn: Connection) -> bytes:
        """Offer shared memory to a peer of this process's own uid (the only one it may map from)."""
        if not self.server.limits.shared_memory:
            shm, reason = None, "shared memory is turned off on this agent"
        elif peer_uid(conn.sock) != os.geteuid():
            shm, reason = None, "shared memory is offered only to clients running as the agent's user"
        else:
            conn.accept_fds = True
            if self._maps is None:
                self._maps = InputMaps(self.limits.max_body_bytes)
            shm, reason = {"max_bytes": self.limits.max_body_bytes}, ""
        return encode_call_reply(200, JSON, "", json.dumps({"shm": shm, "reason": reason}).encode())

    def _frame_predict(
        self,
        frame: Received,
        head: bytes,
        data_start: int,
        flags: int,
        fds: list[int],
        start: float,
        session: str | None = None,
    ) -> tuple[Parts, Accounting]:
        parsed = predict_head(head)
        server = self.server
        slot = server.slot_for(parsed.model)
        if flags & FLAG_SHM:
            maps = self._maps
            if maps is None:
                raise FrameError("send an options frame before a shared-memory predict frame", "bad_shm")
            if data_start != len(frame):
                raise FrameError("a shared-memory predict frame carries no data after its head", "bad_shm")

            def decode() -> tuple[np.ndarray | dict[str, np.ndarray], None]:
                return maps.feeds(fds, parsed.layout), None
        else:

            def decode() -> tuple[np.ndarray | dict[str, np.ndarray], None]:
                return feeds(parsed.layout, frame, data_start), None

        lease = slot.acquire()
        if lease is None:
            raise HttpError(503, "no_model", f"model {slot.name!r} is being replaced or removed", close=False)
        try:
            result = server.run(lease, start, decode, bool(flags & FLAG_RAW), session)
            served = result.served
            reply = encode_reply(
                result.latency_ms, result.id, served.frame_meta, served.model.output_names, result.outputs
            )
        finally:
            slot.release(lease)
        return reply, (served.key, result.latency_ms / 1e3, result.outputs[0])

    def _frame_call(self, frame: Received, head: bytes, data_start: int) -> tuple[Parts, Accounting | None]:
        method, target, content_type = call_head(head)
        path, query = split_target(target)
        body = bytes(frame[data_start:])
        headers = {"content-type": content_type} if content_type else {}
        answer = self.route(Request(method, path, query, headers, body, True, media_type(content_type)))
        return [
            encode_call_reply(answer.status, answer.content_type, answer.headers, answer.body)
        ], answer.done

    # -- routing --------------------------------------------------------------------------

    def route(self, request: Request) -> Answer:
        """The answer to one request; raises HttpError, InputError or InferenceError for a 4xx/5xx."""
        path = request.path
        server = self.server
        if path == "/v1/predict":
            _method(request, "POST")
            return self._predict(request, None)
        parts = path.split("/")
        if len(parts) >= 4 and parts[:3] == ["", "v1", "models"] and parts[3]:
            if len(parts) == 5 and parts[4] == "predict":
                _method(request, "POST")
                return self._predict(request, parts[3])
            if len(parts) == 6 and parts[4] == "sessions":
                return self._reset(request, parts[3], parts[5])
            if len(parts) == 4:
                _method(request, "GET")
                served = server.slot_for(parts[3]).current
                if served is None:
                    raise HttpError(
                        404, "unknown_model", f"no model named {parts[3]!r} is served", close=False
                    )
                return _json(200, served.describe())
        if len(parts) == 4 and parts[:3] == ["", "v1", "sessions"]:
            return self._reset(request, None, parts[3])
        if path == "/v1/feedback":
            _method(request, "POST")
            if request.content_type != JSON:
                raise HttpError(415, "unsupported_media_type", f"Content-Type must be {JSON}", close=False)
            pid, labels = parse_feedback(request.body)
            return _json(200, apply_feedback(server.recent, server.stats, pid, labels))
        if path == "/v1/models":
            _method(request, "GET")
            return _json(
                200, {"default": server.default, "models": [m.describe() for m in server.served().values()]}
            )
        if path == "/v1/health":
            _method(request, "GET")
            live = server.served()
            body = {
                "status": "ok" if live else "no_models",
                "default": server.default,
                "models": {n: m.version for n, m in live.items()},
            }
            return _json(200 if live else 503, body)
        if path == "/v1/stats":
            _method(request, "GET")
            rows = [{**key._asdict(), **stats.summary()} for key, stats in server.stats.snapshot().items()]
            recent = {
                "size": len(server.recent),
                "capacity": server.recent.capacity,
                "evicted": server.recent.evicted,
            }
            return _json(
                200, {"stats": rows, "recent_predictions": recent, "sessions": server.sessions.summary()}
            )
        raise HttpError(404, "not_found", f"no endpoint {path!r}", close=False)

    def _reset(self, request: Request, name: str | None, session: str) -> Answer:
        """``DELETE .../sessions/{id}``: forget the session's state; 200 whether or not it existed."""
        _method(request, "DELETE")
        slot = self.server.slot_for(name)
        existed = self.server.sessions.reset(slot.name, session)
        return _json(200, {"model": slot.name, "session": session, "reset": existed})

    def _predict(self, request: Request, name: str | None) -> Answer:
        start = time.perf_counter()
        content_type = request.content_type
        if content_type not in CONTENT_TYPES:
            raise HttpError(
                415,
                "unsupported_media_type",
                f"Content-Type must be one of {', '.join(CONTENT_TYPES)}",
                close=False,
            )
        accept = request.headers.get("accept")
        reply_type = content_type
        if accept is not None and (accept := accept.strip().lower()) in CONTENT_TYPES:
            reply_type = accept
        raw = parse_raw_flag(request.query.get("raw"))
        server = self.server
        slot = server.slot_for(name)
        lease = slot.acquire()
        if lease is None:
            raise HttpError(503, "no_model", f"model {slot.name!r} is being replaced or removed", close=False)
        try:
            session = request.headers.get("x-session")
            result = server.run(lease, start, lambda: decode_inputs(content_type, request.body), raw, session)
            served = result.served
            out_type, body, headers = encode_outputs(
                reply_type,
                served.model.output_names,
                result.outputs,
                served.meta,
                result.id,
                result.latency_ms,
                served.reply_headers,
            )
        finally:
            slot.release(lease)
        return Answer(200, out_type, body, headers, (served.key, result.latency_ms / 1e3, result.outputs[0]))


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise HttpError(
            405, "method_not_allowed", f"{request.path} takes {allowed}, not {request.method}", close=False
        )


def _json(status: int, doc: Any) -> Answer:
    return Answer(status, JSON, json.dumps(doc).encode())
