"""The converter on a model with two integer inputs, end to end: convert (static int8 where it
applies) -> bundle -> verify -> acceptance -> serve -> client frames and HTTP JSON, every output
equal to a bare ONNX Runtime session on the served artifact. Real runtimes, a generated model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.profile import load_profile
from edgeagent.bundle.golden import load_golden
from edgeagent.bundle.reader import extract_bundle
from edgeagent.client import Client
from edgeagent.serving import InferenceServer
from edgeagent.serving.loader import prepare_served_model
from edgeagent.signing import KeyRing
from tests.multi_io_models import ort_outputs, token_data, token_model, two_output_model
from tests.test_converter_onnx import edgectl

onnx = pytest.importorskip("onnx", reason="needs the host extra (onnx)")

PROFILE = "generic-x86_64"


def _data(tmp: Path, model: Path) -> tuple[Path, Path]:
    """eval.npz (tokens, mask, y = the fp32 model's classes) and calib.npz (tokens, mask)."""
    feeds = token_data(120, seed=1)
    labels = ort_outputs(model, feeds)["logits"].argmax(1)
    np.savez(tmp / "eval.npz", **feeds, y=labels)
    np.savez(tmp / "calib.npz", **token_data(64, seed=2))
    return tmp / "eval.npz", tmp / "calib.npz"


def _quantized_initializers(path: Path) -> dict[str, str]:
    """Quantized initializers (int8/uint8) by name -> dtype."""
    graph = onnx.load(str(path)).graph
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in graph.initializer}
    return {k: v for k, v in types.items() if v in ("int8", "uint8")}


def test_integer_two_input_model_converts_bundles_and_serves_like_the_bare_runtime(
    tmp_path: Path, keypair: Any, capsys: Any
) -> None:
    model = token_model(tmp_path / "tokens.onnx")
    eval_npz, calib_npz = _data(tmp_path, model)
    out = tmp_path / "out"
    rc = edgectl(
        "convert", model, "--eval", eval_npz, "--calib", calib_npz, "--quantize", "int8",
        "--name", "tokens", "--version", "1.0.0", "--key", keypair.private, "-o", out,
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert edgectl("bundle", "verify", out / "tokens-1.0.0.bundle", "--trusted", keypair.public) == 0
    dest = tmp_path / "bundle"
    verified = extract_bundle(out / "tokens-1.0.0.bundle", dest, KeyRing.from_paths([keypair.public]))
    manifest = verified.manifest
    assert [m.precision for m in manifest.models] == ["int8"]
    int8 = dest / manifest.models[0].path
    # int8 where it applies: the MatMul weight (fused with its bias into a Gemm) is stored as int8;
    # the integer inputs are untouched (still int32, not quantized or cast).
    assert _quantized_initializers(int8)["weight_quantized"] == "int8"
    assert [(s.name, s.dtype) for s in manifest.models[0].inputs] == [("tokens", "int32"), ("mask", "int32")]
    golden = load_golden(dest / "acceptance" / "golden.npz")
    assert {k: v.dtype.name for k, v in golden.inputs.items()} == {"tokens": "int32", "mask": "int32"}
    assert list(golden.reference) == ["logits"] and golden.labels is not None
    reference = ort_outputs(model, dict(golden.inputs))["logits"]
    np.testing.assert_allclose(golden.reference["logits"], reference, rtol=1e-5, atol=1e-5)
    gate = manifest.acceptance
    assert gate.min_accuracy is not None and gate.min_top1_agreement is not None

    candidates = list(load_profile(PROFILE).candidates)
    served = prepare_served_model(dest, manifest, candidates, profile=PROFILE, bundle_sha256=verified.sha256)
    assert served.verdict is not None and served.verdict.passed, served.verdict
    assert served.verdict.samples == len(golden)
    feeds = token_data(7, seed=11)
    expected = ort_outputs(dest / "models" / served.model.path.name, feeds)
    with InferenceServer(tmp_path / "agent.sock") as server:
        server.activate(served)
        for framed, binary in ((True, True), (False, True), (False, False)):
            with Client(server.socket_path, framed=framed) as client:
                got = client.predict(feeds, binary=binary).outputs
            assert list(got) == ["logits"]
            assert got["logits"].dtype == np.float32
            assert np.array_equal(got["logits"], expected["logits"]), (framed, binary)


def test_float_token_ids_are_refused_in_one_line(tmp_path: Path, keypair: Any, capsys: Any) -> None:
    """The converter cast every evaluation array to float32 (ORT then failed with a traceback)."""
    model = token_model(tmp_path / "tokens.onnx")
    feeds = token_data(20)
    np.savez(
        tmp_path / "eval.npz", tokens=feeds["tokens"].astype(np.float32), mask=feeds["mask"], y=np.zeros(20)
    )
    rc = edgectl(
        "convert", model, "--eval", tmp_path / "eval.npz", "--quantize", "dynamic",
        "--name", "t", "--version", "1.0.0", "--key", keypair.private, "-o", tmp_path / "out",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1, err
    assert "'tokens': the data holds float32 but the model takes int32" in err
    np.savez(tmp_path / "eval.npz", tokens=feeds["tokens"], y=np.zeros(20))
    rc = edgectl(
        "convert", model, "--eval", tmp_path / "eval.npz", "--quantize", "dynamic",
        "--name", "t", "--version", "1.0.0", "--key", keypair.private, "-o", tmp_path / "out",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc != 0 and "the data has inputs ['tokens'] but the model takes ['tokens', 'mask']" in err
    assert not list((tmp_path / "out").glob("*.bundle"))


def test_every_output_of_a_two_output_model_is_in_the_golden_set_and_checked(tmp_path: Path) -> None:
    """Only the first output was kept as reference, so a device could not check a second one."""
    from converter.api import convert
    from converter.recipe import recipe_from_dict

    model = two_output_model(tmp_path / "two.onnx")
    x = np.random.default_rng(0).normal(size=(80, 4)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=ort_outputs(model, {"x": x})["logits"].argmax(1))
    recipe = recipe_from_dict(
        {
            "data": {"eval": str(tmp_path / "eval.npz")},
            "passes": [],  # the source itself is packaged: fp32, so a tight bound holds
            "package": {"name": "two", "version": "1.0.0", "atol": 1e-5},
        }
    )
    result = convert(model, recipe, tmp_path / "out")
    assert result.packaged is not None
    golden = load_golden(tmp_path / "out" / "package" / "golden.npz")
    assert list(golden.inputs) == ["x"] and list(golden.reference) == ["logits", "embedding"]
    expected = ort_outputs(model, dict(golden.inputs))
    for name, array in expected.items():
        np.testing.assert_allclose(golden.reference[name], array, rtol=1e-6, atol=1e-6)
    dest = tmp_path / "bundle"
    created = result.packaged.bundle
    verified = extract_bundle(created.path, dest, KeyRing([]), allow_unsigned=True)
    served = prepare_served_model(
        dest, verified.manifest, list(load_profile(PROFILE).candidates), profile=PROFILE
    )
    checks = {c.name: c for c in served.verdict.checks} if served.verdict else {}
    assert {"tolerance_ratio[logits]", "tolerance_ratio[embedding]"} <= set(checks)
    assert all(c.passed for c in checks.values())


@pytest.mark.parametrize(
    ("feeds", "fitted", "message"),
    [
        ({"x": np.zeros((3, 8, 8, 1))}, {"input": ((3, 64), "float32")}, None),  # 'x' = the only input
        ({"tokens": np.zeros((3, 8), np.int64), "mask": np.ones((3, 8), bool)}, None, None),
        ({"tokens": np.zeros((3, 8), np.float32)}, None, "the data has inputs \\['tokens'\\]"),
        ({"tokens": np.zeros((3, 8), np.float64), "mask": np.ones((3, 8), np.int32)}, None, "holds float64"),
        (
            {"tokens": np.zeros((3, 8), np.int32), "mask": np.ones((3, 5), np.int32)},
            None,
            "'mask': data samples",
        ),
    ],
)
def test_fit_feeds_keeps_dtypes_and_names_what_does_not_fit(feeds, fitted, message) -> None:  # type: ignore[no-untyped-def]
    from converter.errors import DataError
    from converter.feeds import InputSpec, fit_feeds

    specs = (
        [InputSpec("input", np.dtype("float32"), (64,))]
        if "x" in feeds
        else [InputSpec("tokens", np.dtype("int32"), (None,)), InputSpec("mask", np.dtype("int32"), (8,))]
    )
    if message is not None:
        with pytest.raises(DataError, match=message):
            fit_feeds(specs, feeds)
        return
    out = fit_feeds(specs, feeds)
    assert list(out) == [s.name for s in specs]
    for spec in specs:
        assert out[spec.name].dtype == spec.dtype
    if fitted:
        assert {k: (v.shape, v.dtype.name) for k, v in out.items()} == fitted
