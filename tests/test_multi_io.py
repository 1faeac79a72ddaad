"""Named, typed inputs and several outputs on the device side: the golden set, bundle create,
acceptance, `edgeagent serve`/`infer` and every wire format, on real ONNX Runtime sessions of
generated models (an int32 token model with a mask, a two-output model with a scalar input)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeagent.acceptance import run_acceptance
from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.golden import GoldenSet, load_golden, save_golden
from edgeagent.client import Client
from edgeagent.errors import InputError, RequestFailed, UsageError
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.serving import InferenceServer
from edgeagent.serving.loader import prepare_served_model
from tests.multi_io_models import ort_outputs, token_data, token_model, two_output_model
from tests.runtimes_support import extract, make_bundle, wait_for
from tests.test_serving_cli import edgeagent

CANDIDATES_PROFILE = "generic-x86_64"


def _golden(path: Path, model: Path, feeds: dict[str, np.ndarray], **scalars: float) -> Path:
    """A golden set of ``feeds`` with every output of ``model`` as reference (bare ORT)."""
    run_feeds = {**feeds, **{k: np.asarray(v, np.float32) for k, v in scalars.items()}}
    reference = ort_outputs(model, run_feeds)
    inputs = {
        **feeds,
        **{k: np.full(len(next(iter(feeds.values()))), v, np.float32) for k, v in scalars.items()},
    }
    first = next(iter(reference.values()))
    save_golden(path, GoldenSet(inputs, first.argmax(1).astype(np.int64), reference))
    return path


def _ort(path: Path):  # type: ignore[no-untyped-def]
    return load_model(path, "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))


def test_golden_keeps_names_dtypes_and_scalars_and_writes_reproducibly(tmp_path: Path) -> None:
    arrays = {
        "tokens": np.arange(12, dtype=np.int32).reshape(3, 4),
        "ids": np.arange(3, dtype=np.int64),
        "image": np.zeros((3, 2, 2), np.uint8),
        "mask": np.array([[True, False]] * 3),
        "half": np.ones((3, 2), np.float16),
        "rate": np.full(3, 16000, np.int64),  # a scalar input: one value per sample
        "serving_default_x:0": np.ones((3, 1), np.float32),  # names TFLite gives its tensors
    }
    golden = GoldenSet(arrays, np.arange(3), {"logits": np.ones((3, 2), np.float32)})
    save_golden(tmp_path / "a.npz", golden)
    save_golden(tmp_path / "b.npz", golden)
    assert (
        hashlib.sha256((tmp_path / "a.npz").read_bytes()).digest()
        == hashlib.sha256((tmp_path / "b.npz").read_bytes()).digest()
    )
    with np.load(tmp_path / "a.npz") as data:
        assert data.files == [*(f"input.{k}" for k in arrays), "labels", "output.logits"]
    back = load_golden(tmp_path / "a.npz")
    assert list(back.inputs) == list(arrays)
    for name, array in arrays.items():
        assert back.inputs[name].dtype == array.dtype and np.array_equal(back.inputs[name], array)
    assert len(back) == 3


def test_legacy_golden_reads_as_the_only_input_and_first_output(tmp_path: Path) -> None:
    np.savez(tmp_path / "old.npz", inputs=np.ones((2, 4), np.float32), reference=np.ones((2, 3), np.float32))
    golden = load_golden(tmp_path / "old.npz")
    assert list(golden.inputs) == [""] and list(golden.reference) == [""]
    save_golden(tmp_path / "again.npz", golden)
    assert np.load(tmp_path / "again.npz").files == ["inputs", "reference"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"inputs": np.ones((2, 1)), "input.x": np.ones((2, 1))}, "'inputs' is for one-input models"),
        ({"input.x": np.ones((2, 1)), "input.y": np.ones((3, 1))}, "'input.y' has 3 rows"),
        ({"input.x": np.float32(1.0)}, "is a single value"),
        ({"input.x": np.ones((2, 1)), "x": np.ones((2, 1))}, "unknown array 'x'"),
        ({"output.y": np.ones((2, 1))}, "has no inputs"),
    ],
)
def test_golden_layout_errors_are_one_line(tmp_path: Path, arrays, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "g.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError, match=message) as info:
        load_golden(path)
    assert "\n" not in str(info.value)


def test_bundle_create_checks_every_input_name_shape_and_dtype(tmp_path: Path, keypair) -> None:  # type: ignore[no-untyped-def]
    model = token_model(tmp_path / "tokens.onnx")
    data = token_data(10)
    cases = {
        "float tokens": (
            {**data, "tokens": data["tokens"].astype(np.float32)},
            "is float32 but the model takes int32",
        ),
        "no mask": (
            {"tokens": data["tokens"]},
            r"has inputs \['tokens'\] but the model takes \['tokens', 'mask'\]",
        ),
        "short": ({**data, "mask": data["mask"][:, :4]}, "'mask' has sample shape \\[4\\]"),
    }
    for name, (feeds, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        save_golden(path, GoldenSet(feeds))
        with pytest.raises(UsageError, match=message):
            make_bundle(tmp_path / "out", keypair, [model], path, gate=AcceptanceGate())
    legacy = tmp_path / "legacy.npz"
    np.savez(legacy, inputs=data["tokens"])
    with pytest.raises(UsageError, match="but the model takes"):
        make_bundle(tmp_path / "out", keypair, [model], legacy, gate=AcceptanceGate())
    assert not list((tmp_path / "out").glob("*.bundle"))
    # int64 ids fit an int32 input (the device converts them, checking the range)
    wide = tmp_path / "wide.npz"
    save_golden(wide, GoldenSet({k: v.astype(np.int64) for k, v in data.items()}))
    make_bundle(tmp_path / "out", keypair, [model], wide, gate=AcceptanceGate())


def test_acceptance_feeds_every_input_and_compares_every_output(tmp_path: Path) -> None:
    model_path = two_output_model(tmp_path / "two.onnx", scalar_input=True)
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    golden = load_golden(_golden(tmp_path / "g.npz", model_path, {"x": x}, gain=2.0))
    model = _ort(model_path)
    gate = AcceptanceGate(golden="g.npz", min_top1_agreement=1.0, atol=1e-5)
    verdict = run_acceptance(model, gate, golden)
    assert verdict.passed, verdict.reason
    assert [c.name for c in verdict.checks] == [
        "top1_agreement",
        "tolerance_ratio[logits]",
        "tolerance_ratio[embedding]",
    ]
    wrong = dict(golden.reference)
    wrong["embedding"] = wrong["embedding"] + 1.0  # a reference for the second output that the model misses
    verdict = run_acceptance(model, gate, GoldenSet(golden.inputs, golden.labels, wrong))
    assert not verdict.passed and verdict.reason is not None
    assert verdict.reason.startswith("tolerance_ratio[embedding]") and "logits" not in verdict.reason
    model.close()


def test_latency_only_acceptance_feeds_every_input(tmp_path: Path) -> None:
    """The start-up check of `edgeagent serve` without a golden set (it fed only the first input)."""
    model = _ort(token_model(tmp_path / "tokens.onnx"))
    verdict = run_acceptance(model, AcceptanceGate(latency_p95_ms={"*": 1e4}), None)
    assert verdict.passed and verdict.latency.runs > 0
    model.close()


def test_scalar_inputs_take_one_value_for_the_whole_batch(tmp_path: Path) -> None:
    path = two_output_model(tmp_path / "two.onnx", scalar_input=True)
    model = _ort(path)
    x = np.ones((3, 4), np.float32)
    expected = ort_outputs(path, {"x": x, "gain": np.array(3.0, np.float32)})
    for gain in (3.0, np.float32(3.0), [3.0]):
        outputs = model.predict({"x": x, "gain": gain})
        assert np.array_equal(outputs[0], expected["logits"])
    with pytest.raises(InputError, match="'gain' is a scalar"):
        model.predict({"x": x, "gain": [3.0, 3.0]})
    model.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, keypair):  # type: ignore[no-untyped-def]
    """A server with 'tokens' (int32 ids + bool mask) and 'two' (two outputs, a scalar input)."""
    root = tmp_path_factory.mktemp("multi")
    models = {
        "tokens": token_model(root / "tokens.onnx", mask_dtype="bool"),
        "two": two_output_model(root / "two.onnx", scalar_input=True),
    }
    goldens = {
        "tokens": _golden(root / "gt.npz", models["tokens"], token_data(16, mask_dtype="bool")),
        "two": _golden(root / "g2.npz", models["two"], {"x": np.ones((4, 4), np.float32)}, gain=0.5),
    }
    server = InferenceServer(root / "s" / "agent.sock")
    for name, model in models.items():
        created = make_bundle(
            root / name, keypair, [model], goldens[name], name=name, gate=AcceptanceGate(atol=1e-5)
        )
        verified = extract(created, root / name / "bundle", keypair)
        server.activate(_prepare(root / name / "bundle", verified))
    server.start()
    yield server, models
    server.close()


def _prepare(folder: Path, verified):  # type: ignore[no-untyped-def]
    from devices.profile import load_profile

    candidates = list(load_profile(CANDIDATES_PROFILE).candidates)
    return prepare_served_model(folder, verified.manifest, candidates, profile=CANDIDATES_PROFILE)


@pytest.mark.parametrize(("framed", "binary"), [(True, True), (False, True), (True, False)])
def test_served_outputs_equal_bare_onnxruntime(served, framed: bool, binary: bool) -> None:  # type: ignore[no-untyped-def]
    server, models = served
    feeds = token_data(5, seed=7, mask_dtype="bool")
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    with Client(server.socket_path, framed=framed) as client:
        got = client.predict(feeds, model="tokens", binary=binary).outputs
        expected = ort_outputs(models["tokens"], feeds)
        assert list(got) == ["logits"]
        assert got["logits"].dtype == np.float32 and np.array_equal(got["logits"], expected["logits"])
        got = client.predict({"x": x, "gain": np.float32(2.0)}, model="two", binary=binary).outputs
        expected = ort_outputs(models["two"], {"x": x, "gain": np.array(2.0, np.float32)})
        assert list(got) == ["logits", "embedding"]
        for name, array in expected.items():
            assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
        with pytest.raises(RequestFailed, match="bad_dtype"):  # float ids are refused, not truncated
            client.predict({**feeds, "tokens": feeds["tokens"] + 0.5}, model="tokens", binary=binary)


def test_json_takes_booleans_and_bare_scalars(served) -> None:  # type: ignore[no-untyped-def]
    server, models = served
    feeds = token_data(2, seed=9, mask_dtype="bool")
    body = {"inputs": {"tokens": feeds["tokens"].tolist(), "mask": feeds["mask"].tolist()}}
    with Client(server.socket_path, framed=False) as client:
        status, _, payload = client._request(
            "POST", "/v1/models/tokens/predict", json.dumps(body).encode(), "application/json"
        )
        assert status == 200, payload
        reply = json.loads(payload)
        assert reply["output_dtypes"] == ["float32"]
        assert np.array_equal(
            np.asarray(reply["outputs"], np.float32), ort_outputs(models["tokens"], feeds)["logits"]
        )
        body = {"inputs": {"x": [[1.0, 2.0, 3.0, 4.0]], "gain": 2}}
        status, _, payload = client._request(
            "POST", "/v1/models/two/predict", json.dumps(body).encode(), "application/json"
        )
        reply = json.loads(payload)
        assert status == 200 and reply["output_names"] == ["logits", "embedding"]
        assert set(reply["outputs"]) == {"logits", "embedding"}


def test_serve_starts_on_a_two_input_model_and_infer_prints_every_output(  # type: ignore[no-untyped-def]
    tmp_path: Path, keypair, capsys
) -> None:
    """`edgeagent serve` exited before its socket opened: its start-up check fed only the first input."""
    model = token_model(tmp_path / "tokens.onnx")
    bundle = make_bundle(
        tmp_path / "out",
        keypair,
        [model],
        None,
        name="tokens",
        gate=AcceptanceGate(latency_p95_ms={"*": 1e4}),
    ).path
    sock = tmp_path / "agent.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.cli.agent", "serve", str(bundle), "--trusted", str(keypair.public),
         "--socket", str(sock), "--profile", CANDIDATES_PROFILE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="the socket")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        feeds = token_data(3, seed=5)
        sample = tmp_path / "x.npz"
        np.savez(sample, **feeds)
        assert edgeagent("infer", "--socket", sock, "--input", sample) == 0
        reply = json.loads(capsys.readouterr().out)
        expected = ort_outputs(model, feeds)["logits"]
        assert np.array_equal(np.asarray(reply["outputs"]["logits"], np.float32), expected)
        as_json = tmp_path / "x.json"
        as_json.write_text(json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}}))
        assert edgeagent("infer", "--socket", sock, "--input", as_json) == 0
        reply = json.loads(capsys.readouterr().out)
        assert np.array_equal(np.asarray(reply["outputs"]["logits"], np.float32), expected)
        golden = _golden(tmp_path / "golden.npz", model, feeds)  # its inputs only: input.<name>
        assert edgeagent("infer", "--socket", sock, "--input", golden) == 0
        reply = json.loads(capsys.readouterr().out)
        assert np.array_equal(np.asarray(reply["outputs"]["logits"], np.float32), expected)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"acceptance passed" in out


def test_bench_runs_a_two_input_model(tmp_path: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    model = token_model(tmp_path / "tokens.onnx")
    golden = _golden(tmp_path / "golden.npz", model, token_data(8))
    bundle = make_bundle(
        tmp_path / "out", keypair, [model], golden, name="tokens", gate=AcceptanceGate(atol=1e-5)
    )
    argv = ("bench", bundle.path, "--trusted", keypair.public, "--profile", CANDIDATES_PROFILE, "--json")
    assert edgeagent(*argv, "--in-process") == 0
    rows = {r["candidate"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["onnxruntime/CPUExecutionProvider/fp32"]["verdict"] == "pass"


def test_litert_two_integer_inputs_serve_like_the_bare_interpreter(tmp_path: Path, keypair) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorflow", reason="builds the TFLite model with TensorFlow")
    from tests.multi_io_models import litert_outputs, token_tflite

    model = token_tflite(tmp_path / "tokens.tflite")
    feeds = token_data(12, seed=4)
    reference = litert_outputs(model, feeds)
    golden = tmp_path / "golden.npz"
    save_golden(golden, GoldenSet(feeds, None, reference))
    created = make_bundle(
        tmp_path / "out", keypair, [model], golden, name="tokens", gate=AcceptanceGate(atol=1e-5)
    )
    assert [(s.name, s.dtype) for s in created.manifest.models[0].inputs] == [
        ("tokens", "int32"),
        ("mask", "int32"),
    ]
    verified = extract(created, tmp_path / "bundle", keypair)
    served = _prepare(tmp_path / "bundle", verified)
    assert served.model.runtime == "litert" and served.verdict is not None and served.verdict.passed
    sample = token_data(3, seed=8)
    expected = litert_outputs(model, sample)
    with InferenceServer(tmp_path / "agent.sock") as server:
        server.activate(served)
        for framed, binary in ((True, True), (False, False)):
            with Client(server.socket_path, framed=framed) as client:
                got = client.predict(sample, binary=binary).outputs
            assert list(got) == list(expected)
            for name, array in expected.items():
                assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
