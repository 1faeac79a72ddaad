"""Stateful models (issue 23 item 2): state pairs in the manifest, golden sequences in acceptance,
per-session state in the server (frames, HTTP, in-process), bounds on sessions, and TFLite models
that keep their state in resource variables. Real ONNX Runtime / LiteRT sessions of generated models."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgeagent.acceptance import run_acceptance
from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.golden import GoldenSet, load_golden, save_golden
from edgeagent.bundle.manifest import Manifest, ModelEntry, ModelState, StatePair, TensorSpec
from edgeagent.client import Client
from edgeagent.errors import RequestFailed, UsageError
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.serving import InferenceServer, ServedModel
from edgeagent.serving.loader import prepare_served_model
from edgeagent.serving.sessions import SessionStore
from edgeagent.state import StateCarrier
from tests.runtimes_support import extract
from tests.state_models import HIDDEN, chunks, gru_model, gru_reference
from tests.test_cli import edgectl

PROFILE = "generic-x86_64"
PAIRS = {"stateN": "state"}
GATE = AcceptanceGate(atol=1e-5, rtol=1e-5)


def _golden(path: Path, model: Path, sequences: list[np.ndarray], *, carry_across: bool = False) -> Path:
    """Golden sequences (a 'sequence' id per row) with every step's reference outputs from bare ORT.

    ``carry_across``: a wrong reference that does not restart the state at each sequence.
    """
    steps: list[dict[str, np.ndarray]] = []
    state = None
    for xs in sequences:
        ref = gru_reference(model, xs, state)
        steps += ref
        state = ref[-1]["stateN"] if carry_across else None
    ids = np.concatenate([np.full(len(xs), i, np.int64) for i, xs in enumerate(sequences)])
    inputs = {"x": np.concatenate([xs[:, 0] for xs in sequences])}
    reference = {k: np.concatenate([s[k] for s in steps]) for k in ("y", "stateN")}
    save_golden(path, GoldenSet(inputs, None, reference, ids))
    return path


def _bundle(root: Path, keypair, model: Path, golden: Path | None, **kw):  # type: ignore[no-untyped-def]
    from edgeagent.bundle.create import create_bundle
    from edgeagent.signing import SigningKey

    root.mkdir(parents=True, exist_ok=True)
    return create_bundle(
        name="stream", version="1.0.0", models=[model], key=SigningKey.load(keypair.private),
        out_dir=root, golden=golden, gate=GATE if golden else AcceptanceGate(), **kw,
    )  # fmt: skip


def _serve(created, root: Path, keypair):  # type: ignore[no-untyped-def]
    from devices.profile import load_profile

    verified = extract(created, root / "bundle", keypair)
    candidates = list(load_profile(PROFILE).candidates)
    return prepare_served_model(root / "bundle", verified.manifest, candidates, profile=PROFILE)


# -- manifest and bundle create -------------------------------------------------------------


def test_state_is_optional_and_needs_schema_3() -> None:
    spec = TensorSpec(name="state", shape=[None, 8], dtype="float32")
    out = TensorSpec(name="stateN", shape=[None, 8], dtype="float32")
    entry = {
        "path": "models/m.onnx",
        "format": "onnx",
        "precision": "fp32",
        "inputs": [spec],
        "outputs": [out],
    }
    body = {
        "name": "m",
        "version": "1.0.0",
        "files": [{"path": "models/m.onnx", "size": 1, "sha256": "0" * 64}],
    }
    plain = Manifest(schema_version=1, models=[ModelEntry(**entry)], **body)
    assert "state" not in json.loads(plain.to_bytes())["models"][0]  # old agents keep reading these
    state = ModelState(pairs=[StatePair(output="stateN", input="state")])
    with pytest.raises(ValueError, match="needs schema_version 3"):
        Manifest(schema_version=2, models=[ModelEntry(**entry, state=state)], **body)
    stateful = Manifest(schema_version=3, models=[ModelEntry(**entry, state=state)], **body)
    assert json.loads(stateful.to_bytes())["models"][0]["state"]["pairs"] == [
        {"output": "stateN", "input": "state", "initial": None}
    ]
    with pytest.raises(ValueError, match="'h' is not an input"):
        ModelEntry(**entry, state=ModelState(pairs=[StatePair(output="stateN", input="h")]))


def test_bundle_create_state_flag(tmp_path: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    model = gru_model(tmp_path / "gru.onnx")
    golden = _golden(tmp_path / "g.npz", model, [chunks(5)[:, :1]])
    initial = tmp_path / "h0.npy"
    np.save(initial, np.full((1, HIDDEN), 0.25, np.float32))
    out = tmp_path / "out"
    argv = ["bundle", "create", "--name", "stream", "--version", "1.0.0", "--model", model,
            "--golden", golden, "--key", keypair.private, "-o", out, "--atol", "1e-5"]  # fmt: skip
    assert edgectl(*argv, "--state", "stateN=nope") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope' is not an input" in err and "Traceback" not in err
    assert edgectl(*argv, "--state", "stateN") == 2
    assert "expected OUT=IN" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.bundle"))
    assert edgectl(*argv, "--state", "stateN=state", "--state-initial", f"state={initial}") == 0
    capsys.readouterr()
    assert edgectl("bundle", "inspect", next(out.glob("*.bundle"))) == 0
    assert "state: stateN -> state" in capsys.readouterr().out
    from edgeagent.bundle.reader import read_manifest_unverified

    manifest, _ = read_manifest_unverified(next(out.glob("*.bundle")))
    assert manifest.schema_version == 3
    assert manifest.models[0].state == ModelState(
        pairs=[StatePair(output="stateN", input="state", initial="state/state.npy")]
    )


# -- acceptance over golden sequences ---------------------------------------------------------


def _loaded_gru(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The GRU fixture loaded in ORT, with the manifest entry that declares its state pair."""
    model_path = gru_model(tmp_path / "gru.onnx")
    model = load_model(model_path, "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))
    entry = ModelEntry(
        path="models/gru.onnx", format="onnx", precision="fp32", inputs=list(model.inputs),
        outputs=list(model.outputs), state=ModelState(pairs=[StatePair(output="stateN", input="state")]),
    )  # fmt: skip
    return model_path, model, entry


def test_acceptance_replays_sequences_from_the_initial_state(tmp_path: Path) -> None:
    model_path, model, entry = _loaded_gru(tmp_path)
    carrier = StateCarrier.for_model(entry, model)
    assert carrier is not None
    sequences = [chunks(12, seed=2), chunks(9, seed=3)]
    good = load_golden(_golden(tmp_path / "good.npz", model_path, sequences))
    assert good.sequences() == [range(0, 12), range(12, 21)]
    verdict = run_acceptance(model, GATE, good, state=carrier)
    assert verdict.passed, verdict.reason
    assert verdict.samples == 21 and {c.name for c in verdict.checks} == {
        "tolerance_ratio[y]",
        "tolerance_ratio[stateN]",
    }
    # A reference that carries the state across the sequence boundary differs from step 12 on:
    # acceptance restarts each sequence, and compares every step.
    carried = load_golden(_golden(tmp_path / "carried.npz", model_path, sequences, carry_across=True))
    assert not run_acceptance(model, GATE, carried, state=carrier).passed
    # Without the carrier the golden set (no 'state' input) cannot even be fed.
    with pytest.raises(UsageError, match="takes"):
        run_acceptance(model, GATE, good)
    model.close()


# -- serving ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream(tmp_path_factory, keypair):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("stream")
    model = gru_model(root / "gru.onnx")
    golden = _golden(root / "g.npz", model, [chunks(10, seed=4), chunks(10, seed=5)])
    served = _serve(_bundle(root / "out", keypair, model, golden, state=PAIRS), root, keypair)
    server = InferenceServer(root / "s" / "agent.sock")
    server.activate(served)
    server.start()
    yield server, model
    server.close()


def _matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, array in want.items():
        np.testing.assert_allclose(got[name], array, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("framed", [True, False])
def test_sessions_match_the_bare_runtime_step_for_step(stream, framed: bool) -> None:  # type: ignore[no-untyped-def]
    """100 chunks with the state carried; the acceptance run before serving leaks into no session."""
    server, model = stream
    xs = chunks(100, seed=11)
    reference = gru_reference(model, xs)
    with Client(server.socket_path, framed=framed) as client:
        session = client.session()
        for x, want in zip(xs, reference, strict=True):
            _matches(session.predict(x).outputs, want)
        assert session.reset() is True
        _matches(session.predict(xs[0]).outputs, reference[0])  # afresh after the reset
        # no session: every call starts from the initial state
        for x in xs[:3]:
            _matches(client.predict(x).outputs, gru_reference(model, x[None])[0])


def test_a_session_through_shared_memory_carries_its_state(stream) -> None:  # type: ignore[no-untyped-def]
    """The session flag and the shared-memory flag on one frame: both honoured."""
    server, model = stream
    xs = chunks(20, seed=31)
    reference = gru_reference(model, xs)
    with Client(server.socket_path, shm_min_bytes=0) as client:
        session = client.session()
        for x, want in zip(xs, reference, strict=True):
            _matches(session.predict(x).outputs, want)
        assert client.shm_offered


def test_interleaved_sessions_do_not_mix(stream) -> None:  # type: ignore[no-untyped-def]
    server, model = stream
    a, b = chunks(30, seed=21), chunks(30, seed=22)
    ref_a, ref_b = gru_reference(model, a), gru_reference(model, b)
    with Client(server.socket_path) as one, Client(server.socket_path, framed=False) as other:
        sa, sb = one.session("a-1"), other.session("b-1")
        for i in range(30):
            _matches(sa.predict(a[i]).outputs, ref_a[i])
            _matches(sb.predict(b[i]).outputs, ref_b[i])
        assert other.reset_session("never-used") is False
        with pytest.raises(RequestFailed, match="raw_state"):  # the state is carried in float values
            one.predict(a[0], session="a-1", raw=True)
        sessions = one.stats()["sessions"]
        assert sessions["live"] >= 2 and sessions["max_sessions"] == 64 and sessions["evicted"] == 0
        described = one.models()["models"][0]["state"]
        assert described == {"pairs": [{"output": "stateN", "input": "state"}], "variables": False}
        with pytest.raises(RequestFailed, match="bad_session"):
            one.predict(a[0], session="no spaces allowed")


def test_session_bound_and_idle_timeout(tmp_path: Path) -> None:
    model_path, model, entry = _loaded_gru(tmp_path)
    served = ServedModel("gru", model, "gru", "1.0.0", state=StateCarrier.for_model(entry, model))
    now = [0.0]
    store = SessionStore(max_sessions=2, idle_s=60.0, clock=lambda: now[0])
    xs = chunks(3, seed=31)
    ref = gru_reference(model_path, xs)

    def step(sid: str, i: int) -> None:
        outputs = store.predict(served, sid, {"x": xs[i]}, raw=False)
        _matches(dict(zip(model.output_names, outputs, strict=True)), ref[i])

    step("a", 0)
    step("b", 0)
    step("a", 1)  # a is now the most recently used
    step("c", 0)  # over the bound: b, the least recently used, goes
    assert len(store) == 2 and store.evicted == 1 and store.ids("gru") == ["a", "c"]
    step("a", 2)
    step("b", 0)  # b starts again from the initial state
    now[0] = 61.0
    step("c", 0)  # a and b sat idle past the timeout: c's state went too (its last use was at 0)
    assert store.ids("gru") == ["c"] and store.expired == 2
    now[0] = 100.0
    step("c", 1)  # used again within the timeout: kept
    assert store.reset("gru", "c") and not store.reset("gru", "c")
    step("c", 0)  # afresh after the reset
    # A new version under the same name: the session starts from its initial state.
    served = ServedModel("gru", model, "gru", "1.0.1", state=served.state)
    step("c", 0)
    assert store.ids("gru") == ["c"]
    model.close()


# -- TFLite resource variables ------------------------------------------------------------------


@pytest.fixture(scope="module", params=["fp32", "int8"])
def variable_model(request, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorflow")
    from tests.state_models import variable_tflite

    folder = tmp_path_factory.mktemp("var")
    return variable_tflite(folder / f"acc_{request.param}.tflite", int8=request.param == "int8")


@pytest.mark.tensorflow
@pytest.mark.slow
def test_resource_variable_tflite_is_stateful_and_served_fresh_per_session(  # type: ignore[no-untyped-def]
    variable_model: Path, tmp_path: Path, keypair
) -> None:
    """It bundled and served as stateless: acceptance's steps stayed in the interpreter that served."""
    from tests.state_models import litert_stream

    sequences = [chunks(6, seed=41), chunks(4, seed=42)]
    references = [litert_stream(variable_model, xs) for xs in sequences]
    # Tolerance: one step of the int8 output's scale (kernels differ by CPU); float: 1e-5.
    tolerance = references[0][1] or 1e-5
    ids = np.concatenate([np.full(len(xs), i, np.int64) for i, xs in enumerate(sequences)])
    ys = np.concatenate([np.concatenate(steps) for steps, _ in references])
    golden = tmp_path / "g.npz"
    save_golden(
        golden, GoldenSet({"x": np.concatenate([xs[:, 0] for xs in sequences])}, None, {"y": ys}, ids)
    )
    created = _variable_bundle(tmp_path, keypair, variable_model, golden, tolerance)  # no state given
    state = created.manifest.models[0].state
    assert created.manifest.schema_version == 3 and state == ModelState(variables=True)
    from edgeagent.runtimes.tflite_ops import VARIABLE_OPS, builtin_codes

    assert builtin_codes(variable_model.read_bytes()) >= VARIABLE_OPS
    served = _serve(created, tmp_path, keypair)
    assert served.state is not None and served.state.variables and served.model.runtime == "litert"
    assert served.verdict is not None and served.verdict.passed and served.verdict.samples == 10
    xs, ys = chunks(5, seed=43), chunks(5, seed=44)
    (ref_x, _), (ref_y, _) = litert_stream(variable_model, xs), litert_stream(variable_model, ys)

    def close(got: np.ndarray, want: np.ndarray) -> None:
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)

    with InferenceServer(tmp_path / "s" / "agent.sock") as server:
        server.activate(served)
        with Client(server.socket_path) as client:
            a, b = client.session(), client.session()
            for i in range(5):
                close(a.predict(xs[i]).output, ref_x[i])
                close(b.predict(ys[i]).output, ref_y[i])
            for x in xs[:2]:  # no session: a fresh state every call
                close(client.predict(x).output, litert_stream(variable_model, x[None])[0][0])
            assert a.reset()
            close(a.predict(xs[0]).output, ref_x[0])
    # A bundle that predates declared state: the interpreter's ops still say it is stateful.
    model = load_model(variable_model, "litert", LoadOptions("cpu"))
    carrier = StateCarrier.for_model(None, model)
    assert carrier is not None and carrier.variables
    model.close()


def _variable_bundle(tmp_path: Path, keypair, model: Path, golden: Path, tolerance: float):  # type: ignore[no-untyped-def]
    from edgeagent.bundle.create import create_bundle
    from edgeagent.signing import SigningKey

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return create_bundle(
        name="acc", version="1.0.0", models=[model], key=SigningKey.load(keypair.private), out_dir=out,
        golden=golden, gate=AcceptanceGate(atol=tolerance),
    )  # fmt: skip


@pytest.mark.parametrize("isolated", [False, True])
def test_bench_judges_a_stateful_bundle_on_its_sequences(
    tmp_path: Path, keypair, capsys, isolated: bool
) -> None:  # type: ignore[no-untyped-def]
    from tests.test_serving_cli import edgeagent

    model = gru_model(tmp_path / "gru.onnx")
    golden = _golden(tmp_path / "g.npz", model, [chunks(8, seed=51), chunks(8, seed=52)])
    created = _bundle(tmp_path / "out", keypair, model, golden, state=PAIRS)
    argv = ["bench", created.path, "--trusted", keypair.public, "--profile", PROFILE, "--json"]
    assert edgeagent(*argv, *([] if isolated else ["--in-process"])) == 0
    rows = {r["candidate"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["onnxruntime/CPUExecutionProvider/fp32"]["verdict"] == "pass"


def test_infer_continues_a_session(stream, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tests.test_serving_cli import edgeagent

    server, model = stream
    xs = chunks(2, seed=61)
    reference = gru_reference(model, xs)
    for i, x in enumerate(xs):
        np.save(tmp_path / f"c{i}.npy", x)
        assert (
            edgeagent(
                "infer", "--socket", server.socket_path, "--input", tmp_path / f"c{i}.npy", "--session", "cli"
            )
            == 0
        )
        outputs = json.loads(capsys.readouterr().out)["outputs"]
        np.testing.assert_allclose(
            np.asarray(outputs["y"], np.float32), reference[i]["y"], rtol=1e-6, atol=1e-6
        )


def test_initial_state_from_the_bundle(tmp_path: Path, keypair) -> None:  # type: ignore[no-untyped-def]
    model = gru_model(tmp_path / "gru.onnx")
    h0 = np.linspace(-0.5, 0.5, HIDDEN, dtype=np.float32)[None]
    np.save(tmp_path / "h0.npy", h0)
    xs = chunks(4, seed=71)
    reference = gru_reference(model, xs, h0)
    ids = np.zeros(4, np.int64)
    golden = tmp_path / "g.npz"
    save_golden(
        golden, GoldenSet({"x": xs[:, 0]}, None, {"y": np.concatenate([r["y"] for r in reference])}, ids)
    )
    created = _bundle(
        tmp_path / "out", keypair, model, golden, state=PAIRS, state_initial={"state": tmp_path / "h0.npy"}
    )
    served = _serve(created, tmp_path, keypair)  # acceptance passed: it started from h0
    with InferenceServer(tmp_path / "s" / "agent.sock") as server:
        server.activate(served)
        for i, x in enumerate(xs):
            got = server.predict({"x": x}, session="s").outputs
            _matches(dict(zip(served.model.output_names, got, strict=True)), reference[i])
        got = server.predict(xs[0]).outputs  # no session: from h0 too
        _matches(dict(zip(served.model.output_names, got, strict=True)), reference[0])
        assert server.reset_session("s") and not server.reset_session("s")


def test_tflite_operator_codes_from_the_flatbuffer(tmp_path: Path) -> None:
    from edgeagent.runtimes.tflite_ops import builtin_codes, uses_variables

    fixtures = Path(__file__).parent / "fixtures" / "models"
    data = (fixtures / "mlp_int8.tflite").read_bytes()
    assert builtin_codes(data) == {9}  # FULLY_CONNECTED
    assert not uses_variables(fixtures / "cnn_int8.tflite")
    assert not uses_variables(fixtures / "mlp.onnx") and not uses_variables(tmp_path / "missing.tflite")
    for cut in range(0, len(data), 97):  # truncated or corrupt files: ValueError, never IndexError
        with contextlib.suppress(ValueError):
            builtin_codes(data[:cut])
    corrupt = bytearray(data)
    corrupt[0:4] = (len(data) + 10).to_bytes(4, "little")
    with pytest.raises(ValueError):
        builtin_codes(bytes(corrupt))


def _stream_data(path: Path, model: Path, n: int, seed: int) -> Path:
    """x, the recorded state before each chunk, and y = the top class, from one bare-ORT stream."""
    xs = chunks(n, seed=seed)
    steps = gru_reference(model, xs)
    states = np.concatenate([np.zeros((1, HIDDEN), np.float32)] + [s["stateN"] for s in steps[:-1]])
    labels = np.concatenate([s["y"] for s in steps]).argmax(1)
    np.savez(path, x=xs[:, 0], state=states, y=labels)
    return path


@pytest.mark.slow
def test_convert_int8_with_state_bundles_golden_sequences_that_pass(tmp_path: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    model = gru_model(tmp_path / "gru.onnx")
    eval_npz = _stream_data(tmp_path / "eval.npz", model, 80, seed=81)
    calib_npz = _stream_data(tmp_path / "calib.npz", model, 64, seed=82)
    out = tmp_path / "out"
    argv = ["convert", model, "--eval", eval_npz, "--calib", calib_npz, "--quantize", "int8",
            "--name", "gru", "--version", "1.0.0", "--key", keypair.private, "-o", out,
            "--golden-samples", "40"]  # fmt: skip
    assert edgectl(*argv, "--state", "nope=state") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and "Traceback" not in err
    assert edgectl(*argv, "--state", "stateN=state") == 0, capsys.readouterr().err
    from edgeagent.bundle.reader import extract_bundle
    from edgeagent.signing import KeyRing

    verified = extract_bundle(out / "gru-1.0.0.bundle", tmp_path / "b", KeyRing.from_paths([keypair.public]))
    manifest = verified.manifest
    assert {m.precision for m in manifest.models} == {"int8"}
    assert all(
        m.state and m.state.pairs == [StatePair(output="stateN", input="state")] for m in manifest.models
    )
    golden = load_golden(tmp_path / "b" / "acceptance" / "golden.npz")
    assert list(golden.inputs) == ["x"] and golden.sequences() == [range(40)]
    reference = gru_reference(model, golden.inputs["x"][:, None])  # the source, state carried
    np.testing.assert_allclose(golden.reference["y"], np.concatenate([r["y"] for r in reference]), atol=1e-5)
    from devices.profile import load_profile

    served = prepare_served_model(
        tmp_path / "b", manifest, list(load_profile(PROFILE).candidates), profile=PROFILE
    )
    assert served.verdict is not None and served.verdict.passed and served.verdict.samples == 40
    assert served.state is not None and served.model.precision == "int8"
