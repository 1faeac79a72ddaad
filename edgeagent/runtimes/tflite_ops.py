"""The builtin operators a ``.tflite`` file uses, read from its flatbuffer without TensorFlow.

Used to find models that keep state in resource variables (``VAR_HANDLE``, ``READ_VARIABLE``,
``ASSIGN_VARIABLE``). Reading the file rather than asking the interpreter matters: once a
delegate takes the graph over, the interpreter lists its nodes as one ``DELEGATE`` op.

The layout read here, from TFLite's ``schema.fbs``: the root ``Model`` table's field 1 is
``operator_codes``, a vector of ``OperatorCode`` tables whose field 0 is the int8
``deprecated_builtin_code`` and field 3 the int32 ``builtin_code`` (codes over 127 are only in
the latter; the former then holds 127).
"""

from __future__ import annotations

import struct
from pathlib import Path

VAR_HANDLE, READ_VARIABLE, ASSIGN_VARIABLE = 142, 143, 144
VARIABLE_OPS = frozenset({VAR_HANDLE, READ_VARIABLE, ASSIGN_VARIABLE})
_IDENTIFIER = b"TFL3"


class _Buffer:
    """Bounds-checked little-endian reads; any overrun is a ValueError."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _read(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise ValueError("offset outside the file")
        value: int = struct.unpack_from(fmt, self.data, pos)[0]
        return value

    def field(self, table: int, index: int) -> int | None:
        """The position of field ``index`` of the table at ``table``; None when it is absent."""
        vtable = table - self._read("<i", table)
        vtable_size = self._read("<H", vtable)
        slot = 4 + 2 * index
        if slot + 2 > vtable_size:
            return None
        offset = self._read("<H", vtable + slot)
        return table + offset if offset else None

    def indirect(self, pos: int) -> int:
        return pos + self._read("<I", pos)

    def tables(self, pos: int) -> list[int]:
        """The tables of the vector referenced at ``pos``."""
        vector = self.indirect(pos)
        count = self._read("<I", vector)
        if count > len(self.data) // 4:
            raise ValueError("vector longer than the file")
        return [self.indirect(vector + 4 + 4 * k) for k in range(count)]


def builtin_codes(data: bytes) -> frozenset[int]:
    """The builtin operator codes of a TFLite flatbuffer; ValueError when it is not one."""
    if data[4:8] != _IDENTIFIER:
        raise ValueError("not a TFLite flatbuffer (no TFL3 identifier)")
    buf = _Buffer(data)
    model = buf.indirect(0)
    codes_at = buf.field(model, 1)
    if codes_at is None:
        return frozenset()
    codes = set()
    for table in buf.tables(codes_at):
        deprecated = buf.field(table, 0)
        builtin = buf.field(table, 3)
        small = buf._read("<b", deprecated) if deprecated is not None else 0
        large = buf._read("<i", builtin) if builtin is not None else 0
        codes.add(max(small, large))
    return frozenset(codes)


def uses_variables(path: Path) -> bool:
    """True when the model at ``path`` reads or assigns resource variables; False if unreadable."""
    try:
        return bool(builtin_codes(path.read_bytes()) & VARIABLE_OPS)
    except (OSError, ValueError):
        return False
