"""A state with the batch on axis 1 (issue 23: Silero VAD's (2, batch, 128)) is fed whole.

The axis-1 model of tests/state_models.py has Silero's layout in small, in its two exports:
the batch fixed to 1 (``state`` (2, 1, 8)) and dynamic (``state`` (2, batch, 8)). Its state
input has no batch dimension: it is fed as the model declares it, never sliced, reshaped or
counted in the batch size, on the device (LoadedModel, acceptance, sessions, bench) and in
the converter (runners, evaluation, calibration, the golden sequence). Real ONNX Runtime
sessions, a real server and the CLIs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converter.errors import DataError
from converter.feeds import InputSpec, fit_feeds, sample
from edgeagent.acceptance import run_acceptance
from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.golden import GoldenSet, load_golden, save_golden
from edgeagent.bundle.manifest import ModelEntry, ModelState, StatePair
from edgeagent.client import Client
from edgeagent.errors import InputError
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.runtimes.model import fed_whole
from edgeagent.serving import InferenceServer
from edgeagent.state import StateCarrier
from tests.state_models import FEATURES, HIDDEN, LAYERS, axis1_model, axis1_reference, chunks
from tests.test_cli import edgectl
from tests.test_state import GATE, PAIRS, _bundle, _matches, _serve

EXPORTS = [1, "batch"]  # Silero's fixed export, and its op15 one with a dynamic batch


def _golden(path: Path, model: Path, sequences: list[np.ndarray], *, carry_across: bool = False) -> Path:
    """Golden sequences with every step's y and whole state (rows (n, 2, 1, 8)) from bare ORT."""
    steps: list[dict[str, np.ndarray]] = []
    for i, xs in enumerate(sequences):
        if carry_across and i:  # a wrong reference: the state goes on across the boundary
            xs = np.concatenate([sequences[i - 1], xs])
            steps += axis1_reference(model, xs)[len(sequences[i - 1]) :]
        else:
            steps += axis1_reference(model, xs)
    ids = np.concatenate([np.full(len(xs), i, np.int64) for i, xs in enumerate(sequences)])
    reference = {
        "y": np.concatenate([s["y"] for s in steps]),
        "stateN": np.stack([s["stateN"] for s in steps]),
    }
    save_golden(path, GoldenSet({"x": np.concatenate([xs[:, 0] for xs in sequences])}, None, reference, ids))
    return path


def test_which_inputs_are_fed_whole() -> None:
    assert fed_whole({"x": [1, 4], "state": [2, 1, 8]}) == {"state"}
    assert fed_whole({"x": [None, 4], "state": [2, None, 8], "sr": []}) == {"state"}
    # Ordinary models keep axis 0 as the batch: a state (N, H), a fixed batch on every input.
    assert fed_whole({"x": [None, 4], "state": [None, 8]}) == frozenset()
    assert fed_whole({"a": [8, 4], "b": [8, 2]}) == frozenset()
    assert fed_whole({"x": [8, 4]}) == frozenset()


@pytest.mark.parametrize("batch", EXPORTS)
def test_loaded_model_feeds_the_state_whole(tmp_path: Path, batch: int | str) -> None:
    path = axis1_model(tmp_path / "m.onnx", batch=batch)
    model = load_model(path, "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))
    xs = chunks(3, seed=7)
    state = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    for x, want in zip(xs, axis1_reference(path, xs), strict=True):
        y, state = model.predict({"x": x[0], "state": state})  # a sample without its batch dimension
        _matches({"y": y, "stateN": state}, want)
    assert model.unbatched == {"state"}
    for bad in (np.zeros((1, LAYERS, HIDDEN), np.float32), np.zeros((LAYERS, HIDDEN), np.float32)):
        with pytest.raises(
            InputError, match=r"input 'state' has shape .*; the model takes \[2, (1|'\?'), 8\]"
        ):
            model.predict({"x": xs[0], "state": bad})
    model.close()


@pytest.mark.parametrize("batch", EXPORTS)
def test_acceptance_replays_axis1_sequences(tmp_path: Path, batch: int | str) -> None:
    path = axis1_model(tmp_path / "m.onnx", batch=batch)
    model = load_model(path, "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))
    entry = ModelEntry(
        path="models/m.onnx", format="onnx", precision="fp32", inputs=list(model.inputs),
        outputs=list(model.outputs), state=ModelState(pairs=[StatePair(output="stateN", input="state")]),
    )  # fmt: skip
    carrier = StateCarrier.for_model(entry, model)
    assert carrier is not None and carrier.initial_state()["state"].shape == (LAYERS, 1, HIDDEN)
    sequences = [chunks(7, seed=2), chunks(5, seed=3)]
    verdict = run_acceptance(
        model, GATE, load_golden(_golden(tmp_path / "g.npz", path, sequences)), state=carrier
    )
    assert verdict.passed, verdict.reason
    assert verdict.samples == 12 and {c.name for c in verdict.checks} == {
        "tolerance_ratio[y]",
        "tolerance_ratio[stateN]",
    }
    carried = load_golden(_golden(tmp_path / "c.npz", path, sequences, carry_across=True))
    assert not run_acceptance(model, GATE, carried, state=carrier).passed
    model.close()


@pytest.fixture(scope="module", params=EXPORTS, ids=["fixed", "dynamic"])
def axis1_stream(request, tmp_path_factory, keypair):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("axis1")
    model = axis1_model(root / "m.onnx", batch=request.param)
    golden = _golden(root / "g.npz", model, [chunks(6, seed=4), chunks(6, seed=5)])
    out = root / "out"
    argv = ["bundle", "create", "--name", "stream", "--version", "1.0.0", "--model", model, "--golden",
            golden, "--key", keypair.private, "-o", out, "--atol", "1e-5",
            "--state", "stateN=state"]  # fmt: skip
    assert edgectl(*argv) == 0
    from edgeagent.bundle.reader import read_manifest_unverified

    bundle = next(out.glob("*.bundle"))
    manifest, _ = read_manifest_unverified(bundle)
    assert manifest.models[0].state == ModelState(pairs=[StatePair(output="stateN", input="state")])
    yield root, model, bundle


def test_served_sessions_match_the_bare_runtime(axis1_stream, keypair) -> None:  # type: ignore[no-untyped-def]
    """Acceptance passes on the golden sequences, then a session steps with the bare runtime."""
    root, model, _ = axis1_stream
    created = _bundle(root / "served", keypair, model, root / "g.npz", state=PAIRS)
    served = _serve(created, root / "served", keypair)
    assert served.verdict is not None and served.verdict.passed, served.verdict
    server = InferenceServer(root / "s" / "agent.sock")
    server.activate(served)
    server.start()
    try:
        xs = chunks(30, seed=11)
        reference = axis1_reference(model, xs)
        with Client(server.socket_path) as client:
            session = client.session()
            for x, want in zip(xs, reference, strict=True):
                _matches(session.predict(x).outputs, want)
            _matches(client.predict(xs[0]).outputs, reference[0])  # no session: the initial state
            # The caller's own state overrides the carried one, in the model's shape.
            given = {"x": xs[1], "state": reference[0]["stateN"]}
            _matches(client.predict(given).outputs, reference[1])
    finally:
        server.close()


@pytest.mark.parametrize("golden", [True, False], ids=["golden", "latency-only"])
def test_bench_runs_an_axis1_bundle(axis1_stream, tmp_path: Path, keypair, capsys, golden: bool) -> None:  # type: ignore[no-untyped-def]
    from tests.test_serving_cli import edgeagent

    _, model, bundle = axis1_stream
    if not golden:  # latency on zeros for x; the state (2, batch, 8) is no invented shape to refuse
        from edgeagent.bundle.create import create_bundle
        from edgeagent.signing import SigningKey

        gate = AcceptanceGate(latency_p95_ms={"*": 60_000.0})  # a budget, never the point here
        created = create_bundle(
            name="stream", version="1.0.0", models=[model], key=SigningKey.load(keypair.private),
            out_dir=tmp_path / "out", gate=gate, state=PAIRS,
        )  # fmt: skip
        assert created.manifest.acceptance.latency_shapes == {}
        bundle = created.path
    argv = ["bench", bundle, "--trusted", keypair.public, "--profile", "generic-x86_64", "--json"]
    assert edgeagent(*argv, "--in-process") == 0, capsys.readouterr().err
    rows = {r["candidate"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["onnxruntime/CPUExecutionProvider/fp32"]["verdict"] == "pass"


def test_fit_feeds_takes_a_whole_input_as_declared() -> None:
    specs = [
        InputSpec("x", np.dtype(np.float32), (FEATURES,)),
        InputSpec("state", np.dtype(np.float32), (2, None, 8), whole=True),
    ]
    fitted = fit_feeds(specs, {"x": np.zeros((3, FEATURES)), "state": np.zeros((3, 2, 1, 8))})
    assert fitted["state"].shape == (3, 2, 1, 8)
    one = sample(
        [*specs, InputSpec("sr", np.dtype(np.int64), (), scalar=True)], {**fitted, "sr": np.full(3, 16000)}, 2
    )
    assert one["state"].shape == (2, 1, 8) and one["x"].shape == (1, FEATURES)
    assert isinstance(one["sr"], np.ndarray) and one["sr"].shape == ()  # ONNX Runtime takes arrays only
    with pytest.raises(DataError, match="'state' has no batch dimension"):  # same elements, never reshaped
        fit_feeds(specs, {"x": np.zeros((3, FEATURES)), "state": np.zeros((3, 16))})


def _stream_data(path: Path, model: Path, n: int, seed: int) -> Path:
    """x, the recorded whole state before each chunk (n, 2, 1, 8), y = the first output."""
    xs = chunks(n, seed=seed)
    steps = axis1_reference(model, xs)
    states = np.stack([np.zeros((LAYERS, 1, HIDDEN), np.float32)] + [s["stateN"] for s in steps[:-1]])
    np.savez(path, x=xs[:, 0], state=states, y=np.concatenate([s["y"] for s in steps]))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("batch", EXPORTS)
def test_convert_int8_with_an_axis1_state(tmp_path: Path, keypair, capsys, batch: int | str) -> None:  # type: ignore[no-untyped-def]
    from devices.profile import load_profile
    from edgeagent.bundle.reader import extract_bundle
    from edgeagent.serving.loader import prepare_served_model
    from edgeagent.signing import KeyRing

    model = axis1_model(tmp_path / "m.onnx", batch=batch)
    out = tmp_path / "out"
    argv = ["convert", model, "--eval", _stream_data(tmp_path / "eval.npz", model, 60, seed=81),
            "--calib", _stream_data(tmp_path / "calib.npz", model, 48, seed=82), "--quantize", "int8",
            "--task", "regression", "--name", "ax", "--version", "1.0.0", "--key", keypair.private,
            "-o", out, "--golden-samples", "30", "--state", "stateN=state"]  # fmt: skip
    assert edgectl(*argv) == 0, capsys.readouterr().err
    verified = extract_bundle(out / "ax-1.0.0.bundle", tmp_path / "b", KeyRing.from_paths([keypair.public]))
    assert {m.precision for m in verified.manifest.models} == {"int8"}
    golden = load_golden(tmp_path / "b" / "acceptance" / "golden.npz")
    assert list(golden.inputs) == ["x"] and golden.reference["stateN"].shape == (30, LAYERS, 1, HIDDEN)
    reference = axis1_reference(model, golden.inputs["x"][:, None])  # the source, state carried
    np.testing.assert_allclose(golden.reference["y"], np.concatenate([r["y"] for r in reference]), atol=1e-5)
    served = prepare_served_model(
        tmp_path / "b",
        verified.manifest,
        list(load_profile("generic-x86_64").candidates),
        profile="generic-x86_64",
    )
    assert served.verdict is not None and served.verdict.passed and served.verdict.samples == 30
    assert served.state is not None and served.model.precision == "int8"
