"""Online accuracy: ``POST /v1/feedback`` through a real server running the digits MLP in ONNX
Runtime, the counts in the stats interval, every refusal, eviction, concurrency, and the CLI."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeagent.cli.agent import COMMANDS, DESCRIPTION
from edgeagent.cli.common import build_parser, run
from edgeagent.client import Client
from edgeagent.errors import RequestFailed
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.serving import InferenceServer, ServedModel

ORT = LoadOptions("CPUExecutionProvider", threads=1)
CAPACITY = 64


def _regression_model(path: Path) -> Path:
    """A real ONNX model whose output is (batch, 1): a sum, not class scores."""
    from onnx import TensorProto, helper, numpy_helper

    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1)],
        "sum",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def server(tmp_path: Path, model_dir: Path):  # type: ignore[no-untyped-def]
    """'digits' (mlp.onnx, default) and 'sum' (not a classifier); a small ring of recent ids."""
    srv = InferenceServer(tmp_path / "agent.sock", recent_capacity=CAPACITY)
    srv.activate(
        ServedModel("digits", load_model(model_dir / "mlp.onnx", "onnxruntime", ORT), "digits", "1.0.0")
    )
    summing = load_model(_regression_model(tmp_path / "sum.onnx"), "onnxruntime", ORT)
    srv.activate(ServedModel("sum", summing, "sum", "0.1.0"))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def samples(digits) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    return digits.x_test[:40].reshape(40, 64).astype(np.float32), digits.y_test[:40].astype(int)


def test_labels_are_checked_against_the_prediction_and_counted(server, samples) -> None:  # type: ignore[no-untyped-def]
    x, y = samples
    key = server.served()["digits"].key
    server.stats.snapshot(reset=True)
    expected = []
    with Client(server.socket_path) as client:
        for i in range(len(x)):
            result = client.predict(x[i : i + 1])
            predicted = int(result.output.argmax())
            label = int(y[i]) if i % 4 else (int(y[i]) + 1) % 10  # every 4th label disagrees
            reply = client.feedback(result.id, label)
            assert reply == {
                "id": result.id,
                "model": "digits",
                "version": "1.0.0",
                "correct": [predicted == label],
                "labelled": 1,
            }
            expected.append(predicted == label)
        stats = server.stats.snapshot()[key]
        assert stats.labelled == len(x) and stats.correct == sum(expected)
        assert 0 < stats.correct < stats.labelled  # both kinds were counted
        # predicted classes of every served sample, counted when the reply went out
        assert sum(stats.predicted.values()) == len(x)
        row = next(r for r in client.stats()["stats"] if r["model"] == "digits")
    assert row["labelled"] == len(x) and row["correct"] == sum(expected)
    assert row["accuracy"] == round(sum(expected) / len(x), 4)
    assert sum(row["predicted"].values()) == len(x) and all(k.isdigit() for k in row["predicted"])


def test_batch_feedback_takes_one_label_per_sample(server, samples) -> None:  # type: ignore[no-untyped-def]
    x, y = samples
    with Client(server.socket_path) as client:
        result = client.predict(x[:5])
        top1 = result.output.argmax(1)
        labels = [int(v) for v in y[:5]]
        reply = client.feedback(result.id, np.asarray(labels))
        assert reply["correct"] == [bool(p == v) for p, v in zip(top1, labels, strict=True)]
        assert reply["labelled"] == 5
        assert server.stats.snapshot()[server.served()["digits"].key].predicted  # batch top-1s counted too
        with pytest.raises(RequestFailed) as info:
            client.feedback(client.predict(x[:3]).id, [1, 2])
        assert (info.value.status, info.value.code) == (422, "label_count")
        with pytest.raises(RequestFailed) as info:
            client.feedback(client.predict(x[:3]).id, 1)  # a scalar is one label
        assert (info.value.status, info.value.code) == (422, "label_count")


def _post(path: Path, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:  # type: ignore[type-arg]
    with Client(path, framed=False) as client:  # the HTTP path, as curl sends it
        status, _, payload = client._request("POST", "/v1/feedback", body, content_type)
    return status, json.loads(payload)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "bad_body"),
        (b"[1, 2]", 400, "bad_body"),
        (b'{"id": "x"}', 400, "bad_body"),
        (b'{"label": 1}', 400, "bad_body"),
        (b'{"id": 7, "label": 1}', 400, "bad_body"),
        (b'{"id": "ID", "label": 1, "extra": 0}', 400, "bad_body"),
        (b'{"id": "ID", "label": true}', 400, "bad_body"),
        (b'{"id": "ID", "label": 1.0}', 400, "bad_body"),
        (b'{"id": "ID", "label": []}', 400, "bad_body"),
        (b'{"id": "ID", "label": [1, "2"]}', 400, "bad_body"),
        (b'{"id": "ID", "label": 10}', 422, "bad_label"),
        (b'{"id": "ID", "label": -1}', 422, "bad_label"),
        (b'{"id": "ID", "label": [1, 2]}', 422, "label_count"),
        (b'{"id": "SUM", "label": 0}', 422, "not_classification"),
        (b'{"id": "nope", "label": 1}', 404, "unknown_prediction"),
        (b'{"id": "PREFIX-ffff", "label": 1}', 404, "unknown_prediction"),
        (b'{"id": "PREFIX-0x1", "label": 1}', 404, "unknown_prediction"),
    ],
)
def test_refused_feedback_gets_a_one_line_reason(server, body, status, code) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path) as client:
        pid = client.predict(np.zeros((1, 64), np.float32)).id
        summed = client.predict(np.ones((1, 64), np.float32), model="sum").id
    body = body.replace(b"PREFIX", pid.split("-")[0].encode()).replace(b'"ID"', json.dumps(pid).encode())
    got, doc = _post(server.socket_path, body.replace(b'"SUM"', json.dumps(summed).encode()))
    assert (got, doc["error"]["code"]) == (status, code)
    assert doc["error"]["message"] and "\n" not in doc["error"]["message"]
    assert server.stats.snapshot()[server.served()["digits"].key].labelled == 0  # nothing was counted


def test_feedback_needs_post_and_json(server) -> None:  # type: ignore[no-untyped-def]
    assert _post(server.socket_path, b"{}", "text/plain")[0] == 415
    with Client(server.socket_path) as client:
        status, _, payload = client._request("GET", "/v1/feedback", b"", None)
    assert status == 405 and json.loads(payload)["error"]["code"] == "method_not_allowed"


def test_a_second_label_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path) as client:
        pid = client.predict(np.zeros((1, 64), np.float32)).id
        client.feedback(pid, 3)
        with pytest.raises(RequestFailed) as info:
            client.feedback(pid, 3)
    assert (info.value.status, info.value.code) == (409, "already_labelled")
    assert server.stats.snapshot()[server.served()["digits"].key].labelled == 1


def test_evicted_and_never_issued_ids_say_which(server) -> None:  # type: ignore[no-untyped-def]
    zeros = np.zeros((1, 64), np.float32)
    with Client(server.socket_path) as client:
        first = client.predict(zeros).id
        for _ in range(CAPACITY):
            client.predict(zeros)
        with pytest.raises(RequestFailed, match="evicted") as info:
            client.feedback(first, 0)
        assert (info.value.status, info.value.code) == (404, "unknown_prediction")
        assert f"last {CAPACITY} predictions" in str(info.value)
        with pytest.raises(RequestFailed, match="not issued by this agent process") as info:
            client.feedback("0badc0de-1", 0)
        assert info.value.status == 404
        recent = client.stats()["recent_predictions"]
    assert recent == {"size": CAPACITY, "capacity": CAPACITY, "evicted": 1}


def test_labels_count_in_the_interval_they_arrive_under_the_version_that_predicted(  # type: ignore[no-untyped-def]
    server, model_dir, samples
) -> None:
    x, y = samples
    with Client(server.socket_path) as client:
        old = client.predict(x[:1])
        client.health()  # latency is recorded just after a reply: the next request on the connection sees it
        old_key = server.served()["digits"].key
        new_model = load_model(model_dir / "mlp.onnx", "onnxruntime", ORT)
        server.activate(ServedModel("digits", new_model, "digits", "1.1.0"))
        before = server.stats.snapshot(reset=True)
        assert before[old_key].labelled == 0 and before[old_key].latency.count >= 1
        client.feedback(old.id, int(y[0]))  # the label arrives after the swap and the interval reset
    after = server.stats.snapshot(reset=True)
    assert after[old_key].labelled == 1 and after[old_key].latency.count == 0
    assert all(k.version == "1.0.0" for k, s in after.items() if s.labelled)


def test_concurrent_feedback_counts_each_label_once(server, samples) -> None:  # type: ignore[no-untyped-def]
    x, y = samples
    with Client(server.socket_path) as client:
        ids = [client.predict(x[i : i + 1]).id for i in range(len(x))]
    outcomes: list[int] = []
    lock = threading.Lock()

    def worker() -> None:  # every worker labels every id; exactly one of them may win each
        with Client(server.socket_path) as c:
            for i, pid in enumerate(ids):
                try:
                    c.feedback(pid, int(y[i]))
                    status = 200
                except RequestFailed as exc:
                    status = exc.status
                with lock:
                    outcomes.append(status)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(set(outcomes)) == [200, 409]
    assert outcomes.count(200) == len(ids) and len(outcomes) == 6 * len(ids)
    assert server.stats.snapshot()[server.served()["digits"].key].labelled == len(ids)


def test_infer_prints_the_id_and_feedback_takes_it(server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    def edgeagent(*argv: str | Path) -> int:
        return run(build_parser("edgeagent", DESCRIPTION, COMMANDS), [str(a) for a in argv])

    sample = tmp_path / "x.npy"
    np.save(sample, np.zeros((2, 64), np.float32))
    assert edgeagent("infer", "--socket", server.socket_path, "--input", sample) == 0
    reply = json.loads(capsys.readouterr().out)
    top1 = np.asarray(reply["outputs"]["logits"]).argmax(1).tolist()
    assert edgeagent("feedback", "--socket", server.socket_path, reply["id"], *map(str, top1)) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == [True, True]
    assert edgeagent("feedback", "--socket", server.socket_path, reply["id"], "1", "2") == 1
    err = capsys.readouterr().err
    assert "HTTP 409 already_labelled" in err and err.count("\n") == 1


def test_raw_http_feedback_as_curl_sends_it(server) -> None:  # type: ignore[no-untyped-def]
    with Client(server.socket_path) as client:
        pid = client.predict(np.zeros((1, 64), np.float32)).id
    body = json.dumps({"id": pid, "label": [0]}).encode()
    request = (
        b"POST /v1/feedback HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["labelled"] == 1
