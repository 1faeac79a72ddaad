"""Large inputs through shared memory (a sealed memfd passed over the Unix socket), against a real
server with real ONNX Runtime sessions on models built here: outputs equal the bare runtime bit
for bit for several dtypes and shapes and for multi-input models; no descriptor leaks; hostile
descriptors and sizes get a one-line error while the model keeps serving; the client falls back
to plain frames wherever shared memory is not offered."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgeagent.client import Client
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.serving import InferenceServer, ServedModel, frames, sockets
from edgeagent.serving.http import HttpLimits
from edgeagent.serving.server import ServerLimits

ORT = LoadOptions("CPUExecutionProvider", threads=1)
LIMIT = 8 << 20  # the server's body limit in these tests (bytes)
# dtype -> (op, constant): an op that changes every value, so the output is computed, not echoed
CASES = {
    "float32": ("Mul", 0.5),
    "float16": ("Mul", 0.5),
    "float64": ("Mul", 0.5),
    "int8": ("Add", 3),
    "uint8": ("Add", 3),
    "int32": ("Add", 3),
    "int64": ("Add", 3),
}
SHAPES = [(1, 3, 64, 64), (2, 5, 7), (1, 1)]  # odd byte counts exercise the 8-byte padding


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:  # type: ignore[type-arg]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _elementwise(path: Path, dtype: str, shape: tuple[int, ...]) -> Path:
    op, value = CASES[dtype]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = ["n", *shape[1:]]
    return _save(
        path,
        [helper.make_node(op, ["x", "k"], ["y"])],
        [helper.make_tensor_value_info("x", elem, dims)],
        [helper.make_tensor_value_info("y", elem, dims)],
        [numpy_helper.from_array(np.array(value, dtype), "k")],
    )


def _two_inputs(path: Path) -> Path:
    """image (float16 1x3xHxW) * 2 and tokens (int64 1xT) + 1: two inputs, two outputs."""
    f16, i64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64
    return _save(
        path,
        [
            helper.make_node("Mul", ["image", "two"], ["scaled"]),
            helper.make_node("Add", ["tokens", "one"], ["next"]),
        ],
        [
            helper.make_tensor_value_info("image", f16, [1, 3, "h", "w"]),
            helper.make_tensor_value_info("tokens", i64, [1, "t"]),
        ],
        [
            helper.make_tensor_value_info("scaled", f16, [1, 3, "h", "w"]),
            helper.make_tensor_value_info("next", i64, [1, "t"]),
        ],
        [
            numpy_helper.from_array(np.array(2, np.float16), "two"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
        ],
    )


def _name(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}-{'x'.join(map(str, shape))}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("shm-models")
    paths = {_name(d, s): _elementwise(root / f"{_name(d, s)}.onnx", d, s) for d in CASES for s in SHAPES}
    paths["two"] = _two_inputs(root / "two.onnx")
    return paths


def _start(root: Path, models: dict[str, Path], **limits: object) -> InferenceServer:
    http = HttpLimits(max_body_bytes=LIMIT, request_timeout_s=2.0)
    srv = InferenceServer(root / "agent.sock", limits=ServerLimits(http=http, **limits))  # type: ignore[arg-type]
    for name, path in models.items():
        srv.activate(ServedModel(name, load_model(path, "onnxruntime", ORT), name, "1.0.0"))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):  # type: ignore[no-untyped-def]
    srv = _start(tmp_path_factory.mktemp("shm"), models)
    yield srv
    srv.close()


def _bare(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _random(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100) - 3, shape).astype(dtype)


@pytest.mark.parametrize("dtype", list(CASES))
def test_shared_memory_outputs_equal_the_bare_runtime(server, models, dtype: str) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path, shm_min_bytes=0) as client:
        for shape in SHAPES:
            name = _name(dtype, shape)
            x = _random(dtype, shape)
            got = client.predict(x, model=name)
            assert client.shm_offered is True
            (want,) = _bare(models[name], {"x": x})
            assert got.output.dtype == want.dtype and got.output.shape == want.shape
            assert got.output.tobytes() == want.tobytes()  # bit for bit
            # a non-contiguous input is written into the memfd in C order
            strided = np.asfortranarray(x)
            assert client.predict(strided, model=name).output.tobytes() == want.tobytes()


def test_multi_input_requests_through_shared_memory(server, models) -> None:  # type: ignore[no-untyped-def]
    image = _random("float16", (1, 3, 33, 35))  # 6930 bytes: padded to 8 before the next array
    tokens = _random("int64", (1, 9))
    want = _bare(models["two"], {"image": image, "tokens": tokens})
    with Client(server.socket_path, shm_min_bytes=0) as client:
        for _ in range(3):  # the same memfd again, then bigger inputs in a new one
            got = client.predict({"image": image, "tokens": tokens}, model="two")
            assert list(got.outputs) == ["scaled", "next"]
            assert [o.tobytes() for o in got.outputs.values()] == [w.tobytes() for w in want]
        big = _random("float16", (1, 3, 700, 700))  # 2.9 MB: the client grows its buffer
        got = client.predict({"tokens": tokens, "image": big}, model="two")
        assert (
            got.outputs["scaled"].tobytes()
            == _bare(models["two"], {"image": big, "tokens": tokens})[0].tobytes()
        )
        assert client.shm_offered is True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_leaks_after_200_requests(server) -> None:  # type: ignore[no-untyped-def]
    x = _random("float32", (1, 3, 64, 64))
    before = _open_fds()
    with Client(server.socket_path, shm_min_bytes=0) as client:
        client.predict(x, model="float32-1x3x64x64")
        steady = _open_fds()  # the connection, the client's memfd and the mappings' own references
        for i in range(200):
            if i % 50 == 49:  # a hostile frame now and then: its descriptor is closed too
                reply = _raw_shm(client, _memfd(16))
                assert reply[0] == 400
            client.predict(x, model="float32-1x3x64x64")
        assert _open_fds() == steady
    deadline = time.monotonic() + 5
    while _open_fds() != before and time.monotonic() < deadline:  # the server's thread ends the connection
        time.sleep(0.02)
    assert _open_fds() == before


# -- hostile descriptors ----------------------------------------------------------------------


def _memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


HEAD = frames.pack_str("float32-1x3x64x64") + b"\x01" + frames.pack_str("") + frames.pack_str("<f4")
HEAD += b"\x04" + struct.pack("<4I", 1, 3, 64, 64)
HEAD += bytes(-(8 + len(HEAD)) % 8)
SHM_FRAME = frames.FRAME.pack(4 + len(HEAD), frames.PREDICT, frames.FLAG_SHM, len(HEAD)) + HEAD


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack_from("<I", buf)[0]:
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection"
        buf += chunk
    _, status, head_len = frames.REPLY.unpack_from(buf)
    return status, buf[8 + head_len :]


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _raw_shm(client: Client, fd: int, frame: bytes = SHM_FRAME) -> tuple[int, bytes]:
    """``frame`` with ``fd`` on the client's negotiated connection; the fd is closed here."""
    sock = client._sock
    assert sock is not None
    try:
        _send(sock, frame, [fd])
    finally:
        os.close(fd)
    return _reply(sock)


def _negotiated(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(frames.PREFACE + frames.encode_options())
    status, body = _reply(sock)
    assert status == 200 and json.loads(body[body.index(b"{") :])["shm"] == {"max_bytes": LIMIT}
    return sock


def _predict_ok(sock: socket.socket) -> None:
    x = np.ones((1, 3, 64, 64), np.float32)
    sock.sendall(frames.encode_predict("float32-1x3x64x64", [""], [x], False))
    status, _ = _reply(sock)
    assert status == 200


def _pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _file_fd(tmp: Path) -> int:
    path = tmp / "plain.bin"
    path.write_bytes(bytes(1 << 16))
    return os.open(path, os.O_RDONLY)


HOSTILE = [
    ("declared larger than the memfd", lambda t: [_memfd(1000)], SHM_FRAME, 400, "the memfd is 1000 bytes"),
    ("a pipe", lambda t: [_pipe_fd()], SHM_FRAME, 400, "not shared memory"),
    ("a plain file", lambda t: [_file_fd(t)], SHM_FRAME, 400, "not shared memory"),
    ("an unsealed memfd", lambda t: [_memfd(1 << 16, 0)], SHM_FRAME, 400, "sealed against shrinking"),
    ("two descriptors", lambda t: [_memfd(1 << 16), _memfd(1 << 16)], SHM_FRAME, 400, "exactly one"),
    (
        "no descriptor (closed before sending)",
        lambda t: [],
        SHM_FRAME,
        400,
        "exactly one file descriptor, not 0",
    ),
    (
        "a descriptor with a plain frame",
        lambda t: [_memfd(1 << 16)],
        frames.encode_predict("float32-1x3x64x64", [""], [np.ones((1, 3, 64, 64), np.float32)], False),
        400,
        "does not use shared memory",
    ),
    (
        "data after a shared-memory head",
        lambda t: [_memfd(1 << 16)],
        frames.FRAME.pack(12 + len(HEAD), frames.PREDICT, frames.FLAG_SHM, len(HEAD)) + HEAD + bytes(8),
        400,
        "carries no data",
    ),
    (
        "a huge declared size",
        lambda t: [_memfd(1 << 16)],
        SHM_FRAME.replace(struct.pack("<4I", 1, 3, 64, 64), struct.pack("<4I", 1, 3, 60000, 60000)),
        413,
        "the limit is",
    ),
]


@pytest.mark.parametrize(
    ("case", "make_fds", "frame", "status", "words"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_descriptors_get_one_line_errors_and_serving_goes_on(  # type: ignore[no-untyped-def]
    server, tmp_path, case, make_fds, frame, status, words
) -> None:
    before = _open_fds()
    with _negotiated(server.socket_path) as sock:
        fds = make_fds(tmp_path)
        try:
            _send(sock, frame, fds)
        finally:
            for fd in fds:
                os.close(fd)
        got, body = _reply(sock)
        error = json.loads(body)["error"]
        assert got == status and words in error["message"] and "\n" not in error["message"], error
        _predict_ok(sock)  # the same connection and model go on
    with Client(server.socket_path, shm_min_bytes=0) as client:  # and so do others
        x = _random("float32", (1, 3, 64, 64))
        assert (
            client.predict(x, model="float32-1x3x64x64").output.tobytes() == (x * np.float32(0.5)).tobytes()
        )
    deadline = time.monotonic() + 5
    while _open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _open_fds() == before


def test_a_closed_descriptor_cannot_be_sent(server) -> None:  # type: ignore[no-untyped-def]
    with _negotiated(server.socket_path) as sock:
        fd = _memfd(1 << 16)
        os.close(fd)
        with pytest.raises(OSError):  # EBADF on the sender's side: nothing reaches the server
            _send(sock, SHM_FRAME, [fd])
        _predict_ok(sock)


def test_shared_memory_before_options_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        fd = _memfd(1 << 16)
        try:
            _send(sock, frames.PREFACE + SHM_FRAME, [fd])  # the kernel closes the fd: not negotiated
        finally:
            os.close(fd)
        status, body = _reply(sock)
        assert status == 400 and "options frame" in json.loads(body)["error"]["message"]
        _predict_ok(sock)


# -- fallback ---------------------------------------------------------------------------------


def _check_plain_fallback(path: Path) -> None:
    x = _random("float32", (1, 3, 64, 64))
    with Client(path, shm_min_bytes=0) as client:
        for _ in range(2):
            assert (
                client.predict(x, model="float32-1x3x64x64").output.tobytes()
                == (x * np.float32(0.5)).tobytes()
            )
        assert client.shm_offered is False and client._shm is None


def test_fallback_when_the_agent_turns_shared_memory_off(tmp_path, models) -> None:  # type: ignore[no-untyped-def]
    srv = _start(tmp_path, {"float32-1x3x64x64": models["float32-1x3x64x64"]}, shared_memory=False)
    try:
        _check_plain_fallback(srv.socket_path)
    finally:
        srv.close()


def test_fallback_for_another_user_and_for_an_older_agent(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import edgeagent.serving.endpoints as endpoints

    monkeypatch.setattr(endpoints, "peer_uid", lambda sock: os.geteuid() + 1)
    _check_plain_fallback(server.socket_path)
    monkeypatch.undo()
    monkeypatch.setattr(endpoints, "OPTIONS", 250)  # an agent that predates the options frame: 400 bad_frame
    _check_plain_fallback(server.socket_path)


def test_small_inputs_stay_on_the_socket(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path) as client:  # default threshold: 16 KiB here is below it
        x = _random("float32", (1, 3, 64, 64))
        client.predict(x, model="float32-1x3x64x64")
        assert client.shm_offered is None and client._shm is None


def test_descriptors_sent_with_every_piece_of_a_frame_are_bounded_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((1, 3, 64, 64), np.float32)
    frame = frames.encode_predict("float32-1x3x64x64", [""], [x], False)
    before = _open_fds()
    with _negotiated(server.socket_path) as sock:
        step = len(frame) // 10 + 1
        for start in range(0, len(frame), step):  # 10 pieces, two descriptors with each
            if start + step >= len(frame):  # before the last piece: the server holds at most MAX_FDS
                assert _open_fds() <= before + 2 + sockets.MAX_FDS  # + the two ends of the connection
            fds = [_memfd(4096), _memfd(4096)]
            try:
                _send(sock, frame[start : start + step], fds)
            finally:
                for fd in fds:
                    os.close(fd)
            time.sleep(0.02)  # separate reads on the server
        status, body = _reply(sock)
        assert status == 400 and "does not use shared memory" in json.loads(body)["error"]["message"]
        _predict_ok(sock)
    deadline = time.monotonic() + 5
    while _open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _open_fds() == before
