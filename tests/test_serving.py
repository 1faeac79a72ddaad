"""The local inference server over a real Unix socket, with real bundles, runtimes and clients:
acceptance through the server for every fixture model, the protocol, and hostile input."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.profile import load_profile
from edgeagent.client import Client
from edgeagent.errors import AcceptanceFailed, RequestFailed, ServerUnreachable, UsageError
from edgeagent.serving import InferenceServer, ServedModel
from edgeagent.serving.http import HttpLimits
from edgeagent.serving.loader import prepare_served_model
from edgeagent.serving.protocol import decode_npy, encode_npy
from edgeagent.serving.server import ServerLimits
from tests.runtimes_support import extract, golden_arrays, make_bundle, write_golden

CANDIDATES = list(load_profile("generic-x86_64").candidates)


@pytest.fixture(scope="module")
def goldens(digits, model_dir):  # type: ignore[no-untyped-def]
    return {
        "mlp": golden_arrays(digits, model_dir, images=False),
        "cnn": golden_arrays(digits, model_dir, images=True),
    }


def _serve_bundle(tmp: Path, keypair, model: Path, golden: dict, **kw) -> ServedModel:  # type: ignore[no-untyped-def, type-arg]
    tmp.mkdir(parents=True, exist_ok=True)
    created = make_bundle(tmp / "out", keypair, [model], write_golden(tmp / "golden.npz", golden), **kw)
    verified = extract(created, tmp / "bundle", keypair)
    return prepare_served_model(
        tmp / "bundle", verified.manifest, CANDIDATES, profile="generic-x86_64", bundle_sha256=verified.sha256
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, keypair, model_dir, goldens):  # type: ignore[no-untyped-def]
    """Two served models: 'digits' (mlp.onnx, the default) and 'digits-int8' (mlp_int8.tflite)."""
    root = tmp_path_factory.mktemp("serving")
    limits = ServerLimits(http=HttpLimits(max_body_bytes=1 << 20, max_head_bytes=4096, request_timeout_s=0.5))
    srv = InferenceServer(root / "s" / "agent.sock", limits=limits)
    srv.activate(_serve_bundle(root / "a", keypair, model_dir / "mlp.onnx", goldens["mlp"]))
    int8 = _serve_bundle(
        root / "b", keypair, model_dir / "mlp_int8.tflite", goldens["mlp"], name="digits-int8"
    )
    srv.activate(int8)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def client(server):  # type: ignore[no-untyped-def]
    with Client(server.socket_path, timeout_s=10) as c:
        yield c


@pytest.mark.parametrize(
    ("file", "kind", "runtime", "precision"),
    [
        ("mlp.onnx", "mlp", "onnxruntime", "fp32"),
        ("cnn.onnx", "cnn", "onnxruntime", "fp32"),
        ("mlp.tflite", "mlp", "litert", "fp32"),
        ("cnn.tflite", "cnn", "litert", "fp32"),
        ("mlp_int8.tflite", "mlp", "litert", "int8"),
        ("cnn_int8.tflite", "cnn", "litert", "int8"),
    ],
)
def test_fixture_models_pass_acceptance_and_serve_it(  # type: ignore[no-untyped-def]
    tmp_path: Path, keypair, model_dir, goldens, file, kind, runtime, precision
) -> None:
    golden = goldens[kind]
    served = _serve_bundle(tmp_path, keypair, model_dir / file, golden)
    assert served.verdict is not None and served.verdict.passed
    assert (served.model.runtime, served.model.precision) == (runtime, precision)
    with InferenceServer(tmp_path / "agent.sock") as srv:
        srv.activate(served)
        with Client(srv.socket_path) as client:
            outputs = np.concatenate([client.predict(x[None]).output for x in golden["inputs"]])
    predicted = outputs.argmax(1)
    assert np.mean(predicted == golden["labels"]) >= 0.9
    assert np.mean(predicted == golden["reference"].argmax(1)) >= 0.9


def test_a_bundle_that_misses_its_gate_is_refused(tmp_path: Path, keypair, model_dir, goldens) -> None:  # type: ignore[no-untyped-def]
    from edgeagent.bundle import AcceptanceGate

    with pytest.raises(AcceptanceFailed, match=r"failed acceptance: tolerance_ratio") as info:
        _serve_bundle(
            tmp_path, keypair, model_dir / "mlp_int8.tflite", goldens["mlp"], gate=AcceptanceGate(atol=1e-6)
        )
    assert not info.value.verdict.passed  # type: ignore[attr-defined]


def test_npy_json_and_npz_bodies_agree(client, goldens) -> None:  # type: ignore[no-untyped-def]
    x = goldens["mlp"]["inputs"][:3]
    binary = client.predict(x)
    as_json = client.predict(x, binary=False)
    named = client.predict({"input": x})
    assert list(binary.outputs) == list(as_json.outputs) == list(named.outputs) == ["logits"]
    np.testing.assert_allclose(binary.output, as_json.output, rtol=1e-6)
    np.testing.assert_allclose(binary.output, named.output, rtol=1e-6)
    np.testing.assert_allclose(binary.output, goldens["mlp"]["reference"][:3], atol=1e-5)
    assert (binary.model, binary.version, binary.runtime) == ("digits", "1.0.0", "onnxruntime")
    assert len({binary.id, as_json.id, named.id}) == 3
    assert binary.latency_ms > 0


def test_named_models_and_raw_quantized_io(client, goldens) -> None:  # type: ignore[no-untyped-def]
    x = goldens["mlp"]["inputs"][:2]
    result = client.predict(x, model="digits-int8")
    assert (result.model, result.runtime, result.delegate) == ("digits-int8", "litert", "xnnpack")
    assert result.output.dtype == np.float32
    raw = client.predict(np.zeros((1, 64), np.int8), model="digits-int8", raw=True)
    assert raw.output.dtype == np.int8
    with pytest.raises(RequestFailed) as info:
        client.predict(x, model="digits-int8", raw=True)  # floats are not raw int8
    assert (info.value.status, info.value.code) == (422, "bad_dtype")


def test_models_health_and_stats(client, server) -> None:  # type: ignore[no-untyped-def]
    client.predict(np.zeros((1, 64), np.float32))
    models = client.models()
    assert models["default"] == "digits"
    by_name = {m["name"]: m for m in models["models"]}
    digits = by_name["digits"]
    assert digits["version"] == "1.0.0" and len(digits["bundle_sha256"]) == 64
    assert digits["inputs"][0] == {
        "name": "input",
        "shape": [None, 64],
        "dtype": "float32",
        "quantization": None,
    }
    assert digits["decision"]["chosen"]["candidate"] == "onnxruntime/CPUExecutionProvider/fp32"
    assert digits["acceptance"]["passed"] is True
    assert by_name["digits-int8"]["inputs"][0]["quantization"]["zero_point"] == [-128]
    health = client.health()
    assert health == {
        "status": "ok",
        "default": "digits",
        "models": {"digits": "1.0.0", "digits-int8": "1.0.0"},
    }
    stats = client.stats()
    row = next(r for r in stats["stats"] if r["model"] == "digits")
    assert row["runtime"] == "onnxruntime" and row["delegate"] == "CPUExecutionProvider"
    assert row["count"] >= 1 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
    key = server.served()["digits"].key
    assert server.stats.snapshot()[key].latency.count == row["count"]


def test_every_prediction_id_is_recorded_for_feedback(client, server) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros((2, 64), np.float32)
    result = client.predict(x)
    record = server.recent.get(result.id)
    assert record is not None and record.key.model == "digits" and record.key.version == "1.0.0"
    assert record.top1 == tuple(int(i) for i in result.output.argmax(1))


def _raw_exchange(path: Path, data: bytes) -> tuple[int, dict, bytes]:  # type: ignore[type-arg]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split(" ")[1]), headers, body


NPY_BODY = encode_npy(np.zeros((1, 64), np.float32))


def _post(path: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (_post("/v1/predict", b"{not json"), 400, "bad_body"),
        (_post("/v1/predict", b'{"inputs": "hello"}'), 400, "bad_body"),
        (_post("/v1/predict", b'{"inputs": [[1, 2]], "extra": 1}'), 400, "bad_body"),
        (_post("/v1/predict", b'{"inputs": [[1, 2]]}'), 422, "bad_shape"),
        (_post("/v1/predict", b'{"inputs": [[1], [2, 3]]}'), 422, "bad_shape"),
        (_post("/v1/predict", b'{"inputs": {"x": [[1.0]]}}'), 422, "unknown_input"),
        (_post("/v1/predict", NPY_BODY[:-4], "application/x-npy"), 400, "bad_body"),
        (_post("/v1/predict", b"\x93NUMPY garbage", "application/x-npy"), 400, "bad_body"),
        (
            _post("/v1/predict", encode_npy(np.zeros((1, 64), np.complex64)), "application/x-npy"),
            422,
            "bad_dtype",
        ),
        (_post("/v1/predict", b"PK\x03\x04junk", "application/x-npz"), 400, "bad_body"),
        (_post("/v1/predict", b"{}", "text/plain"), 415, "unsupported_media_type"),
        (_post("/v1/predict?raw=maybe", NPY_BODY, "application/x-npy"), 400, "bad_body"),
        (_post("/v1/models/nope/predict", NPY_BODY, "application/x-npy"), 404, "unknown_model"),
        (_post("/v1/nothing", b"{}"), 404, "not_found"),
        (b"GET /v1/predict HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Type: application/json\r\n\r\n", 411, "length_required"),
        (_post("/v1/predict", b"", extra="Transfer-Encoding: chunked\r\n"), 501, "chunked_unsupported"),
        (_post("/v1/predict", b"", extra="Content-Length: 5\r\n"), 400, "bad_header"),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "body_too_large"),
        (b"GET /v1/health HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431, "head_too_large"),
        (b"GARBAGE\r\n\r\n", 400, "bad_request_line"),
        (b"BREW /v1/health HTTP/1.1\r\n\r\n", 501, "bad_method"),
        (b"GET /v1/health HTTP/2.0\r\n\r\n", 505, "bad_version"),
        (b"GET v1/health HTTP/1.1\r\n\r\n", 400, "bad_target"),
        (b"GET /v1/health HTTP/1.1\r\n folded\r\n\r\n", 400, "bad_header"),
        (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 408, "timeout"),
    ],
)
def test_bad_requests_get_a_4xx_reason_and_the_server_keeps_serving(  # type: ignore[no-untyped-def]
    server, client, request_bytes, status, code
) -> None:
    got_status, headers, body = _raw_exchange(server.socket_path, request_bytes)
    assert got_status == status, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
    assert client.health()["status"] == "ok"


def test_keep_alive_and_pipelined_requests(server) -> None:  # type: ignore[no-untyped-def]
    one = _post("/v1/predict", NPY_BODY, "application/x-npy")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(one + one + b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.endswith(b'"digits-int8": "1.0.0"}}')  # the health reply last, then the server closed


def test_concurrent_clients_all_succeed(server, goldens) -> None:  # type: ignore[no-untyped-def]
    x = goldens["mlp"]["inputs"]
    failures: list[BaseException] = []

    def worker(model: str | None) -> None:
        try:
            with Client(server.socket_path) as c:
                for i in range(40):
                    out = c.predict(x[i : i + 1], model=model)
                    if out.output.shape != (1, 10):
                        raise AssertionError(out.output.shape)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=("digits-int8" if i % 2 else None,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []


def test_in_process_api_is_timed_like_a_request(server) -> None:  # type: ignore[no-untyped-def]
    before = server.stats.snapshot()[server.served()["digits"].key].latency.count
    result = server.predict(np.zeros((1, 64), np.float32))
    assert result.served.name == "digits" and result.outputs[0].shape == (1, 10)
    assert server.stats.snapshot()[server.served()["digits"].key].latency.count == before + 1
    with pytest.raises(UsageError, match="no model named"):
        server.predict(np.zeros((1, 64), np.float32), model="nope")


def test_client_errors_name_the_socket(tmp_path: Path) -> None:
    with pytest.raises(ServerUnreachable, match="cannot connect"), Client(tmp_path / "none.sock") as c:
        c.health()


def test_socket_file_rules(tmp_path: Path, server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="in use by a running server"):
        InferenceServer(server.socket_path).start()
    plain = tmp_path / "file.sock"
    plain.write_text("x")
    with pytest.raises(UsageError, match="not a socket"):
        InferenceServer(plain).start()
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a killed server leaves it
    with InferenceServer(stale) as srv, Client(stale) as c:
        assert c.health()["status"] == "no_models"
        assert srv.state.value == "serving"
    assert not stale.exists()


def test_npy_codec_round_trip() -> None:
    for array in (np.arange(6, dtype=np.int8).reshape(2, 3), np.zeros((0, 4), np.float32), np.float64(2.5)):
        back = decode_npy(encode_npy(np.asarray(array)))
        assert back.dtype == np.asarray(array).dtype and back.shape == np.asarray(array).shape
        np.testing.assert_array_equal(back, array)
    import io

    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    np.testing.assert_array_equal(decode_npy(buf.getvalue()), np.arange(6).reshape(2, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda line, headers, body: line + headers + b"\r\n\r\n" + body,
            st.sampled_from(
                [b"POST /v1/predict HTTP/1.1\r\n", b"GET /v1/models HTTP/1.1\r\n", b"POST / HTTP/1.0\r\n"]
            ),
            st.binary(max_size=200),
            st.binary(max_size=200),
        ),
    )
)
def test_random_bytes_never_stop_the_server(server, junk: bytes) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(server.socket_path))
        sock.sendall(junk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
    with Client(server.socket_path) as c:
        assert c.health()["status"] == "ok"
