"""Host-to-device messages are strict: no coercion of any field (issue 19, item 3)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeagent import errors
from edgeagent.protocol import BlockRequest, BundleRef, Command, DesiredState, parse

REF = {"name": "digits", "version": "1.0.0", "sha256": "a" * 64, "size": 1234, "source": "mqtt"}
DOC = {"v": 1, "seq": 12345678901234, "target": "device:pi-1", "models": {"default": REF}}
CMD = {"v": 1, "seq": 12345678901234, "id": "abc", "target": "device:pi-1", "name": "bench"}
REQ = {"v": 1, "device": "pi-1", "sha256": "a" * 64, "first": 0, "count": 1, "block_size": 4096}

# (model, valid message, path of the field to spoil, a value of the wrong type that lax
# pydantic would have coerced)
CASES: list[tuple[type[Any], dict[str, Any], tuple[str, ...], Any]] = [
    (DesiredState, DOC, ("seq",), "12345678901234"),
    (DesiredState, DOC, ("seq",), 12345678901234.0),
    (DesiredState, DOC, ("v",), "1"),
    (DesiredState, DOC, ("rollback",), "true"),
    (DesiredState, DOC, ("rollback",), 1),
    (DesiredState, DOC, ("issued_at",), "1700000000"),
    (DesiredState, DOC, ("models", "default", "size"), "1234"),
    (DesiredState, DOC, ("models", "default", "size"), 1234.0),
    (BundleRef, REF, ("size",), "1234"),
    (BundleRef, REF, ("name",), 7),
    (Command, CMD, ("seq",), "12345678901234"),
    (Command, CMD, ("seq",), True),
    (Command, CMD, ("id",), 12),
    (BlockRequest, REQ, ("first",), "0"),
    (BlockRequest, REQ, ("count",), 1.0),
    (BlockRequest, REQ, ("block_size",), "4096"),
]


def _spoil(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(body))
    inner = copy
    for part in path[:-1]:
        inner = inner[part]
    inner[path[-1]] = value
    return copy


@pytest.mark.parametrize(("model", "body", "path", "value"), CASES)
def test_a_coercible_value_of_the_wrong_type_is_refused(
    model: type[Any], body: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    parse(model, body, "message")  # the valid one passes
    spoiled = _spoil(body, path, value)
    with pytest.raises(errors.MalformedMessage, match=path[-1]):
        parse(model, spoiled, "message")  # as the agent sees a payload (a dict)
    with pytest.raises(errors.MalformedMessage, match=path[-1]):
        parse(model, json.dumps(spoiled).encode(), "message")  # and as JSON text


def test_a_seq_beyond_64_bits_is_refused() -> None:
    with pytest.raises(errors.MalformedMessage, match="seq"):
        parse(DesiredState, {**DOC, "seq": 2**70}, "desired document")
    with pytest.raises(errors.MalformedMessage, match="seq"):
        parse(Command, {**CMD, "seq": 2**63}, "command")
