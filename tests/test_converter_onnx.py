"""``edgectl convert`` on ONNX models, end to end, checked against independent evaluations.

Every number the report gives for an artifact is recomputed here from the bundle's own
files with onnxruntime directly, not through the converter's evaluator.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import flat
from edgeagent.bundle.golden import load_golden
from edgeagent.bundle.reader import extract_bundle
from edgeagent.cli.common import build_parser, run
from edgeagent.signing import KeyRing
from fleet.edgectl import COMMANDS, DESCRIPTION
from tests.int8_support import LEVELS, run_level
from tests.test_int8_portability import gemm_error_bound

onnx = pytest.importorskip("onnx", reason="needs the host extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="needs the host extra (onnxruntime)")


def edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


def session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    s = session(path)
    shape = s.get_inputs()[0].shape
    x = x.reshape(len(x), *[int(d) for d in shape[1:]]) if all(isinstance(d, int) for d in shape[1:]) else x
    return np.asarray(s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0])


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def unpack(out: Path, public: Path, tmp: Path) -> tuple[Any, Path, dict[str, Any]]:
    bundles = sorted(out.glob("*.bundle"))
    assert len(bundles) == 1
    dest = tmp / "extracted"
    verified = extract_bundle(bundles[0], dest, KeyRing.from_paths([public]))
    report = json.loads((out / "report.json").read_text())
    return verified.manifest, dest, report


def check_report_against_artifacts(report: dict[str, Any], manifest: Any, dest: Path, digits: Any) -> None:
    """Accuracy, size and transfer size of each packaged artifact, recomputed independently."""
    by_artifact = {s["artifact"]: s["after"] for s in report["steps"]}
    by_artifact.setdefault(Path(report["source"]["path"]).name, report["baseline"])
    for model in manifest.models:
        path = dest / model.path
        measured = by_artifact[path.name]
        accuracy = float(np.mean(logits(path, digits.x_test).argmax(1) == digits.y_test))
        assert measured["accuracy"] == pytest.approx(accuracy, abs=1e-9), path.name
        assert measured["size_bytes"] == path.stat().st_size
        assert measured["transfer_bytes"] == len(
            lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME)
        )
    steps = {s.name: s for s in manifest.compression}
    for step in report["steps"]:
        assert steps[step["name"]].accuracy_after == step["after"]["accuracy"]
        assert steps[step["name"]].size_after == step["after"]["size_bytes"]


def check_golden_and_gate(manifest: Any, dest: Path, source: Path) -> None:
    """The acceptance set carries the source model's outputs, and every artifact passes its gate."""
    loaded = load_golden(dest / "acceptance" / "golden.npz")
    assert list(loaded.inputs) == ["input"] and list(loaded.reference) == ["logits"]  # named as in the model
    golden = {
        "inputs": loaded.inputs["input"],
        "labels": loaded.labels,
        "reference": loaded.reference["logits"],
    }
    np.testing.assert_allclose(golden["reference"], logits(source, golden["inputs"]), rtol=1e-5, atol=1e-5)
    gate = manifest.acceptance
    assert gate.samples == len(golden["inputs"]) == 100
    for model in manifest.models:
        out = logits(dest / model.path, golden["inputs"])
        accuracy = float(np.mean(out.argmax(1) == golden["labels"]))
        agreement = float(np.mean(out.argmax(1) == golden["reference"].argmax(1)))
        assert gate.min_accuracy is not None and gate.min_top1_agreement is not None
        assert gate.min_accuracy <= accuracy
        assert gate.min_top1_agreement <= agreement
    worst = min(
        float(np.mean(logits(dest / m.path, golden["inputs"]).argmax(1) == golden["labels"]))
        for m in manifest.models
    )
    assert gate.min_accuracy == pytest.approx(worst - 0.02, abs=1e-4)


def test_onnx_mlp_prune_and_static_int8(
    tmp_path: Path, model_dir: Path, keypair: Any, digits: Any, capsys: Any
) -> None:
    out = tmp_path / "out"
    rc = edgectl(
        "convert", model_dir / "mlp.onnx", "--dataset", "digits", "--prune", "0.5", "--quantize", "int8",
        "--per-channel", "--name", "digits-mlp", "--version", "1.0.0", "--key", keypair.private, "-o", out,
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "digits-mlp-1.0.0.bundle" in capsys.readouterr().out
    manifest, dest, report = unpack(out, keypair.public, tmp_path)
    assert [m.path for m in manifest.models] == ["models/mlp-p50.onnx", "models/mlp-p50-int8pc.onnx"]
    assert [m.precision for m in manifest.models] == ["fp32", "int8"]
    check_report_against_artifacts(report, manifest, dest, digits)
    check_golden_and_gate(manifest, dest, model_dir / "mlp.onnx")

    # Pruning: achieved sparsity per tensor, recomputed; biases untouched; |kept| > threshold.
    source = {
        i.name: onnx.numpy_helper.to_array(i)
        for i in onnx.load(str(model_dir / "mlp.onnx")).graph.initializer
    }
    pruned_path = dest / "models" / "mlp-p50.onnx"
    pruned = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(pruned_path)).graph.initializer}
    tensors = report["steps"][0]["details"]["tensors"]
    assert set(tensors) == {"fc1.weight", "fc2.weight"}
    for name, row in tensors.items():
        assert row["sparsity"] == pytest.approx(float(np.mean(pruned[name] == 0)))
        kept = pruned[name] != 0
        np.testing.assert_array_equal(pruned[name][kept], source[name][kept])
    for name in ("fc1.bias", "fc2.bias"):
        np.testing.assert_array_equal(pruned[name], source[name])
    zeros = sum(int((pruned[n] == 0).sum()) for n in tensors)
    assert zeros / sum(pruned[n].size for n in tensors) == pytest.approx(0.5, abs=1e-3)
    assert report["steps"][0]["sparsity"] == pytest.approx(0.5, abs=1e-3)

    # Static QDQ int8: quantize/dequantize pairs, int8 weights, and it tracks the float model.
    int8_path = dest / "models" / "mlp-p50-int8pc.onnx"
    counts = op_counts(int8_path)
    assert counts.get("QuantizeLinear", 0) >= 2 and counts.get("DequantizeLinear", 0) >= 4
    agree = np.mean(
        logits(int8_path, digits.x_test).argmax(1) == logits(pruned_path, digits.x_test).argmax(1)
    )
    assert agree >= 0.97
    assert (out / "report.md").read_text().count("| prune |") == 1
    assert (out / "report.svg").read_text().startswith("<svg")  # report.png: tests/test_converter_chart.py


def test_onnx_cnn_from_recipe(tmp_path: Path, model_dir: Path, keypair: Any, digits: Any) -> None:
    recipe = tmp_path / "cnn.toml"
    recipe.write_text(
        '[data]\ndataset = "digits"\n'
        '[[passes]]\ntype = "prune"\nsparsity = 0.3\nscope = "per_layer"\n'
        '[[passes]]\ntype = "quantize"\nmode = "dynamic"\n'
        '[package]\nname = "digits-cnn"\nversion = "2.0.0"\nartifacts = "last"\nmin_accuracy = 0.5\n'
    )
    out = tmp_path / "out"
    assert (
        edgectl("convert", model_dir / "cnn.onnx", "--recipe", recipe, "--key", keypair.private, "-o", out)
        == 0
    )
    manifest, dest, report = unpack(out, keypair.public, tmp_path)
    assert [m.path for m in manifest.models] == ["models/cnn-p30-dynint8.onnx"]
    assert manifest.acceptance.min_accuracy == 0.5  # the override wins
    check_report_against_artifacts(report, manifest, dest, digits)
    for row in report["steps"][0]["details"]["tensors"].values():
        assert row["sparsity"] == pytest.approx(0.3, abs=0.01)  # per layer: every tensor at the target
    assert op_counts(dest / manifest.models[0].path).get("DynamicQuantizeLinear", 0) >= 1


@pytest.mark.parametrize(
    ("mode", "per_channel", "calibration", "quant_ops"),
    [
        ("static", False, "minmax", {"QuantizeLinear", "DequantizeLinear"}),
        ("static", True, "entropy", {"QuantizeLinear", "DequantizeLinear"}),
        ("static", False, "percentile", {"QuantizeLinear", "DequantizeLinear"}),
        ("dynamic", False, "minmax", {"DynamicQuantizeLinear"}),
        ("fp16", False, "minmax", {"Cast"}),
    ],
)
def test_quantize_modes_track_the_float_model(
    tmp_path: Path,
    model_dir: Path,
    digits: Any,
    mode: str,
    per_channel: bool,
    calibration: str,
    quant_ops: set[str],
) -> None:
    from converter.data import Dataset
    from converter.model import ModelArtifact
    from converter.passes import PassContext
    from converter.passes.quantize import QuantizeConfig, QuantizePass

    data = Dataset(inputs={"x": digits.x_test}, y=digits.y_test, calib={"x": digits.x_calib}, source="digits")
    config = QuantizeConfig(mode=mode, per_channel=per_channel, calibration=calibration)  # type: ignore[arg-type]
    output = QuantizePass(config, PassContext(data=data)).run(
        ModelArtifact(model_dir / "cnn.onnx", "onnx"), tmp_path
    )
    assert quant_ops <= set(op_counts(output.model.path))
    ref = logits(model_dir / "cnn.onnx", digits.x_test)
    got = logits(output.model.path, digits.x_test)
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.97
    tolerance = 1e-2 if mode == "fp16" else 0.5
    np.testing.assert_allclose(got, ref, atol=tolerance * np.abs(ref).max())


@pytest.mark.parametrize("level", LEVELS)
def test_old_opset_is_upgraded_before_static_int8(tmp_path: Path, level: str) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from converter.data import Dataset
    from converter.model import ModelArtifact
    from converter.passes import PassContext
    from converter.passes.quantize import QuantizeConfig, QuantizePass

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["y"], name="add"),
        ],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    source = tmp_path / "old.onnx"
    onnx.save(model, str(source))
    x = rng.normal(size=(64, 8)).astype(np.float32)
    data = Dataset(inputs={"x": x}, y=np.zeros(64, dtype=np.int64), calib={"x": x}, source="random")
    output = QuantizePass(QuantizeConfig(), PassContext(data=data)).run(
        ModelArtifact(source, "onnx"), tmp_path
    )
    assert "opset 11 upgraded to 13" in output.notes
    upgraded = onnx.load(str(output.model.path))
    assert next(o.version for o in upgraded.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert "QuantizeLinear" in op_counts(output.model.path)
    # Within the quantized model's own worst-case error, at either ORT optimisation level (the
    # fused int8 kernels saturated on x86 without VNNI with 8-bit weights: 1.09 off).
    error = np.abs(run_level(output.model.path, x, level) - logits(source, x)).max()
    assert error <= gemm_error_bound(output.model.path, x)


def test_max_drop_size_objective_keeps_the_smallest_accepted_candidate(
    tmp_path: Path, model_dir: Path, keypair: Any, digits: Any
) -> None:
    out = tmp_path / "out"
    rc = edgectl(
        "convert", model_dir / "mlp.onnx", "--dataset", "digits", "--max-drop", "0.01", "--objective", "size",
        "--name", "m", "--version", "1.0.0", "--key", keypair.private, "-o", out,
    )  # fmt: skip
    assert rc == 0
    manifest, dest, report = unpack(out, keypair.public, tmp_path)
    step = report["steps"][0]
    candidates = step["details"]["candidates"]
    accepted = [c for c in candidates if c["verdict"] != "refused"]
    within = [c for c in candidates if c["drop"] <= 0.01 + 1e-9]
    assert within and all(c in within for c in accepted)
    baseline = float(np.mean(logits(model_dir / "mlp.onnx", digits.x_test).argmax(1) == digits.y_test))
    shipped = float(np.mean(logits(dest / manifest.models[0].path, digits.x_test).argmax(1) == digits.y_test))
    assert baseline - shipped <= 0.01 + 1e-9
    assert len(manifest.models) == 1
    check_report_against_artifacts(report, manifest, dest, digits)
    if step["details"]["chosen"] is None:
        # int8 kernels can be slower than float on tiny models: then every candidate is refused.
        assert not accepted and manifest.models[0].path == "models/mlp.onnx"
        return
    chosen = candidates[step["details"]["chosen"]]
    assert chosen["size_bytes"] == min(c["size_bytes"] for c in accepted)
    assert manifest.models[0].precision == "int8"


def test_max_drop_that_cannot_be_met_keeps_the_float_model(
    tmp_path: Path, model_dir: Path, keypair: Any, digits: Any, capsys: Any
) -> None:
    # Samples on which the float model barely prefers its top class, labelled with that class:
    # the float model scores 100% and any int8 rounding flips some of them.
    rng = np.random.default_rng(0)
    pool = np.concatenate([flat(digits.x_test), rng.uniform(0, 1, size=(3000, 64)).astype(np.float32)])
    out_float = logits(model_dir / "mlp.onnx", pool)
    top2 = np.sort(out_float, axis=1)[:, -2:]
    ties = np.argsort(top2[:, 1] - top2[:, 0])[:80]
    np.savez(tmp_path / "eval.npz", x=pool[ties], y=out_float[ties].argmax(1).astype(np.int64))
    np.savez(tmp_path / "calib.npz", x=flat(digits.x_calib))
    out = tmp_path / "out"
    rc = edgectl(
        "convert", model_dir / "mlp.onnx", "--eval", tmp_path / "eval.npz", "--calib", tmp_path / "calib.npz",
        "--max-drop", "0", "--name", "m", "--version", "1.0.0", "--key", keypair.private, "-o", out,
    )  # fmt: skip
    assert rc == 0
    assert "kept the float model" in capsys.readouterr().out
    manifest, dest, report = unpack(out, keypair.public, tmp_path)
    assert [m.path for m in manifest.models] == ["models/mlp.onnx"]
    assert (dest / "models" / "mlp.onnx").read_bytes() == (model_dir / "mlp.onnx").read_bytes()
    step = report["steps"][0]
    assert step["details"]["chosen"] is None
    assert all(c["drop"] > 0 for c in step["details"]["candidates"])
    assert any(c["excluded_nodes"] for c in step["details"]["candidates"])  # it tried leaving nodes in float


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--name", "m", "--version", "1.0.0"], "give --eval FILE.npz or --dataset digits"),
        (["--dataset", "digits", "--tflite", "--name", "m", "--version", "1.0.0"],
         "ONNX -> TFLite is not supported"),
        (["--dataset", "digits", "--name", "m"], "--name and --version are required"),
        (["--dataset", "digits", "--name", "m", "--version", "one"], "not a semantic version"),
        (["--eval", "missing.npz", "--name", "m", "--version", "1.0.0"], "missing.npz: no such data file"),
        (["--dataset", "digits", "--quantize", "fp16", "--max-drop", "0.01", "--name", "m", "--version", "1"],
         "cannot be combined with --quantize fp16"),
        (["--dataset", "digits", "--objective", "size", "--name", "m", "--version", "1"],
         "--objective ranks the candidates of --max-drop"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(
    tmp_path: Path, model_dir: Path, keypair: Any, capsys: Any, argv: list[str], message: str
) -> None:
    rc = edgectl("convert", model_dir / "mlp.onnx", *argv, "--key", keypair.private, "-o", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_unknown_model_type_is_one_line(tmp_path: Path, keypair: Any, capsys: Any) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    rc = edgectl(
        "convert",
        model,
        "--dataset",
        "digits",
        "--name",
        "m",
        "--version",
        "1.0.0",
        "--unsigned",
        "-o",
        tmp_path / "out",
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "unknown model type .pt" in err
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


def test_regression_package_bounds_outputs_not_accuracy(tmp_path: Path, model_dir: Path, digits: Any) -> None:
    from converter.api import convert
    from converter.recipe import recipe_from_dict

    x = flat(digits.x_test)
    np.savez(tmp_path / "eval.npz", x=x, y=logits(model_dir / "mlp.onnx", x) + 0.1)
    recipe = recipe_from_dict(
        {
            "data": {"eval": str(tmp_path / "eval.npz")},
            "evaluate": {"task": "regression"},
            "passes": [{"type": "quantize", "mode": "fp16"}],
            "package": {"name": "reg", "version": "1.0.0", "atol": 0.05},
        }
    )
    result = convert(model_dir / "mlp.onnx", recipe, tmp_path / "out")
    assert result.pipeline.baseline.mse == pytest.approx(0.01, rel=1e-4)
    assert result.packaged is not None
    gate = result.packaged.gate
    assert (gate.min_accuracy, gate.min_top1_agreement, gate.atol) == (None, None, 0.05)
    assert result.packaged.bundle.manifest.models[0].precision == "fp16"
    golden = np.load(tmp_path / "out" / "package" / "golden.npz")
    assert "labels" not in golden.files


def test_max_drop_fails_when_pruning_already_spent_the_budget(
    tmp_path: Path, model_dir: Path, keypair: Any, capsys: Any
) -> None:
    rc = edgectl(
        "convert", model_dir / "mlp.onnx", "--dataset", "digits", "--prune", "0.95", "--max-drop", "0.001",
        "--name", "m", "--version", "1.0.0", "--key", keypair.private, "-o", tmp_path / "out",
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "search: the model entering the search is already" in err
    assert not list((tmp_path / "out").glob("*.bundle"))


def test_sparse_storage_shrinks_the_file_not_the_outputs(
    tmp_path: Path, model_dir: Path, keypair: Any, digits: Any
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[data]\ndataset = "digits"\n'
        '[[passes]]\ntype = "prune"\nsparsity = 0.9\n'
        '[[passes]]\ntype = "sparsify"\n'
        '[package]\nname = "sparse"\nversion = "1.0.0"\nartifacts = "final"\n'
    )
    out = tmp_path / "out"
    assert (
        edgectl("convert", model_dir / "mlp.onnx", "--recipe", recipe, "--key", keypair.private, "-o", out)
        == 0
    )
    manifest, dest, report = unpack(out, keypair.public, tmp_path)
    sparse = dest / manifest.models[0].path
    dense = out / "artifacts" / "mlp-p90.onnx"
    graph = onnx.load(str(sparse)).graph
    assert {s.values.name for s in graph.sparse_initializer} == {"fc1.weight", "fc2.weight"}
    assert sparse.stat().st_size < dense.stat().st_size / 2.5
    np.testing.assert_array_equal(logits(sparse, digits.x_test), logits(dense, digits.x_test))
    assert manifest.models[0].precision == "fp32"
    check_report_against_artifacts(report, manifest, dest, digits)


def test_sparsify_must_be_last(tmp_path: Path, model_dir: Path, capsys: Any) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[data]\ndataset = "digits"\n[[passes]]\ntype = "sparsify"\n[[passes]]\ntype = "quantize"\n'
    )
    rc = edgectl("convert", model_dir / "mlp.onnx", "--recipe", recipe, "--name", "s", "--version", "1.0.0",
                 "--unsigned", "-o", tmp_path / "out")  # fmt: skip
    assert rc == 2
    assert "passes[0]: sparsify must be the last pass" in capsys.readouterr().err


def test_an_artifact_that_lost_most_of_its_accuracy_is_a_warning(
    tmp_path: Path, model_dir: Path, capsys: Any
) -> None:
    """Seen on a real classifier: default int8 took top-1 from 100% to 25% and shipped with a gate
    derived from the 25%, silently. Pruning 98% of the digits MLP loses accuracy the same way."""
    out = tmp_path / "out"
    argv = ["convert", model_dir / "mlp.onnx", "--dataset", "digits", "--prune", "0.98"]
    assert edgectl(*argv, "--name", "d", "--version", "1.0.0", "--unsigned", "-o", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    before, after = report["baseline"]["accuracy"], report["steps"][-1]["after"]["accuracy"]
    assert before - after > 0.05
    (warning,) = [w for w in report["warnings"] if "points lost" in w]
    # (a "slower than" reason may come first: single-sample timing noise on a loaded machine)
    assert warning.startswith("mlp-p98.onnx: ")
    assert f"top-1 {after:.2%} against {before:.2%} for the source mlp.onnx" in warning
    assert f"warning: {warning}" in capsys.readouterr().out
