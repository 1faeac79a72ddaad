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
from dataclasses import dataclass
from urllib.parse import parse_qsl

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_SINGLE_HEADERS = frozenset({"content-length", "content-type", "host"})
_METHODS = frozenset({"GET", "POST"})
_RECV = 65536

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

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@dataclass
class Connection:
    """One client socket and the bytes read from it but not yet consumed."""

    sock: socket.socket
    limits: HttpLimits
    pending: bytes = b""  # read from the socket but not yet consumed (pipelined requests)
    _current_timeout: float | None = None

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
        method, target, version, headers = self._parse_head(buf[:head_end])
        length = self._content_length(method, headers)
        start = head_end + 4
        if len(buf) - start >= length:  # the usual case: the whole request came in one read
            body = buf[start : start + length]
            self.pending = buf[start + length :]
        else:
            body = self._read_body(buf[start:], length)
        path, _, query_text = target.partition("?")
        query: dict[str, str] = {}
        if query_text:
            try:
                query = dict(parse_qsl(query_text, keep_blank_values=True, max_num_fields=32))
            except ValueError as exc:
                raise HttpError(400, "bad_query", f"bad query string: {exc}") from exc
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        return Request(method, path, query, headers, body, keep_alive)

    def _read_head(self, buf: bytes) -> tuple[bytes, int] | None:
        chunks = [buf] if buf else []
        size = len(buf)
        self._timeout(self.limits.request_timeout_s if buf else self.limits.idle_timeout_s)
        while True:
            if size > self.limits.max_head_bytes:
                raise HttpError(
                    431, "head_too_large", f"request head over {self.limits.max_head_bytes} bytes"
                )
            chunk = self._recv()
            if not chunk:
                if b"".join(chunks).strip():
                    raise HttpError(400, "truncated", "the connection closed in the middle of a request head")
                return None
            chunks.append(chunk)
            size += len(chunk)
            self._timeout(self.limits.request_timeout_s)
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
        if seconds != self._current_timeout:
            self.sock.settimeout(seconds)
            self._current_timeout = seconds

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(_RECV)
        except TimeoutError as exc:
            raise HttpError(408, "timeout", "the request did not arrive in time") from exc

    def _parse_head(self, head: bytes) -> tuple[str, str, str, dict[str, str]]:
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
        if len(lines) - 1 > self.limits.max_headers:
            raise HttpError(431, "too_many_headers", f"more than {self.limits.max_headers} header fields")
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
        return method, target, version, headers

    def _content_length(self, method: str, headers: dict[str, str]) -> int:
        if "transfer-encoding" in headers:
            raise HttpError(
                501, "chunked_unsupported", "send a Content-Length body; transfer-encoding is not supported"
            )
        text = headers.get("content-length")
        if text is None:
            if method == "POST":
                raise HttpError(411, "length_required", "a POST needs a Content-Length header")
            return 0
        if not text.isdigit() or len(text) > 18:
            raise HttpError(400, "bad_header", f"Content-Length {text!r} is not a byte count")
        length = int(text)
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
