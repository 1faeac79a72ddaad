"""A minimal, strict HTTP/1.1 request reader and response writer for the local socket.

Only what a local inference endpoint needs, and everything else refused with a status:

* origin-form targets (``/v1/predict?raw=1``), methods GET and POST;
* bodies framed by ``Content-Length`` only (no chunked transfer-encoding: 501);
* bounded request head (431) and body (413), bounded header count;
* keep-alive by default on HTTP/1.1, ``Connection: close`` honoured, HTTP/1.0 closes;
* pipelined requests are read from the same buffer in order.

``http.server`` costs ~0.5 ms per round trip; this reader is a ``find``, a few ``split``s
and a ``recv_into`` per request. A malformed request raises :class:`HttpError`, which the
server answers with a JSON reason and then closes the connection (framing is lost).
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qsl

from edgeagent.serving.frames import Received, receive_buffer
from edgeagent.serving.sockets import ANCILLARY, MAX_FDS, TIMEOUT_ERRORS, Timeouts, close_all, fds_from

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_SINGLE_HEADERS = frozenset({"content-length", "content-type", "host"})
_METHODS = frozenset({"GET", "POST", "DELETE"})
# Below glibc's mmap threshold (128 KiB): recv allocates this much before it shrinks the
# bytes to what came, and a larger size costs an mmap/munmap pair on every read (measured:
# +40-50 µs per round trip of a 10 KB request with 256 KiB).
_RECV = 65536
_FRAME_SIZE = struct.Struct("<I")
# Clients repeat the same few request heads (same path, type and length): a head seen before
# is looked up instead of parsed. Only short heads, and a bounded number of them.
_HEAD_CACHE_BYTES = 1024
_HEAD_CACHE_SIZE = 256

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what a client may send (bytes, counts, seconds)."""

    max_head_bytes: int = 16 * 1024
    max_headers: int = 64
    max_body_bytes: int = 64 * 1024 * 1024
    idle_timeout_s: float = 60.0  # a keep-alive connection with no request is closed after this
    request_timeout_s: float = 30.0  # a started request must arrive completely within this


class HttpError(Exception):
    """A request that cannot be served; ``status`` and ``code`` go into the JSON reply."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.close = close  # framing may be lost: close the connection after replying


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool
    content_type: str = ""  # the media type of Content-Type, lower-case, without parameters


class _Head(NamedTuple):
    """A parsed request head (shared between requests with the same head bytes: never mutated)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    fields: int  # header lines, for the limit
    length: int | None  # Content-Length, None when absent
    keep_alive: bool
    content_type: str


_HEADS: dict[bytes, _Head] = {}


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """(path, query) of an origin-form target; HttpError for a bad query string."""
    path, _, query_text = target.partition("?")
    if not query_text:
        return path, {}
    try:
        return path, dict(parse_qsl(query_text, keep_blank_values=True, max_num_fields=32))
    except ValueError as exc:
        raise HttpError(400, "bad_query", f"bad query string: {exc}") from exc


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


@dataclass
class Connection:
    """One client socket and the bytes read from it but not yet consumed."""

    sock: socket.socket
    limits: HttpLimits
    pending: bytes = b""  # read from the socket but not yet consumed (pipelined requests)
    timeouts: Timeouts = field(init=False)
    # Shared memory negotiated: reads keep the file descriptors that come with the bytes (the
    # frame being read owns them); otherwise the kernel closes any that a client sends.
    accept_fds: bool = False
    fds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A request being sent waits at most request_timeout_s for its next bytes; so does a reply.
        self.timeouts = Timeouts(self.sock, self.limits.idle_timeout_s, self.limits.request_timeout_s)

    def take_preface(self, preface: bytes) -> bool:
        """Whether the connection starts with ``preface`` (then consumed); other bytes stay pending."""
        buf = self.pending
        while len(buf) < len(preface) and preface.startswith(buf):
            self._timeout(self.limits.request_timeout_s if buf else self.limits.idle_timeout_s)
            chunk = self._recv()
            if not chunk:
                break  # the request readers see the end of the stream and answer it
            buf = buf + chunk if buf else chunk
        if buf.startswith(preface):
            self.pending = buf[len(preface) :]
            return True
        self.pending = buf
        return False

    def read_request(self) -> Request | None:
        """The next request, or None when the client closed cleanly between requests."""
        buf = self.pending
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            read = self._read_head(buf)
            if read is None:
                return None
            buf, head_end = read
        if head_end > self.limits.max_head_bytes:
            raise HttpError(431, "head_too_large", f"request head over {self.limits.max_head_bytes} bytes")
        head_bytes = buf[:head_end]
        head = _HEADS.get(head_bytes)
        if head is None:
            head = self._parse_head(head_bytes)
            if head_end <= _HEAD_CACHE_BYTES:
                if len(_HEADS) >= _HEAD_CACHE_SIZE:
                    _HEADS.clear()
                _HEADS[head_bytes] = head
        if head.fields > self.limits.max_headers:
            raise HttpError(431, "too_many_headers", f"more than {self.limits.max_headers} header fields")
        length = self._content_length(head)
        start = head_end + 4
        if len(buf) - start >= length:  # the usual case: the whole request came in one read
            body = buf[start : start + length]
            self.pending = buf[start + length :]
        else:
            body = self._read_body(buf[start:], length)
        return Request(
            head.method, head.path, head.query, head.headers, body, head.keep_alive, head.content_type
        )

    def read_frame(self, max_size: int) -> Received | None:
        """The next length-prefixed frame (its u32 size included), or None at a clean end."""
        buf = self.pending
        while len(buf) < 8:
            self._timeout(self.limits.request_timeout_s if buf else self.limits.idle_timeout_s)
            chunk = self._recv()
            if not chunk:
                if buf:
                    raise HttpError(400, "truncated", "the connection closed in the middle of a frame")
                return None
            buf = buf + chunk if buf else chunk
        (size,) = _FRAME_SIZE.unpack_from(buf)
        if size < 4:
            raise HttpError(400, "bad_frame", f"a frame of {size} bytes is shorter than its fixed fields")
        if size > max_size:
            raise HttpError(413, "body_too_large", f"the frame is {size} bytes; the limit is {max_size}")
        total = 4 + size
        if len(buf) >= total:  # the usual case: the whole frame came in one read
            self.pending = buf[total:] if len(buf) > total else b""
            return buf[:total] if len(buf) > total else buf
        frame = receive_buffer(total)
        view, got = frame, len(buf)
        view[:got] = buf
        self._timeout(self.limits.request_timeout_s)
        while got < total:
            try:
                n = self._recv_into(view[got:])
            except TIMEOUT_ERRORS as exc:
                raise HttpError(408, "timeout", "the frame did not arrive in time") from exc
            if not n:
                raise HttpError(400, "truncated", f"the frame ended after {got} of {total} bytes")
            got += n
        self.pending = b""
        return frame

    def _read_head(self, buf: bytes) -> tuple[bytes, int] | None:
        chunks = [buf] if buf else []
        size = len(buf)
        while True:
            if size > self.limits.max_head_bytes:
                raise HttpError(
                    431, "head_too_large", f"request head over {self.limits.max_head_bytes} bytes"
                )
            # Idle between requests, bounded once one has started; set only when it changes.
            self._timeout(self.limits.request_timeout_s if size else self.limits.idle_timeout_s)
            chunk = self._recv()
            if not chunk:
                if b"".join(chunks).strip():
                    raise HttpError(400, "truncated", "the connection closed in the middle of a request head")
                return None
            chunks.append(chunk)
            size += len(chunk)
            joined = b"".join(chunks) if len(chunks) > 1 else chunk
            head_end = joined.find(b"\r\n\r\n")
            if head_end >= 0:
                return joined, head_end
            chunks = [joined]

    def _read_body(self, have: bytes, length: int) -> bytes:
        chunks, size = [have], len(have)
        self._timeout(self.limits.request_timeout_s)
        while size < length:
            chunk = self._recv()
            if not chunk:
                raise HttpError(400, "truncated", f"the body ended after {size} of {length} bytes")
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
        self.pending = data[length:]
        return data[:length]

    def _timeout(self, seconds: float) -> None:
        self.timeouts.recv(seconds)

    def _recv(self) -> bytes:
        try:
            if self.accept_fds:
                data, ancillary, _, _ = self.sock.recvmsg(_RECV, ANCILLARY)
                if ancillary:
                    self._keep(fds_from(ancillary))
                return data
            return self.sock.recv(_RECV)
        except TIMEOUT_ERRORS as exc:
            raise HttpError(408, "timeout", "the request did not arrive in time") from exc

    def _recv_into(self, view: memoryview) -> int:
        if not self.accept_fds:
            return self.sock.recv_into(view)
        n, ancillary, _, _ = self.sock.recvmsg_into([view], ANCILLARY)
        if ancillary:
            self._keep(fds_from(ancillary))
        return n

    def _keep(self, fds: list[int]) -> None:
        """Hold at most MAX_FDS for the frame being read (a frame uses one): a client sending a
        descriptor with every byte of a large frame must not exhaust the agent's descriptors."""
        self.fds += fds
        if len(self.fds) > MAX_FDS:
            close_all(self.fds[MAX_FDS:])
            del self.fds[MAX_FDS:]

    def take_fds(self) -> list[int]:
        """The descriptors received since the last call (the caller closes them)."""
        fds, self.fds = self.fds, []
        return fds

    def _parse_head(self, head: bytes) -> _Head:
        # latin-1 maps every byte to one character, so decoding never fails and the checks
        # below see exactly the bytes that were sent.
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")  # RFC 9112: skip leading CRLFs
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isascii() or not parts[1].isascii():
            raise HttpError(400, "bad_request_line", "the request line is not 'METHOD TARGET HTTP/1.1'")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpError(505, "bad_version", f"{version!r} is not HTTP/1.1 or HTTP/1.0")
        if method not in _METHODS:
            status = 501 if _TOKEN.match(method) else 400
            raise HttpError(status, "bad_method", f"method {method!r} is not supported")
        if not target.startswith("/") or not target.isprintable():
            raise HttpError(400, "bad_target", "the target must be a printable path starting with '/'")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.match(name):
                raise HttpError(400, "bad_header", "a header line is not 'Name: value' (or is folded)")
            key = name.lower()
            text = value.strip(" \t")
            previous = headers.get(key)
            if previous is not None and previous != text and key in _SINGLE_HEADERS:
                raise HttpError(400, "bad_header", f"conflicting {key} headers")
            headers[key] = text
        if "transfer-encoding" in headers:
            raise HttpError(
                501, "chunked_unsupported", "send a Content-Length body; transfer-encoding is not supported"
            )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or len(length) > 18):
            raise HttpError(400, "bad_header", f"Content-Length {length!r} is not a byte count")
        path, query = split_target(target)
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        return _Head(
            method,
            path,
            query,
            headers,
            len(lines) - 1,
            int(length) if length is not None else None,
            keep_alive,
            media_type(headers.get("content-type", "")),
        )

    def _content_length(self, head: _Head) -> int:
        length = head.length
        if length is None:
            if head.method == "POST":
                raise HttpError(411, "length_required", "a POST needs a Content-Length header")
            return 0
        if length > self.limits.max_body_bytes:
            raise HttpError(
                413,
                "body_too_large",
                f"the body is {length} bytes; the limit is {self.limits.max_body_bytes}",
            )
        return length


def response_bytes(
    status: int, content_type: str, body: bytes, *, keep_alive: bool, extra: str = ""
) -> bytes:
    """A complete HTTP/1.1 response (head and body) ready for one ``sendall``.

    ``extra`` is further header lines, each ending in CRLF.
    """
    close = "" if keep_alive else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{close}{extra}\r\n"
    )
    return head.encode("latin-1") + body
