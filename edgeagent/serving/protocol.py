"""The wire format of ``/v1/predict``: request bodies to input arrays, outputs to response bodies.

Content types (the response uses the request's type unless ``Accept`` names another one):

* ``application/json``: ``{"inputs": [[...]]}`` for a single-input model, or
  ``{"inputs": {"name": [[...]], ...}}`` (every input by name); numbers and booleans, a
  bare number for a scalar input; each input is converted to the dtype the model declares
  (integers to an int32 input, booleans to a bool one; never a float to an integer input).
  Optional ``"raw": true``. The reply is ``{"id", "model", "version", "runtime", "delegate",
  "latency_ms", "output_names", "output_dtypes", "outputs"}`` where ``outputs`` is a nested
  list (one output) or ``{"name": [...]}`` (several, in the model's order) and
  ``output_dtypes`` the numpy dtype of each output (JSON numbers do not carry one).
* ``application/x-npy``: one ``.npy`` array for a single-input model. The reply is the
  ``.npy`` of the only output (``application/x-npz`` when there are several) and the
  metadata in ``X-Prediction-Id``, ``X-Model``, ``X-Model-Version``, ``X-Runtime``,
  ``X-Delegate``, ``X-Latency-Ms`` and ``X-Outputs`` (output names) headers.
* ``application/x-npz``: named inputs in, named outputs out.

``?raw=1`` (or ``"raw": true``) passes quantized integers through unchanged.
Errors are ``{"error": {"code": "...", "message": "..."}}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import ast
import io
import json
import re
import struct
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from edgeagent.errors import InputError

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
CONTENT_TYPES = (JSON, NPY, NPZ)

_NPY_MAGIC = b"\x93NUMPY"
# The header numpy writes for a C-ordered array; anything else goes through literal_eval.
_NPY_HEADER = re.compile(
    r"^\{'descr': '([<>|=]?[a-z]\d{1,2})', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}\s*$"
)
_MAX_NPY_HEADER = 4096
_MAX_DIMS = 32
# Requests repeat the same few shapes: parsed .npy headers and written ones are cached (bounded).
_CACHE_SIZE = 256
_LAYOUTS: dict[bytes, tuple[np.dtype[Any], Literal["C", "F"], tuple[int, ...], int]] = {}
_PREFIXES: dict[tuple[str, tuple[int, ...]], bytes] = {}


def parse_raw_flag(value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("1", "true", "yes", ""):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise InputError(f"raw={value!r} is not a boolean (1/0, true/false)", code="bad_body")


def decode_inputs(content_type: str, body: bytes) -> tuple[np.ndarray | dict[str, Any], bool | None]:
    """(feeds, raw flag from the body or None) from a request body."""
    if content_type == NPY:
        return decode_npy(body), None
    if content_type == NPZ:
        return _decode_npz(body), None
    return _decode_json(body)


def _decode_json(body: bytes) -> tuple[np.ndarray | dict[str, Any], bool | None]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the body is not JSON ({exc})", code="bad_body") from exc
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise InputError('the JSON body must be an object with "inputs"', code="bad_body")
    unknown = set(doc) - {"inputs", "raw"}
    if unknown:
        raise InputError(f"unknown JSON field {sorted(unknown)[0]!r} (allowed: inputs, raw)", code="bad_body")
    raw = doc.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise InputError('"raw" must be true or false', code="bad_body")
    inputs = doc["inputs"]
    if isinstance(inputs, dict):
        return {str(k): _json_array(v, str(k)) for k, v in inputs.items()}, raw
    return _json_array(inputs, None), raw


def _json_array(value: Any, name: str | None) -> np.ndarray:
    if not isinstance(value, (list, int, float)):  # bool is an int
        raise InputError(
            f"input {name or 'inputs'} must be a (nested) list of numbers or booleans",
            code="bad_body",
            tensor=name,
        )
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise InputError(
            f"input {name or 'inputs'} is not a rectangular array", code="bad_shape", tensor=name
        ) from exc
    if array.dtype.kind not in "biuf":
        raise InputError(f"input {name or 'inputs'} holds non-numbers", code="bad_dtype", tensor=name)
    return array


def decode_npy(body: bytes) -> np.ndarray:
    """A numeric array from ``.npy`` bytes, without copying the data and without pickle."""
    if len(body) < 10 or not body.startswith(_NPY_MAGIC):
        raise InputError("the body is not a .npy array (bad magic)", code="bad_body")
    major = body[6]
    if major == 1:
        (header_len,), start = struct.unpack_from("<H", body, 8), 10
    elif major in (2, 3):
        if len(body) < 12:
            raise InputError("the .npy header is truncated", code="bad_body")
        (header_len,), start = struct.unpack_from("<I", body, 8), 12
    else:
        raise InputError(f".npy format version {major} is not supported", code="bad_body")
    if header_len > _MAX_NPY_HEADER or start + header_len > len(body):
        raise InputError("the .npy header is too long or truncated", code="bad_body")
    header = body[start : start + header_len]
    layout = _LAYOUTS.get(header)
    if layout is None:
        layout = _npy_layout(header.decode("latin-1"))
        if len(_LAYOUTS) >= _CACHE_SIZE:  # a client cycling through shapes must not grow memory
            _LAYOUTS.clear()
        _LAYOUTS[header] = layout
    dtype, order, shape, count = layout
    data_start = start + header_len
    have = len(body) - data_start
    if count * dtype.itemsize != have:
        raise InputError(
            f".npy shape {list(shape)} needs {count * dtype.itemsize} data bytes; the body has {have}",
            code="bad_body",
        )
    # One zero-copy view of the body (read-only, like frombuffer).
    array: np.ndarray = np.ndarray(shape, dtype=dtype, buffer=body, offset=data_start, order=order)
    return array


def _npy_layout(header: str) -> tuple[np.dtype[Any], Literal["C", "F"], tuple[int, ...], int]:
    """(dtype, order, shape, element count) of a ``.npy`` header, or InputError."""
    descr, fortran, shape = _npy_header(header)
    try:
        dtype = np.dtype(descr)
    except TypeError as exc:
        raise InputError(f".npy dtype {descr!r} is not understood", code="bad_dtype") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise InputError(f".npy dtype {dtype} is not a plain numeric type", code="bad_dtype")
    count = 1
    for d in shape:
        count *= d
    return dtype, "F" if fortran else "C", shape, count


def _npy_header(header: str) -> tuple[str, bool, tuple[int, ...]]:
    match = _NPY_HEADER.match(header)
    if match:
        dims = tuple(int(d) for d in match.group(3).replace(" ", "").split(",") if d)
        return match.group(1), match.group(2) == "True", dims
    try:
        meta = ast.literal_eval(header)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise InputError("the .npy header is not a Python literal", code="bad_body") from exc
    if not isinstance(meta, dict) or set(meta) != {"descr", "fortran_order", "shape"}:
        raise InputError("the .npy header lacks descr/fortran_order/shape", code="bad_body")
    shape = meta["shape"]
    if (
        not isinstance(meta["descr"], str)
        or not isinstance(shape, tuple)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(d, int) and d >= 0 for d in shape)
    ):
        raise InputError("the .npy header has a bad descr or shape", code="bad_body")
    return meta["descr"], bool(meta["fortran_order"]), shape


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` (format 1.0) bytes of a numeric array."""
    if not array.flags.c_contiguous:
        array = np.require(array, requirements="C")  # ascontiguousarray would make a 0-d array 1-d
    key = (array.dtype.str, array.shape)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        descr = np.lib.format.dtype_to_descr(array.dtype)
        shape = repr(tuple(int(d) for d in array.shape))
        header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
        pad = 64 - (len(_NPY_MAGIC) + 4 + len(header) + 1) % 64
        header_bytes = (header + " " * (pad % 64) + "\n").encode("latin-1")
        prefix = _NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(header_bytes)) + header_bytes
        if len(_PREFIXES) >= _CACHE_SIZE:
            _PREFIXES.clear()
        _PREFIXES[key] = prefix
    return prefix + array.tobytes()


def _decode_npz(body: bytes) -> dict[str, Any]:
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"the body is not a .npz archive ({exc})", code="bad_body") from exc


def encode_npz(names: Sequence[str], arrays: Sequence[np.ndarray]) -> bytes:
    out = io.BytesIO()
    named: dict[str, Any] = dict(zip(names, arrays, strict=True))
    np.savez(out, **named)
    return out.getvalue()


def reply_headers(meta: Mapping[str, Any], names: Sequence[str]) -> str:
    """The header lines of a binary reply that stay the same for a served model (computed once)."""
    return (
        f"X-Model: {meta['model']}\r\nX-Model-Version: {meta['version']}\r\nX-Runtime: {meta['runtime']}\r\n"
        f"X-Delegate: {meta['delegate']}\r\nX-Outputs: {','.join(names)}\r\n"
    )


def encode_outputs(
    content_type: str,
    names: Sequence[str],
    arrays: Sequence[np.ndarray],
    meta: Mapping[str, Any],
    pid: str,
    latency_ms: float,
    static_headers: str,
) -> tuple[str, bytes, str]:
    """(content type, body, extra header lines) of a prediction reply.

    ``meta`` holds model, version, runtime and delegate; ``static_headers`` is
    :func:`reply_headers` of the served model.
    """
    if content_type == JSON:
        outputs: Any = (
            arrays[0].tolist()
            if len(arrays) == 1
            else {n: a.tolist() for n, a in zip(names, arrays, strict=True)}
        )
        doc = {**meta, "id": pid, "latency_ms": round(latency_ms, 4), "output_names": list(names)}
        doc["output_dtypes"] = [a.dtype.name for a in arrays]
        doc["outputs"] = outputs
        return JSON, json.dumps(doc).encode(), ""
    headers = f"X-Prediction-Id: {pid}\r\nX-Latency-Ms: {latency_ms:.4f}\r\n{static_headers}"
    if content_type == NPY and len(arrays) == 1:
        return NPY, encode_npy(arrays[0]), headers
    return NPZ, encode_npz(names, arrays), headers


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()
