"""A small keep-alive client for the agent's local inference socket.

::

    from edgeagent.client import Client

    with Client("/run/edgeagent/agent.sock") as client:
        result = client.predict(image_batch)            # binary arrays over the wire
        print(result.output.argmax(axis=1), result.id, result.version)
        client.predict({"input": x}, model="detector")  # named inputs, a named model
        client.predict(x, binary=False)                 # JSON over the wire
        client.feedback(result.id, 3)                   # the true label, for online accuracy

        stream = client.session()                       # a stateful model: state kept per session
        for chunk in chunks:
            y = stream.predict(chunk).outputs["y"]
        stream.reset()                                  # back to the initial state

One connection is kept open and reused; a connection the server closed while idle is
reopened once, transparently. Inputs of ``shm_min_bytes`` or more go through shared memory
(a sealed memfd passed over the socket, :mod:`edgeagent.serving.shm`) when the agent offers
it, which it does to clients running as its own user; otherwise over the socket. By default
it speaks the agent's binary frames (:mod:`edgeagent.serving.frames`: no HTTP text to write or
parse on either side); with ``framed=False``, or against an agent that answers the frames'
preface with HTTP, it speaks HTTP/1.1 with ``.npy``/``.npz`` bodies, as curl does. A
:class:`Client` is not shared between threads: give each thread its own (they are cheap). Errors:
:class:`~edgeagent.errors.ServerUnreachable` (no server on the socket, no reply in time) and
:class:`~edgeagent.errors.RequestFailed` (the server's 4xx/5xx, with its ``status`` and ``code``).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgeagent.defaults import DEFAULT_SOCKET
from edgeagent.errors import InputError, RequestFailed, ServerUnreachable
from edgeagent.serving import frames, shm
from edgeagent.serving.protocol import JSON, NPY, NPZ, decode_npy, encode_npy, encode_npz
from edgeagent.serving.sockets import TIMEOUT_ERRORS, Timeouts, send_parts

_MAX_HEAD = 64 * 1024
# Below glibc's mmap threshold (128 KiB): recv allocates this much before it shrinks the
# bytes to what came, and a larger size costs an mmap/munmap pair on every read (measured:
# +40-50 µs per round trip of a 10 KB request with 256 KiB).
_RECV = 65536
_MAX_FRAME = 1 << 31  # a reply size past this is a corrupt stream, not a reply
_SIZE = struct.Struct("<I")
_T = TypeVar("_T")
_UNNAMED: Sequence[str] = ("",)  # the names of a single array sent without its input name
_OK = struct.pack("<H", 200)  # the status field of a 200 reply frame
_NOT_FRAMES = frozenset({400, 501, 505})  # what an HTTP-only agent answers to the frames' preface


@dataclass
class ClientPrediction:
    """A prediction as the server answered it."""

    outputs: dict[str, np.ndarray]  # by output name, in the model's order (binary replies: read-only views)
    id: str
    model: str
    version: str
    runtime: str
    delegate: str
    latency_ms: float  # server time from request read to outputs ready

    @property
    def output(self) -> np.ndarray:
        """The first (usually only) output."""
        return next(iter(self.outputs.values()))


class Client:
    """The agent's Unix socket (binary frames, or HTTP/1.1), with one reused connection."""

    def __init__(
        self,
        socket_path: Path | str = DEFAULT_SOCKET,
        *,
        timeout_s: float = 30.0,
        framed: bool = True,
        shm_min_bytes: int | None = shm.MIN_BYTES,
    ) -> None:
        """``shm_min_bytes``: inputs this large (bytes, all arrays) try shared memory; None: never."""
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self.framed = framed  # False: HTTP/1.1 (also after an agent that does not speak frames)
        self.shm_min_bytes = shm_min_bytes if shm.available() else None
        self.shm_offered: bool | None = None  # what this connection's agent answered (None: not asked)
        self._shm: shm.InputBuffer | None = None
        self._sock: socket.socket | None = None
        self._fresh = False  # the connection has not sent anything yet (frames: the preface goes first)
        self._pending = b""  # reply bytes read past the previous reply (none, with one request at a time)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self._pending = b""
        self._fresh = False
        self.shm_offered = None

    # -- API ------------------------------------------------------------------------------

    def predict(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        *,
        model: str | None = None,
        raw: bool = False,
        binary: bool = True,
        session: str | None = None,
    ) -> ClientPrediction:
        """Run ``inputs`` (one array, or a mapping input name -> array) on the served model.

        ``binary=False`` sends JSON; ``raw=True`` sends and receives a quantized model's integers.
        ``session`` names the session whose state a stateful model carries (see :meth:`session`).
        """
        if binary and self.framed:
            names: Sequence[str]
            if type(inputs) is np.ndarray:  # the usual call, without the Mapping check
                names, arrays = _UNNAMED, [inputs]
            elif isinstance(inputs, Mapping):
                names, arrays = list(inputs), [np.asarray(v) for v in inputs.values()]
            else:
                names, arrays = _UNNAMED, [np.asarray(inputs)]
            try:
                return self._predict_framed(names, arrays, model, raw, session)
            except _NoFrames:
                pass  # an agent without frames: HTTP/1.1 from now on
        return self._predict_http(inputs, model, raw, binary, session)

    def session(self, session_id: str | None = None, *, model: str | None = None) -> ClientSession:
        """A session of a stateful model (a new random id unless given): its state stays on the server."""
        return ClientSession(self, session_id or uuid.uuid4().hex, model)

    def reset_session(self, session_id: str, *, model: str | None = None) -> bool:
        """Forget ``session_id``'s state on the server; True when the server had it."""
        path = f"/v1/models/{model}/sessions/{session_id}" if model else f"/v1/sessions/{session_id}"
        status, _, payload = self._request("DELETE", path, b"", None)
        if status != 200:
            raise _failure(status, payload)
        return bool(json.loads(payload)["reset"])

    def feedback(self, prediction_id: str, label: int | Sequence[int]) -> dict[str, Any]:
        """``POST /v1/feedback``: the true class of prediction ``prediction_id`` (a list for a batch).

        Returns ``{"id", "model", "version", "correct": [bool, ...], "labelled": n}``; RequestFailed
        404 ``unknown_prediction`` (unknown or evicted id), 409 ``already_labelled``, 422 for a label
        that does not fit the prediction.
        """
        value: int | list[int] = (
            int(label) if isinstance(label, (int, np.integer)) else [int(v) for v in label]
        )
        body = json.dumps({"id": prediction_id, "label": value}).encode()
        status, _, payload = self._request("POST", "/v1/feedback", body, JSON)
        if status != 200:
            raise _failure(status, payload)
        doc: dict[str, Any] = json.loads(payload)
        return doc

    def _predict_framed(
        self,
        names: Sequence[str],
        arrays: Sequence[np.ndarray],
        model: str | None,
        raw: bool,
        session: str | None = None,
    ) -> ClientPrediction:
        try:
            parts = frames.predict_parts(model, names, arrays, raw, session)
            limit = self.shm_min_bytes
            if limit is not None and sum(a.nbytes for a in arrays) >= limit:
                shm_frame = frames.shm_predict(model, names, arrays, raw, session)
                reply = self._roundtrip(lambda: self._exchange_shm(shm_frame, arrays, parts))
            else:
                reply = self._roundtrip(lambda: self._exchange_frame(parts))
        except (ValueError, struct.error) as exc:  # e.g. more arrays or dims than a frame carries
            raise RequestFailed(f"cannot send these inputs: {exc}", status=400, code="bad_body") from exc
        if bytes(reply[4:6]) != _OK:
            _, status, head_len = frames.REPLY.unpack_from(reply)
            raise _failure(status, bytes(reply[8 + head_len :]))
        try:
            latency_ms, pid, (name, version, runtime, delegate), outputs = frames.decode_reply(reply)
        except (frames.FrameError, InputError, ValueError, struct.error) as exc:
            self.close()
            raise ServerUnreachable(f"a malformed reply frame: {exc}", socket_path=self.socket_path) from exc
        if type(reply) is not bytes:  # a reply that took several reads: read-only like the others
            for array in outputs.values():
                array.flags.writeable = False
        return ClientPrediction(outputs, pid, name, version, runtime, delegate, latency_ms)

    def _predict_http(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        model: str | None,
        raw: bool,
        binary: bool,
        session: str | None = None,
    ) -> ClientPrediction:
        path = f"/v1/models/{model}/predict" if model else "/v1/predict"
        if raw:
            path += "?raw=1"
        if not binary:
            doc: dict[str, Any] = {
                "inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}
                if isinstance(inputs, Mapping)
                else np.asarray(inputs).tolist()
            }
            content_type, body = JSON, json.dumps(doc).encode()
        elif isinstance(inputs, Mapping):
            content_type, body = NPZ, encode_npz(list(inputs), [np.asarray(v) for v in inputs.values()])
        else:
            content_type, body = NPY, encode_npy(np.asarray(inputs))
        extra = f"X-Session: {session}\r\n" if session is not None else ""
        status, headers, payload = self._request("POST", path, body, content_type, extra)
        if status != 200:
            raise _failure(status, payload)
        reply_type = headers.get("content-type", "")
        if reply_type == JSON:
            doc = json.loads(payload)
            outputs = _json_outputs(doc)
            return ClientPrediction(
                outputs,
                doc["id"],
                doc["model"],
                doc["version"],
                doc["runtime"],
                doc["delegate"],
                float(doc["latency_ms"]),
            )
        if reply_type == NPY:
            outputs = {headers.get("x-outputs", "output").split(",")[0]: decode_npy(payload)}
        else:
            with np.load(io.BytesIO(payload), allow_pickle=False) as data:
                outputs = {k: data[k] for k in data.files}
        return ClientPrediction(
            outputs,
            headers.get("x-prediction-id", ""),
            headers.get("x-model", ""),
            headers.get("x-model-version", ""),
            headers.get("x-runtime", ""),
            headers.get("x-delegate", ""),
            float(headers.get("x-latency-ms", "nan")),
        )

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the served models, their versions, io specs, runtime and delegate."""
        return self._get_json("/v1/models")

    def health(self) -> dict[str, Any]:
        """``GET /v1/health`` (a server with no model answers 503, returned here, not raised)."""
        status, _, payload = self._request("GET", "/v1/health", b"", None)
        if status not in (200, 503):
            raise _failure(status, payload)
        doc: dict[str, Any] = json.loads(payload)
        return doc

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``: latency percentiles and errors per model/version/runtime/delegate."""
        return self._get_json("/v1/stats")

    def _get_json(self, path: str) -> dict[str, Any]:
        status, _, payload = self._request("GET", path, b"", None)
        if status != 200:
            raise _failure(status, payload)
        doc: dict[str, Any] = json.loads(payload)
        return doc

    # -- wire -----------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: bytes, content_type: str | None, extra: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-case headers, body) of one request, over frames or HTTP/1.1.

        ``extra``: further HTTP header lines (predict over HTTP only), each ending in CRLF.
        """
        if self.framed and not extra:
            frame = frames.encode_call(method, path, content_type or "", body)
            try:
                reply = self._roundtrip(lambda: self._exchange_frame([frame]))
            except _NoFrames:
                pass
            else:
                try:
                    status, reply_type, lines, payload = frames.decode_call_reply(bytes(reply))
                except frames.FrameError as exc:
                    self.close()
                    raise ServerUnreachable(
                        f"a malformed reply frame: {exc}", socket_path=self.socket_path
                    ) from exc
                headers = _header_fields(lines) if lines else {}
                headers["content-type"] = reply_type
                return status, headers, payload
        head = f"{method} {path} HTTP/1.1\r\nHost: edgeagent\r\nContent-Length: {len(body)}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        head += extra
        message = (head + "\r\n").encode("ascii") + body
        return self._roundtrip(lambda: self._exchange_http(message))

    def _roundtrip(self, exchange: Callable[[], _T]) -> _T:
        """``exchange`` on the open connection, or once more on a new one if the server had closed it."""
        reused = self._sock is not None
        try:
            return exchange()
        except (ConnectionError, _ClosedBeforeReply) as exc:
            self.close()
            if not reused:
                raise ServerUnreachable(
                    f"{self.socket_path}: connection lost ({exc})", socket_path=self.socket_path
                ) from exc
        except TIMEOUT_ERRORS as exc:
            self.close()
            raise ServerUnreachable(
                f"{self.socket_path}: no reply within {self.timeout_s:g} s", socket_path=self.socket_path
            ) from exc
        except OSError as exc:
            self.close()
            raise ServerUnreachable(f"{self.socket_path}: {exc}", socket_path=self.socket_path) from exc
        # The server closed the idle keep-alive connection before our request: retry once, fresh.
        try:
            return exchange()
        except TIMEOUT_ERRORS as exc:
            self.close()
            raise ServerUnreachable(
                f"{self.socket_path}: no reply within {self.timeout_s:g} s", socket_path=self.socket_path
            ) from exc
        except (OSError, _ClosedBeforeReply) as exc:
            self.close()
            raise ServerUnreachable(
                f"{self.socket_path}: connection lost ({exc})", socket_path=self.socket_path
            ) from exc

    def _connection(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            Timeouts(sock, self.timeout_s, self.timeout_s)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise ServerUnreachable(
                    f"cannot connect to the agent at {self.socket_path}: {exc.strerror or exc}",
                    socket_path=self.socket_path,
                ) from exc
            self._sock, self._fresh = sock, True
        return self._sock

    def _exchange_shm(
        self, shm_frame: tuple[bytes, list[int], int], arrays: Sequence[np.ndarray], parts: frames.Parts
    ) -> frames.Received:
        """A predict through shared memory, or ``parts`` over the socket when the agent does not offer it."""
        if self.shm_offered is None:  # once per connection: ask the agent
            reply = self._exchange_frame([frames.encode_options()])
            _, status, _ = frames.REPLY.unpack_from(reply)
            offered = False
            if status == 200:  # an agent that predates shared memory answers 400 bad_frame
                with contextlib.suppress(frames.FrameError, ValueError, TypeError):
                    offered = json.loads(frames.decode_call_reply(bytes(reply))[3]).get("shm") is not None
            self.shm_offered = offered
        if not self.shm_offered:
            return self._exchange_frame(parts)
        frame, offsets, size = shm_frame
        if self._shm is None:
            self._shm = shm.InputBuffer()
        fd = self._shm.write(arrays, offsets, size)
        return self._exchange_frame([frame], (fd,))

    def _exchange_frame(self, parts: frames.Parts, fds: Sequence[int] = ()) -> frames.Received:
        sock = self._connection()
        if self._fresh:
            self._fresh = False
            parts = (
                [frames.PREFACE + parts[0], *parts[1:]]
                if len(parts[0]) <= frames.SMALL
                else [frames.PREFACE, *parts]
            )
        buf = self._send(sock, parts, fds) or sock.recv(_RECV)
        if not buf:
            raise _ClosedBeforeReply("the server closed the connection")
        while len(buf) < 8:
            chunk = sock.recv(_RECV)
            if not chunk:
                break
            buf += chunk
        if buf.startswith(b"HTTP/"):  # an HTTP answer to the preface
            self._pending = buf
            status, _, payload = self._read_response()
            self.close()
            if status in _NOT_FRAMES:  # an agent that predates frames read the preface as HTTP
                self.framed = False
                raise _NoFrames
            raise _failure(status, payload)  # e.g. 503 too_many_connections, sent before any reading
        if len(buf) < 8:
            raise ServerUnreachable("the reply frame was cut short", socket_path=self.socket_path)
        (size,) = _SIZE.unpack_from(buf)
        total = 4 + size
        if len(buf) == total:  # the usual case: the whole reply came in one read
            return buf
        if len(buf) > total or total > _MAX_FRAME:
            self.close()
            raise ServerUnreachable("the reply is not one frame", socket_path=self.socket_path)
        reply = frames.receive_buffer(total)
        view, got = reply, len(buf)
        view[:got] = buf
        while got < total:
            n = sock.recv_into(view[got:])
            if not n:
                self.close()
                raise ServerUnreachable("the reply frame was cut short", socket_path=self.socket_path)
            got += n
        return reply

    def _exchange_http(self, message: bytes) -> tuple[int, dict[str, str], bytes]:
        sock = self._connection()
        self._fresh = False
        self._pending = self._send(sock, [message])
        return self._read_response()

    @staticmethod
    def _send(sock: socket.socket, parts: frames.Parts, fds: Sequence[int] = ()) -> bytes:
        """Send ``parts``; b"", or what the server answered before it closed without reading."""
        try:
            send_parts(sock, parts, fds)
        except (BrokenPipeError, ConnectionResetError):
            # A server at its connection limit answers 503 and closes before reading a request.
            try:
                early = sock.recv(_RECV)
            except OSError:
                early = b""
            if not early:
                raise
            return early
        return b""

    def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        sock = self._sock
        if sock is None:
            raise _ClosedBeforeReply("not connected")
        buf = self._pending
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            chunk = sock.recv(_RECV)
            if not chunk:
                raise _ClosedBeforeReply("the server closed the connection")
            buf = buf + chunk if buf else chunk
            if len(buf) > _MAX_HEAD and buf.find(b"\r\n\r\n") < 0:
                raise ServerUnreachable("the reply head is too long", socket_path=self.socket_path)
            end = buf.find(b"\r\n\r\n")
        head = buf[:end].decode("latin-1")
        status_line, _, fields = head.partition("\r\n")
        status = status_line[9:12]
        if not status_line.startswith("HTTP/1.") or not status.isdigit():
            raise ServerUnreachable(f"not an HTTP reply: {status_line!r}", socket_path=self.socket_path)
        headers = _header_fields(fields)
        length = int(headers.get("content-length", "0"))
        start = end + 4
        if len(buf) - start >= length:
            payload = buf[start : start + length]
            self._pending = buf[start + length :]
        else:
            chunks, size = [buf[start:]], len(buf) - start
            while size < length:
                chunk = sock.recv(max(_RECV, length - size))
                if not chunk:
                    raise ServerUnreachable("the reply body was cut short", socket_path=self.socket_path)
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
            payload, self._pending = data[:length], data[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status), headers, payload


class ClientSession:
    """One session of a stateful model on the server: each :meth:`predict` continues from the last."""

    def __init__(self, client: Client, session_id: str, model: str | None) -> None:
        self.client = client
        self.id = session_id
        self.model = model

    def predict(
        self, inputs: np.ndarray | Mapping[str, np.ndarray], *, binary: bool = True
    ) -> ClientPrediction:
        """The next step: ``inputs`` without the state inputs (the server feeds the carried state)."""
        return self.client.predict(inputs, model=self.model, binary=binary, session=self.id)

    def reset(self) -> bool:
        """Back to the initial state (the server forgets this session); True when it had it."""
        return self.client.reset_session(self.id, model=self.model)


def _json_outputs(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """A JSON reply's outputs by name, in the dtypes the server reports (older servers: none)."""
    outs = doc["outputs"]
    names = doc.get("output_names") or ["output"]
    dtypes = dict(zip(names, doc.get("output_dtypes") or [], strict=False))
    if not isinstance(outs, dict):
        outs = {names[0]: outs}
    return {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in outs.items()}


def _header_fields(lines: str) -> dict[str, str]:
    headers = {}
    for line in lines.split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return headers


class _NoFrames(Exception):
    """The agent answered the frames' preface with HTTP: it speaks HTTP/1.1 only."""


class _ClosedBeforeReply(Exception):
    """The connection ended before any reply byte: safe to resend on a new connection."""


def _failure(status: int, payload: bytes) -> RequestFailed:
    try:
        error = json.loads(payload)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", payload[:200].decode("utf-8", "replace") or f"HTTP {status}"
    return RequestFailed(f"HTTP {status} {code}: {message}", status=status, code=code)


__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "ClientPrediction",
    "ClientSession",
    "RequestFailed",
    "ServerUnreachable",
]
