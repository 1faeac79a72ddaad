"""Length-prefixed binary frames on the local socket: the Python client's lean predict path.

A connection whose first bytes are :data:`PREFACE` speaks frames instead of HTTP/1.1 for
its whole life (an HTTP/1.1 server answers the preface with a 505 and closes, which the
client takes as "no frames here" and falls back to HTTP). Every frame, both directions::

    u32 size      bytes after this field
    u16 code      request: u8 type (1 predict, 2 call, 3 options) + u8 flags (bit 0: raw,
                  bit 1: session, bit 2: shm); reply: status
    u16 head      head length H; 8 + H is a multiple of 8
    H   head      the fields of the frame type below, then zero padding
    ... data      size - 4 - H bytes

``str`` below is a u16 byte count and UTF-8 text; ``array`` is ``str name, str descr
(numpy dtype string, e.g. "<f4"), u8 ndim, ndim x u32 dims``; array data is C-ordered and
each array's bytes are zero-padded to a multiple of 8, so every array starts 8-aligned.

=========  ============================================  =============================================
frame      head                                          data
=========  ============================================  =============================================
predict    ``str model ("" = default), u8 n, n x array``  the n input arrays (a name "" = the only input)
200 reply  ``f64 latency_ms, str id, str model,           the n output arrays
           str version, str runtime, str delegate,
           u8 n, n x array``
call       ``str method, str target, str content_type``  the HTTP body (any endpoint, e.g. /v1/stats)
call reply ``str content_type, str header_lines``        the HTTP reply body
options    empty                                         empty
opt reply  ``str content_type, str header_lines``        ``{"shm": {...} or null, "reason": str}`` (JSON)
error      empty                                         ``{"error": {"code", "message"}}`` (JSON)
=========  ============================================  =============================================

A predict frame with the session flag starts its head with ``str session`` (the id of a
stateful model's session, :mod:`edgeagent.serving.sessions`) before the fields above.
A predict frame with the ``shm`` flag has an empty data section: its arrays lie, at the same
offsets, in one sealed memfd passed with the frame (SCM_RIGHTS); see :mod:`edgeagent.serving.shm`.
A client sends it only after an options frame on the same connection said ``shm`` is available.

A predict request's reply is a 200 reply or an error (status >= 400); a call's reply is
always a call reply carrying the HTTP status. Heads repeat from request to request, so
both sides parse each distinct head once and look it up afterwards (bounded caches).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from edgeagent.errors import InputError

PREFACE = b"EDGEAGENT * FRAMES/1\r\n\r\n"
PREDICT = 1
CALL = 2
OPTIONS = 3  # the connection's wire options (shared memory); older agents answer 400 bad_frame
FLAG_RAW = 1
FLAG_SESSION = 2
FLAG_SHM = 4  # the predict frame's arrays are in the file descriptor sent with it
SMALL = 64 * 1024  # frames up to this are joined and sent with one send; larger ones are not copied
MAX_ARRAYS = 64
MAX_DIMS = 32

FRAME = struct.Struct("<IBBH")  # size, type, flags, head length (a request)
REPLY = struct.Struct("<IHH")  # size, status, head length (a reply)
_U16 = struct.Struct("<H")
_LATENCY_ID = struct.Struct("<dH")  # a 200 reply's head starts with latency_ms and the id's length
# a 200 reply up to its id: size, status, head length, latency_ms, id length
_REPLY_200 = struct.Struct("<IHHdH")
_ZEROS = tuple(bytes(n) for n in range(8))
_DESCR = re.compile(r"[<>|=][biuf][1-8]\Z")
_CACHE_SIZE = 256


class FrameError(Exception):
    """Bytes that are not a frame of this protocol; ``code`` as in the JSON error replies."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


# A received frame: bytes when one read held it, else a buffer the rest was read into (the
# memory of np.empty: a bytearray would be zero-filled first, one more pass over a large frame).
Received = bytes | bytearray | memoryview


def receive_buffer(size: int) -> memoryview:
    """An uninitialised buffer of ``size`` bytes to ``recv_into``."""
    return np.empty(size, np.uint8).data


class ArraySpec(NamedTuple):
    name: str  # "" = the model's only input
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int


class Layout(NamedTuple):
    """A parsed run of arrays: where each one lies in the data section, and its total size."""

    arrays: tuple[ArraySpec, ...]
    data_size: int  # padded
    unnamed: bool  # one array named "": the model's only input


class PredictHead(NamedTuple):
    model: str | None
    layout: Layout


def pad8(n: int) -> int:
    return (n + 7) & ~7


def pack_str(text: str) -> bytes:
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError(f"string of {len(data)} bytes does not fit a frame field")
    return _U16.pack(len(data)) + data


# -- reading -------------------------------------------------------------------------------


class _Reader:
    """Sequential field reader over a head; every overrun is a FrameError, never an IndexError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise FrameError("the frame head ends in the middle of a field")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def str(self) -> str:
        (n,) = _U16.unpack(self.take(2))
        try:
            return self.take(n).decode()
        except UnicodeDecodeError as exc:
            raise FrameError("a text field of the frame head is not UTF-8") from exc

    def done(self) -> None:
        if self.data[self.pos :].strip(b"\0"):
            raise FrameError("the frame head has bytes after its last field")


_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(descr: str, name: str) -> np.dtype[Any]:
    dtype = _DTYPES.get(descr)
    if dtype is None:
        # A strict pattern first: np.dtype() parses far more (objects, records, subarrays).
        if not _DESCR.match(descr):
            raise InputError(
                f"array {name or 'input'} has dtype {descr!r}; send a plain numeric one like '<f4'",
                code="bad_dtype",
                tensor=name or None,
            )
        try:
            dtype = np.dtype(descr)
        except TypeError as exc:
            raise InputError(f"dtype {descr!r} is not understood", code="bad_dtype") from exc
        _DTYPES[descr] = dtype
    return dtype


def read_layout(reader: _Reader) -> Layout:
    """``u8 n, n x array`` from ``reader``; InputError for a dtype, FrameError for bad structure."""
    count = reader.u8()
    if not 1 <= count <= MAX_ARRAYS:
        raise FrameError(f"a frame carries 1 to {MAX_ARRAYS} arrays, not {count}")
    arrays, offset = [], 0
    names: set[str] = set()
    for _ in range(count):
        name = reader.str()
        descr = reader.str()
        ndim = reader.u8()
        if ndim > MAX_DIMS:
            raise FrameError(f"array {name or 'input'} has {ndim} dimensions (at most {MAX_DIMS})")
        shape = struct.unpack(f"<{ndim}I", reader.take(4 * ndim))
        if name in names or (not name and count > 1):
            raise FrameError("arrays need distinct names ('' only for a single array)")
        names.add(name)
        dtype = _dtype(descr, name)
        size = dtype.itemsize
        for d in shape:
            size *= d
        arrays.append(ArraySpec(name, dtype, shape, offset, size))
        offset += pad8(size)
    return Layout(tuple(arrays), offset, count == 1 and not arrays[0].name)


def views(layout: Layout, frame: Received, data_start: int) -> list[np.ndarray]:
    """Zero-copy arrays over the data section of ``frame`` (read-only when it is bytes)."""
    have = len(frame) - data_start
    if have != layout.data_size:
        raise InputError(
            f"the frame's data is {have} bytes; its head describes {layout.data_size}", code="bad_body"
        )
    return [
        np.ndarray(a.shape, dtype=a.dtype, buffer=frame, offset=data_start + a.offset) for a in layout.arrays
    ]


def feeds(layout: Layout, frame: Received, data_start: int) -> np.ndarray | dict[str, np.ndarray]:
    """A predict frame's inputs: the array itself for one unnamed input, else name -> array."""
    if layout.unnamed:  # the usual request, without the list and dict
        spec = layout.arrays[0]
        if len(frame) - data_start == layout.data_size:
            array: np.ndarray = np.ndarray(spec.shape, spec.dtype, frame, data_start)
            return array
    arrays = views(layout, frame, data_start)
    if layout.unnamed:
        return arrays[0]
    return {spec.name: array for spec, array in zip(layout.arrays, arrays, strict=True)}


_PREDICT_HEADS: dict[bytes, PredictHead] = {}


def predict_head(head: bytes) -> PredictHead:
    """The model name and input layout of a predict frame's head (cached per distinct head)."""
    parsed = _PREDICT_HEADS.get(head)
    if parsed is None:
        reader = _Reader(head)
        model = reader.str()
        layout = read_layout(reader)
        reader.done()
        parsed = _cached(_PREDICT_HEADS, head, PredictHead(model or None, layout))
    return parsed


def split_session(head: bytes) -> tuple[str, bytes]:
    """(session id, the rest of the head) of a predict frame with the session flag."""
    reader = _Reader(head)
    session = reader.str()
    return session, head[reader.pos :]


def call_head(head: bytes) -> tuple[str, str, str]:
    """(method, target, content type) of a call frame's head."""
    reader = _Reader(head)
    method, target, content_type = reader.str(), reader.str(), reader.str()
    reader.done()
    return method, target, content_type


# -- writing -------------------------------------------------------------------------------


def _array_desc(name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    return pack_str(name) + pack_str(dtype.str) + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)


def describe(names: Sequence[str], arrays: Sequence[np.ndarray]) -> tuple[bytes, tuple[int, ...], int]:
    """(``u8 n, n x array`` bytes, zero padding after each array's data, padded data size)."""
    if not 1 <= len(arrays) <= MAX_ARRAYS:
        raise ValueError(f"a frame carries 1 to {MAX_ARRAYS} arrays, not {len(arrays)}")
    desc = bytes([len(arrays)]) + b"".join(
        _array_desc(n, a.dtype, a.shape) for n, a in zip(names, arrays, strict=True)
    )
    pads = tuple(pad8(a.nbytes) - a.nbytes for a in arrays)
    return desc, pads, sum(a.nbytes for a in arrays) + sum(pads)


def _signature(arrays: Sequence[np.ndarray]) -> tuple[Any, ...]:
    if len(arrays) == 1:
        only = arrays[0]
        return (only.dtype, only.shape)
    return tuple((a.dtype, a.shape) for a in arrays)


Parts = list[Any]  # buffers (bytes, C-contiguous arrays) that make one frame when sent in order


def _with_data(parts: Parts, arrays: Sequence[np.ndarray], pads: Sequence[int], data_size: int) -> Parts:
    """``parts`` then each array's bytes and padding: one bytes object for a small frame.

    A large frame stays a list of buffers for ``sendmsg``: joining would copy every byte of
    the arrays once more before the kernel copies them into the socket.
    """
    if len(arrays) == 1 and not pads[0] and arrays[0].flags.c_contiguous:  # the usual frame
        parts.append(arrays[0])
    else:
        for array, pad in zip(arrays, pads, strict=True):
            parts.append(array if array.flags.c_contiguous else np.require(array, requirements="C"))
            if pad:
                parts.append(_ZEROS[pad])
    if data_size <= SMALL:
        # numpy arrays export their buffer, so join copies their bytes straight into the frame
        return [b"".join(parts)]
    return parts


def joined(parts: Parts) -> bytes:
    return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)


def _cached(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    if len(cache) >= _CACHE_SIZE:  # a peer cycling through shapes must not grow memory
        cache.clear()
    cache[key] = value
    return value


# Everything of a predict request but its data is the same for the same model and input shapes.
_REQUEST_PREFIXES: dict[tuple[Any, ...], tuple[bytes, bytes, tuple[int, ...], int]] = {}


def _request_prefix(
    model: str | None,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    raw: bool,
    session: str | None = None,
) -> tuple[bytes, bytes, tuple[int, ...], int]:
    """(plain frame prefix, shm frame, pads, padded data size): cached per model, session and shapes."""
    key = (model, raw, session, tuple(names), _signature(arrays))
    found = _REQUEST_PREFIXES.get(key)
    if found is None:
        desc, pads, data_size = describe(names, arrays)
        head = (pack_str(session) if session is not None else b"") + pack_str(model or "") + desc
        head += _ZEROS[-(8 + len(head)) % 8]
        flags = (FLAG_RAW if raw else 0) | (FLAG_SESSION if session is not None else 0)
        prefix = FRAME.pack(4 + len(head) + data_size, PREDICT, flags, len(head)) + head
        shm = FRAME.pack(4 + len(head), PREDICT, flags | FLAG_SHM, len(head)) + head
        found = _cached(_REQUEST_PREFIXES, key, (prefix, shm, pads, data_size))
    return found


def predict_parts(
    model: str | None,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    raw: bool,
    session: str | None = None,
) -> Parts:
    """A predict request frame as buffers to send in order (``names`` "" for a single unnamed
    input; ``session``: a stateful model's session id)."""
    prefix, _, pads, data_size = _request_prefix(model, names, arrays, raw, session)
    return _with_data([prefix], arrays, pads, data_size)


def encode_predict(
    model: str | None,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    raw: bool,
    session: str | None = None,
) -> bytes:
    """A predict request frame (``names`` "" for a single unnamed input; ``session``: a session id)."""
    return joined(predict_parts(model, names, arrays, raw, session))


def shm_predict(
    model: str | None,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    raw: bool,
    session: str | None = None,
) -> tuple[bytes, list[int], int]:
    """(a predict frame with the shm flag and no data, each array's offset in the shared memory,
    the bytes they take there)."""
    _, frame, pads, data_size = _request_prefix(model, names, arrays, raw, session)
    offsets, offset = [], 0
    for array, pad in zip(arrays, pads, strict=True):
        offsets.append(offset)
        offset += array.nbytes + pad
    return frame, offsets, data_size


def encode_options() -> bytes:
    """An options frame: asks which wire options (shared memory) the connection may use."""
    return FRAME.pack(4, OPTIONS, 0, 0)


def encode_call(method: str, target: str, content_type: str, body: bytes) -> bytes:
    head = pack_str(method) + pack_str(target) + pack_str(content_type)
    head += _ZEROS[-(8 + len(head)) % 8]
    return FRAME.pack(4 + len(head) + len(body), CALL, 0, len(head)) + head + body


# A 200 reply's head after its id: the same for the same served model and output shapes.
_REPLY_TAILS: dict[tuple[Any, ...], tuple[bytes, tuple[int, ...], int]] = {}


def encode_reply(
    latency_ms: float, pid: str, static: bytes, names: Sequence[str], arrays: Sequence[np.ndarray]
) -> Parts:
    """A 200 predict reply as buffers to send in order; ``static`` is :func:`static_meta` of the model."""
    key = (static, names, _signature(arrays))
    found = _REPLY_TAILS.get(key)
    if found is None:
        desc, pads, data_size = describe(names, arrays)
        found = _cached(_REPLY_TAILS, key, (static + desc, pads, data_size))
    tail, pads, data_size = found
    pid_bytes = pid.encode()
    head_len = _LATENCY_ID.size + len(pid_bytes) + len(tail)
    padding = -(8 + head_len) % 8
    head_len += padding
    fixed = _REPLY_200.pack(4 + head_len + data_size, 200, head_len, latency_ms, len(pid_bytes))
    return _with_data([fixed, pid_bytes, tail, _ZEROS[padding]], arrays, pads, data_size)


def static_meta(model: str, version: str, runtime: str, delegate: str) -> bytes:
    """The part of a 200 reply's head that is the same for every reply of a served model."""
    return pack_str(model) + pack_str(version) + pack_str(runtime) + pack_str(delegate)


def _reply_frame(status: int, head: bytes, body: bytes) -> bytes:
    head += _ZEROS[-(8 + len(head)) % 8]
    return REPLY.pack(4 + len(head) + len(body), status, len(head)) + head + body


def encode_error(status: int, body: bytes) -> bytes:
    return _reply_frame(status, b"", body)


def encode_call_reply(status: int, content_type: str, header_lines: str, body: bytes) -> bytes:
    return _reply_frame(status, pack_str(content_type) + pack_str(header_lines), body)


# -- client side ---------------------------------------------------------------------------

_REPLY_HEADS: dict[bytes, tuple[tuple[str, str, str, str], Layout]] = {}


def decode_reply(
    frame: Received,
) -> tuple[float, str, tuple[str, str, str, str], dict[str, np.ndarray]]:
    """(latency_ms, id, (model, version, runtime, delegate), outputs by name) of a 200 predict reply.

    FrameError (or InputError for a dtype) when the frame is not one.
    """
    if len(frame) < _REPLY_200.size:
        raise FrameError("a predict reply shorter than its fixed fields")
    _, _, head_len, latency, id_len = _REPLY_200.unpack_from(frame)
    if 18 + id_len > 8 + head_len or 8 + head_len > len(frame):
        raise FrameError("the reply's id or head runs past its frame")
    try:
        pid = bytes(frame[18 : 18 + id_len]).decode()
    except UnicodeDecodeError as exc:
        raise FrameError("the prediction id is not UTF-8") from exc
    rest = bytes(frame[18 + id_len : 8 + head_len])
    parsed = _REPLY_HEADS.get(rest)
    if parsed is None:
        reader = _Reader(rest)
        meta = (reader.str(), reader.str(), reader.str(), reader.str())
        layout = read_layout(reader)
        reader.done()
        parsed = _cached(_REPLY_HEADS, rest, (meta, layout))
    meta, layout = parsed
    data_start = 8 + head_len
    if len(layout.arrays) == 1 and len(frame) - data_start == layout.data_size:  # the usual reply
        spec = layout.arrays[0]
        return latency, pid, meta, {spec.name: np.ndarray(spec.shape, spec.dtype, frame, data_start)}
    arrays = views(layout, frame, data_start)
    return latency, pid, meta, {a.name: v for a, v in zip(layout.arrays, arrays, strict=True)}


def decode_call_reply(frame: bytes) -> tuple[int, str, str, bytes]:
    """(status, content type, header lines, body) of a call reply frame."""
    _, status, head_len = REPLY.unpack_from(frame)
    reader = _Reader(frame[8 : 8 + head_len])
    content_type, header_lines = reader.str(), reader.str()
    reader.done()
    return status, content_type, header_lines, frame[8 + head_len :]
