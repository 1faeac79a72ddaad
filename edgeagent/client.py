"""A small keep-alive client for the agent's local inference socket.

::

    from edgeagent.client import Client

    with Client("/run/edgeagent/agent.sock") as client:
        result = client.predict(image_batch)            # .npy over the wire
        print(result.output.argmax(axis=1), result.id, result.version)
        client.predict({"input": x}, model="detector")  # a named model, .npz
        client.predict(x, binary=False)                 # JSON over the wire

One connection is kept open and reused; a connection the server closed while idle is
reopened once, transparently. A :class:`Client` is not shared between threads: give each
thread its own (they are cheap). Errors: :class:`~edgeagent.errors.ServerUnreachable`
(no server on the socket) and :class:`~edgeagent.errors.RequestFailed` (the server's
4xx/5xx, with its ``status`` and ``code``).
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.errors import RequestFailed, ServerUnreachable
from edgeagent.serving.protocol import JSON, NPY, NPZ, decode_npy, encode_npy, encode_npz

DEFAULT_SOCKET = Path("/run/edgeagent/agent.sock")  # socket_path in agent.toml, by default
_MAX_HEAD = 64 * 1024


@dataclass
class ClientPrediction:
    """A prediction as the server answered it."""

    outputs: dict[str, np.ndarray]  # by output name, in the model's order (.npy replies: read-only views)
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
    """HTTP/1.1 over the agent's Unix socket, with one reused connection."""

    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET, *, timeout_s: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._pending = b""  # reply bytes read past the previous reply (none, with one request at a time)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._pending = b""

    # -- API ------------------------------------------------------------------------------

    def predict(
        self,
        inputs: np.ndarray | Mapping[str, np.ndarray],
        *,
        model: str | None = None,
        raw: bool = False,
        binary: bool = True,
    ) -> ClientPrediction:
        """Run ``inputs`` (one array, or a mapping input name -> array) on the served model."""
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
        status, headers, payload = self._request("POST", path, body, content_type)
        if status != 200:
            raise _failure(status, payload)
        reply_type = headers.get("content-type", "")
        if reply_type == JSON:
            doc = json.loads(payload)
            outs = doc["outputs"]
            names = doc.get("output_names") or ["output"]
            outputs = (
                {k: np.asarray(v) for k, v in outs.items()}
                if isinstance(outs, dict)
                else {names[0]: np.asarray(outs)}
            )
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
        self, method: str, path: str, body: bytes, content_type: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: edgeagent\r\nContent-Length: {len(body)}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        message = (head + "\r\n").encode("ascii") + body
        reused = self._sock is not None
        try:
            self._send(message)
            return self._read_response()
        except (ConnectionError, _ClosedBeforeReply) as exc:
            self.close()
            if not reused:
                raise ServerUnreachable(
                    f"{self.socket_path}: connection lost ({exc})", socket_path=self.socket_path
                ) from exc
        except OSError as exc:
            self.close()
            raise ServerUnreachable(f"{self.socket_path}: {exc}", socket_path=self.socket_path) from exc
        # The server closed the idle keep-alive connection before our request: retry once, fresh.
        try:
            self._send(message)
            return self._read_response()
        except (OSError, _ClosedBeforeReply) as exc:
            self.close()
            raise ServerUnreachable(
                f"{self.socket_path}: connection lost ({exc})", socket_path=self.socket_path
            ) from exc

    def _send(self, message: bytes) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise ServerUnreachable(
                    f"cannot connect to the agent at {self.socket_path}: {exc.strerror or exc}",
                    socket_path=self.socket_path,
                ) from exc
            self._sock = sock
        self._sock.sendall(message)

    def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        sock = self._sock
        if sock is None:
            raise _ClosedBeforeReply("not connected")
        buf = self._pending
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            chunk = sock.recv(65536)
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
        headers = {}
        for line in fields.split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        start = end + 4
        if len(buf) - start >= length:
            payload = buf[start : start + length]
            self._pending = buf[start + length :]
        else:
            chunks, size = [buf[start:]], len(buf) - start
            while size < length:
                chunk = sock.recv(max(65536, length - size))
                if not chunk:
                    raise ServerUnreachable("the reply body was cut short", socket_path=self.socket_path)
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
            payload, self._pending = data[:length], data[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(status), headers, payload


class _ClosedBeforeReply(Exception):
    """The connection ended before any reply byte: safe to resend on a new connection."""


def _failure(status: int, payload: bytes) -> RequestFailed:
    try:
        error = json.loads(payload)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", payload[:200].decode("utf-8", "replace") or f"HTTP {status}"
    return RequestFailed(f"HTTP {status} {code}: {message}", status=status, code=code)


__all__ = ["DEFAULT_SOCKET", "Client", "ClientPrediction", "RequestFailed", "ServerUnreachable"]
