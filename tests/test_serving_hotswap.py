"""Hot swap: concurrent clients (framed and HTTP, binary and JSON) through 20 activations
(ORT <-> LiteRT, new versions, a rollback) with zero failed requests; old models close only
when their last request ends."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edgeagent.client import Client
from edgeagent.runtimes import LoadedModel, LoadOptions, load_model
from edgeagent.serving import InferenceServer, ServedModel
from edgeagent.serving.slots import ModelSlot

SWAPS = 20
CLIENTS = 4


def _load(model_dir: Path, i: int) -> LoadedModel:
    if i % 2:
        return load_model(
            model_dir / "mlp_int8.tflite", "litert", LoadOptions("xnnpack", threads=1), precision="int8"
        )
    return load_model(model_dir / "mlp.onnx", "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))


def _closed(model: LoadedModel) -> bool:
    session = model.session
    return getattr(session, "_session", None) is None and getattr(session, "_interpreter", None) is None


def test_twenty_swaps_under_load_fail_no_request(tmp_path: Path, model_dir: Path, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.x_test[:50].reshape(50, 64).astype(np.float32)
    labels = digits.y_test[:50]
    server = InferenceServer(tmp_path / "agent.sock")
    first = ServedModel("digits", _load(model_dir, 0), "digits", "1.0.0")
    server.activate(first)
    server.start()
    stop = threading.Event()
    failures: list[BaseException] = []
    versions_seen: set[str] = set()
    answered = [0] * CLIENTS
    correct = [0] * CLIENTS

    def client_loop(index: int) -> None:
        try:
            # frames and HTTP/1.1, each with binary and JSON bodies
            with Client(server.socket_path, framed=index < 2) as client:
                i = 0
                while not stop.is_set():
                    result = client.predict(x[i % 50 : i % 50 + 1], binary=bool(index % 2))
                    versions_seen.add(result.version)
                    answered[index] += 1
                    correct[index] += int(result.output.argmax() == labels[i % 50])
                    i += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    activated = [first]
    try:
        for swap in range(1, SWAPS + 1):
            before = sum(answered)
            # Each model serves some requests before the next swap replaces it.
            while sum(answered) < before + 10 and not failures:
                threading.Event().wait(0.002)
            if swap == SWAPS:  # the last activation is a rollback to the first version's artifact
                served = ServedModel("digits", _load(model_dir, 0), "digits", "1.0.0")
            else:
                served = ServedModel("digits", _load(model_dir, swap), "digits", f"1.0.{swap}")
            replaced = server.activate(served)
            assert replaced is activated[-1]
            activated.append(served)
        before = sum(answered)
        while sum(answered) < before + 10 and not failures:
            threading.Event().wait(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.close()
    assert failures == []
    assert sum(answered) >= 10 * (SWAPS + 1)
    assert sum(correct) / sum(answered) > 0.9  # every model that answered answered correctly
    assert len(versions_seen) > SWAPS // 2  # requests really went to the new models
    assert all(
        _closed(s.model) for s in activated
    )  # every replaced model was closed (and the last by close())


def test_a_replaced_model_closes_only_when_its_last_request_ends(model_dir: Path) -> None:
    slot = ModelSlot("digits")
    old = ServedModel("digits", _load(model_dir, 0), "digits", "1.0.0")
    new = ServedModel("digits", _load(model_dir, 1), "digits", "1.1.0")
    slot.swap(old)
    in_flight = slot.acquire()
    assert in_flight is not None and in_flight.served is old
    assert slot.swap(new) is old
    assert not _closed(old.model)  # a request still runs on it
    assert old.model.predict(np.zeros((1, 64), np.float32))[0].shape == (1, 10)
    later = slot.acquire()
    assert later is not None and later.served is new  # new requests see the new model at once
    slot.release(in_flight)
    assert _closed(old.model)  # closed by the last release
    slot.release(later)
    assert not _closed(new.model)
    slot.swap(None)  # deactivate: idle, so closed at once
    assert _closed(new.model)
    assert slot.acquire() is None


@pytest.mark.parametrize("default", [True, False])
def test_default_model_routing_through_swaps(tmp_path: Path, model_dir: Path, default: bool) -> None:
    with InferenceServer(tmp_path / "s.sock") as server, Client(server.socket_path) as client:
        server.activate(ServedModel("a", _load(model_dir, 0), "a", "1.0.0"))
        server.activate(ServedModel("b", _load(model_dir, 1), "b", "2.0.0"), default=default)
        zeros = np.zeros((1, 64), np.float32)
        assert client.predict(zeros).model == ("b" if default else "a")
        server.deactivate("b" if default else "a")
        assert client.predict(zeros).model == ("a" if default else "b")  # the remaining one
