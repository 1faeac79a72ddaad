"""The framed binary wire of the local inference socket (the Python client's default), against
a real server with real ONNX Runtime and LiteRT sessions: it agrees with HTTP, carries every
endpoint, refuses malformed frames with a reason, survives fuzzing, and falls back to HTTP."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.client import Client
from edgeagent.errors import RequestFailed
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.serving import InferenceServer, ServedModel, frames
from edgeagent.serving.http import HttpLimits
from edgeagent.serving.server import ServerLimits
from tests.runtimes_support import wait_for

ORT = LoadOptions("CPUExecutionProvider", threads=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):  # type: ignore[no-untyped-def]
    """'digits' (mlp.onnx, the default) and 'digits-int8' (mlp_int8.tflite)."""
    root = tmp_path_factory.mktemp("frames")
    limits = ServerLimits(http=HttpLimits(max_body_bytes=1 << 20, max_head_bytes=1024, request_timeout_s=0.5))
    srv = InferenceServer(root / "agent.sock", limits=limits)
    srv.activate(
        ServedModel("digits", load_model(model_dir / "mlp.onnx", "onnxruntime", ORT), "digits", "1.0.0")
    )
    int8 = load_model(
        model_dir / "mlp_int8.tflite", "litert", LoadOptions("xnnpack", threads=1), precision="int8"
    )
    srv.activate(ServedModel("digits-int8", int8, "digits", "1.0.0"))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def x(digits) -> np.ndarray:  # type: ignore[no-untyped-def]
    return digits.x_test[:5].reshape(5, 64).astype(np.float32)


def test_framed_and_http_replies_agree(server, x) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path) as framed, Client(server.socket_path, framed=False) as http:
        a, b = framed.predict(x), http.predict(x)
        assert framed.framed and not http.framed
        np.testing.assert_array_equal(a.output, b.output)
        assert list(a.outputs) == list(b.outputs) == ["logits"]
        assert (a.model, a.version, a.runtime, a.delegate) == (b.model, b.version, b.runtime, b.delegate)
        assert a.id != b.id and server.recent.get(a.id) is not None and a.latency_ms > 0
        named = framed.predict({"input": x})  # named inputs travel as named arrays
        np.testing.assert_array_equal(named.output, a.output)
        one = framed.predict(x[0])  # one sample without its batch dimension
        np.testing.assert_array_equal(one.output, a.output[:1])
        q = framed.predict(x, model="digits-int8")
        assert (q.model, q.runtime, q.output.dtype) == ("digits-int8", "litert", np.float32)
        raw = framed.predict(np.zeros((2, 64), np.int8), model="digits-int8", raw=True)
        assert raw.output.dtype == np.int8 and raw.output.shape == (2, 10)
        as_json = framed.predict(x, binary=False)  # JSON goes through a call frame
        np.testing.assert_allclose(as_json.output, a.output, rtol=1e-6)


def test_every_endpoint_answers_over_frames(server, x) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path) as client:
        client.predict(x[:1])
        assert client.health()["status"] == "ok"
        assert {m["name"] for m in client.models()["models"]} == {"digits", "digits-int8"}
        rows = {r["model"]: r for r in client.stats()["stats"]}
        # the reply was sent before its latency was recorded, but the same connection orders them
        assert rows["digits"]["count"] == server.stats.snapshot()[server.served()["digits"].key].latency.count
        with pytest.raises(RequestFailed) as info:
            client.predict(x, model="nope")
        assert (info.value.status, info.value.code) == (404, "unknown_model")
        with pytest.raises(RequestFailed) as info:
            client.predict(x, model="digits-int8", raw=True)
        assert (info.value.status, info.value.code) == (422, "bad_dtype")
        status, _, body = client._request("GET", "/v1/nothing", b"", None)  # a call frame, no endpoint
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        assert client.framed and client.health()["status"] == "ok"


def test_an_http_only_agent_gets_http_from_the_client(server, x, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # An agent that predates frames reads the preface as an HTTP request line and answers 505.
    monkeypatch.setattr("edgeagent.serving.endpoints.PREFACE", b"\0never sent\0")
    with Client(server.socket_path) as client:
        result = client.predict(x)
        assert not client.framed and result.output.shape == (5, 10)
        assert client.health()["status"] == "ok"


@pytest.mark.parametrize("framed", [True, False])
def test_a_full_server_says_so(tmp_path: Path, model_dir: Path, x, framed: bool) -> None:  # type: ignore[no-untyped-def]
    limits = ServerLimits(max_connections=1)
    with InferenceServer(tmp_path / "s.sock", limits=limits) as srv:
        model = load_model(model_dir / "mlp.onnx", "onnxruntime", ORT)
        srv.activate(ServedModel("digits", model, "digits", "1.0.0"))
        with Client(srv.socket_path) as first, Client(srv.socket_path, framed=framed) as second:
            first.predict(x)
            with pytest.raises(RequestFailed) as info:
                second.predict(x)
            assert (info.value.status, info.value.code) == (503, "too_many_connections")
            assert second.framed == framed  # a full server is not an HTTP-only one
            first.close()
            wait_for(lambda: not srv._connections, what="the first connection to end")
            assert second.predict(x).output.shape == (5, 10)


# -- hostile frames --------------------------------------------------------------------------


def _str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", len(data)) + data


def _array(name: str, descr: str, shape: tuple[int, ...]) -> bytes:
    return _str(name) + _str(descr) + bytes([len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)


def _frame(head: bytes, data: bytes = b"", *, kind: int = 1, flags: int = 0, pad: bool = True) -> bytes:
    if pad:
        head += bytes(-(8 + len(head)) % 8)
    return struct.pack("<IBBH", 4 + len(head) + len(data), kind, flags, len(head)) + head + data


GOOD_HEAD = _str("") + b"\x01" + _array("", "<f4", (1, 64))
GOOD = _frame(GOOD_HEAD, bytes(256))


def _exchange(path: Path, data: bytes, replies: int = 1) -> list[tuple[int, bytes, bytes]]:
    """Send the preface and ``data``; (status, head, data) of each reply frame, until EOF or ``replies``."""
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(frames.PREFACE + data)
        buf = b""
        while len(out) < replies:
            while len(buf) < 8 or len(buf) < 4 + struct.unpack_from("<I", buf)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return out
                buf += chunk
            size, status, head_len = struct.unpack_from("<IHH", buf)
            out.append((status, buf[8 : 8 + head_len], buf[8 + head_len : 4 + size]))
            buf = buf[4 + size :]
    return out


def _error(reply: tuple[int, bytes, bytes]) -> tuple[int, str]:
    status, head, data = reply
    assert head == b""
    error = json.loads(data)["error"]
    assert error["message"] and "\n" not in error["message"]
    return status, error["code"]


@pytest.mark.parametrize(
    ("frame", "status", "code"),
    [
        (_frame(GOOD_HEAD, bytes(256), kind=9), 400, "bad_frame"),
        (_frame(GOOD_HEAD, bytes(256), flags=0x80), 400, "bad_frame"),
        (_frame(GOOD_HEAD + b"\x01", bytes(256), pad=False), 400, "bad_frame"),  # head not 8-aligned
        (_frame(_str("") + b"\x01\x05\x00ab", b""), 400, "bad_frame"),  # a field cut off
        (_frame(_str("") + b"\x00", b""), 400, "bad_frame"),  # no arrays
        (_frame(_str("") + b"\x01" + _array("", "<f4", (1,) * 33), b""), 400, "bad_frame"),
        (_frame(_str("") + b"\x02" + _array("", "<f4", (1, 64)) * 2, bytes(512)), 400, "bad_frame"),
        (_frame(_str(b"\xff\xfe") + b"\x01" + _array("", "<f4", (1, 64)), bytes(256)), 400, "bad_frame"),
        (_frame(GOOD_HEAD + b"\x07", bytes(256)), 400, "bad_frame"),  # bytes after the last field
        (_frame(_str("") + b"\x01" + _array("", "|O8", (1, 64)), bytes(512)), 422, "bad_dtype"),
        (_frame(_str("") + b"\x01" + _array("", "<c8", (1, 64)), bytes(512)), 422, "bad_dtype"),
        (_frame(_str("") + b"\x01" + _array("", "(2)f4", (1, 32)), bytes(256)), 422, "bad_dtype"),
        (_frame(GOOD_HEAD, bytes(200)), 400, "bad_body"),  # data shorter than the head says
        (_frame(_str("") + b"\x01" + _array("", "<f4", (1, 32)), bytes(128)), 422, "bad_shape"),
        (_frame(_str("") + b"\x01" + _array("", "<f4", (0, 64)), b""), 422, "bad_shape"),
        (_frame(_str("") + b"\x01" + _array("x", "<f4", (1, 64)), bytes(256)), 422, "unknown_input"),
        (_frame(_str("nope") + b"\x01" + _array("", "<f4", (1, 64)), bytes(256)), 404, "unknown_model"),
        (_frame(_str("") + b"\x01" + _array("", "<f4", (2**31, 2**31)), b""), 400, "bad_body"),
    ],
    ids=[
        "unknown-type",
        "unknown-flag",
        "unaligned-head",
        "cut-field",
        "no-arrays",
        "33-dims",
        "duplicate-names",
        "name-not-utf8",
        "junk-after-head",
        "object-dtype",
        "complex-dtype",
        "subarray-dtype",
        "short-data",
        "wrong-shape",
        "empty-batch",
        "unknown-input",
        "unknown-model",
        "huge-shape",
    ],
)
def test_bad_frames_get_a_reason_and_the_connection_goes_on(server, frame, status, code) -> None:  # type: ignore[no-untyped-def]
    first, second = _exchange(server.socket_path, frame + GOOD, replies=2)
    assert _error(first) == (status, code)
    assert second[0] == 200  # the frame boundary was intact: the next request is answered


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (struct.pack("<I", 2) + bytes(4), 400, "bad_frame"),  # shorter than its fixed fields
        (struct.pack("<IBBH", 1 << 30, 1, 0, 0), 413, "body_too_large"),
        (GOOD[:40], 408, "timeout"),  # the rest never comes
    ],
    ids=["size-below-fixed-fields", "size-over-limit", "never-completed"],
)
def test_lost_framing_is_answered_then_closed(server, data, status, code) -> None:  # type: ignore[no-untyped-def]
    replies = _exchange(server.socket_path, data, replies=2)
    assert len(replies) == 1 and _error(replies[0]) == (status, code)


def test_call_frames_carry_status_and_body(server) -> None:  # type: ignore[no-untyped-def]
    call = frames.encode_call("GET", "/v1/health", "", b"") + frames.encode_call(
        "POST", "/v1/health", "", b""
    )
    ok, wrong = _exchange(server.socket_path, call, replies=2)
    assert ok[0] == 200 and json.loads(ok[2])["status"] == "ok"
    assert wrong[0] == 405 and json.loads(wrong[2])["error"]["code"] == "method_not_allowed"


def test_frames_larger_than_one_read_arrive_whole(server) -> None:  # type: ignore[no-untyped-def]
    big = np.random.default_rng(0).random((900, 64), dtype=np.float32)  # 230 KiB: several reads
    with Client(server.socket_path) as framed, Client(server.socket_path, framed=False) as http:
        np.testing.assert_array_equal(framed.predict(big).output, http.predict(big).output)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.one_of(
        st.binary(max_size=400),
        st.builds(lambda head, data: _frame(head, data), st.binary(max_size=120), st.binary(max_size=300)),
        st.builds(lambda cut, tail: GOOD[:cut] + tail, st.integers(0, len(GOOD)), st.binary(max_size=64)),
    )
)
def test_random_frames_never_stop_the_server(server, junk: bytes) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(server.socket_path))
        sock.sendall(frames.PREFACE + junk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    while reply:  # whatever came back is whole frames
        size, status, _ = struct.unpack_from("<IHH", reply)
        assert status in (200, 400, 404, 405, 408, 413, 415, 422, 500) and len(reply) >= 4 + size
        reply = reply[4 + size :]
    with Client(server.socket_path) as c:
        assert c.health()["status"] == "ok"
