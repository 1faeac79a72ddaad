"""``structured``, ``cluster`` and ``mixed``: smaller graphs, shared weights, int8 where it holds.

Every model runs in a real ONNX Runtime session. Structured pruning is checked for exactness by
making the channels it will remove dead first (zero weights and bias before a Relu: the channel
contributes nothing), so the pruned graph must compute what the source computes.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import flat
from edgeagent.cli.common import build_parser, run
from fleet.edgectl import COMMANDS, DESCRIPTION

onnx = pytest.importorskip("onnx", reason="needs the host extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="needs the host extra (onnxruntime)")


def edgectl(*argv: str | Path) -> int:
    """The exit status of ``edgectl ARGV`` (argparse's own refusals exit; they count too)."""
    try:
        return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0])


def initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def with_weights(source: Path, changes: dict[str, np.ndarray], out: Path) -> Path:
    from converter.onnx_torch import write_weights

    write_weights(source, changes, out)
    return out


def artifact(path: Path) -> Any:
    from converter.model import ModelArtifact

    return ModelArtifact(path, "onnx")


def bn_model(path: Path) -> Path:
    """Conv(1->8) -> BatchNorm -> Relu -> GlobalAveragePool -> Flatten -> MatMul + Add: the
    channel path through batch norm, a global pool, a Flatten and a MatMul with a bias Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "b": rng.normal(size=8).astype(np.float32),
        "scale": rng.uniform(0.5, 2, 8).astype(np.float32),
        "shift": rng.normal(size=8).astype(np.float32),
        "mean": rng.normal(size=8).astype(np.float32),
        "var": rng.uniform(0.5, 2, 8).astype(np.float32),
        "fc": rng.normal(size=(8, 10)).astype(np.float32),
        "fc_b": rng.normal(size=10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], "bn"),
        helper.make_node("Relu", ["n"], ["r"], "relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("MatMul", ["f", "fc"], ["m"], "fc"),
        helper.make_node("Add", ["m", "fc_b"], ["logits"], "fc_add"),
    ]
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ------------------------------------------------------------------------------ structured


def dead_fixture(model_dir: Path, name: str, tmp: Path) -> tuple[Path, dict[str, int]]:
    """The fixture with half of each hidden layer's channels dead (zero weights and bias)."""
    inits = initializers(model_dir / name)
    layers = {"mlp.onnx": ["fc1"], "cnn.onnx": ["conv1", "conv2"], "bn.onnx": []}[name]
    changes, kept = {}, {}
    for layer in layers:
        w, b = inits[f"{layer}.weight"].copy(), inits[f"{layer}.bias"].copy()
        w[1::2], b[1::2] = 0.0, 0.0
        changes.update({f"{layer}.weight": w, f"{layer}.bias": b})
        kept[f"{layer}.weight"] = len(w) - len(w[1::2])
    return with_weights(model_dir / name, changes, tmp / f"dead-{name}"), kept


@pytest.mark.parametrize("name", ["mlp.onnx", "cnn.onnx"])
def test_structured_removes_dead_channels_and_computes_the_same(
    tmp_path: Path, model_dir: Path, digits: Any, name: str
) -> None:
    from converter.passes.structured import StructuredConfig, StructuredPass

    source, kept = dead_fixture(model_dir, name, tmp_path)
    out = StructuredPass(StructuredConfig(fraction=0.5)).run(artifact(source), tmp_path)
    x = flat(digits.x_test) if name == "mlp.onnx" else digits.x_test
    np.testing.assert_allclose(outputs(out.model.path, x), outputs(source, x), rtol=1e-5, atol=1e-5)
    after = initializers(out.model.path)
    for weight, channels in kept.items():
        assert after[weight].shape[0] == channels
    assert out.model.path.stat().st_size < source.stat().st_size
    # The logits layer is never pruned: its channels are the graph's output.
    assert any("graph output" in reason for reason in out.details["unprunable"].values())


def test_structured_through_batchnorm_pool_and_matmul(tmp_path: Path) -> None:
    from converter.passes.structured import StructuredConfig, StructuredPass

    source = bn_model(tmp_path / "bn.onnx")
    inits = initializers(source)
    # Channels 1, 3, 5, 7: smallest filters, and nothing downstream reads them.
    w, fc = inits["w"].copy(), inits["fc"].copy()
    w[1::2] *= 1e-3
    fc[1::2] = 0.0
    dead = with_weights(source, {"w": w, "fc": fc}, tmp_path / "dead.onnx")
    out = StructuredPass(StructuredConfig(fraction=0.5, criterion="l2")).run(artifact(dead), tmp_path)
    after = initializers(out.model.path)
    assert {n: after[n].shape[0] for n in ("w", "b", "scale", "shift", "mean", "var", "fc")} == dict.fromkeys(
        ("w", "b", "scale", "shift", "mean", "var", "fc"), 4
    )
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(out.model.path, x), outputs(dead, x), rtol=1e-5, atol=1e-5)


def test_structured_through_a_depthwise_conv(tmp_path: Path) -> None:
    """Conv(1->8) -> Relu -> depthwise Conv(group 8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    (MobileNet's pattern): a channel takes its depthwise filter along and the group count follows."""
    from onnx import TensorProto, helper, numpy_helper

    from converter.passes.structured import StructuredConfig, StructuredPass

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "b": rng.normal(size=8).astype(np.float32),
        "dw": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "dw_b": rng.normal(size=8).astype(np.float32),
        "fc": rng.normal(size=(10, 8)).astype(np.float32),
        "fc_b": rng.normal(size=10).astype(np.float32),
    }
    arrays["w"][1::2] *= 1e-3  # the least important filters ...
    arrays["fc"][:, 1::2] = 0.0  # ... whose channels nothing downstream reads
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "dw", "dw_b"], ["d"], "dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )  # fmt: skip
    source = tmp_path / "dw.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    out = StructuredPass(StructuredConfig(fraction=0.5)).run(artifact(source), tmp_path)
    after = initializers(out.model.path)
    assert after["dw"].shape == (4, 1, 3, 3) and after["fc"].shape == (10, 4)
    group = next(a.i for n in onnx.load(str(out.model.path)).graph.node if n.name == "dw" for a in n.attribute
                 if a.name == "group")  # fmt: skip
    assert group == 4
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(out.model.path, x), outputs(source, x), rtol=1e-5, atol=1e-5)


def test_structured_sensitivity_scan_leaves_sensitive_layers_whole(tmp_path: Path, model_dir: Path) -> None:
    from converter.data import DataConfig, load_data
    from converter.evaluate import EvaluateConfig, Evaluator
    from converter.passes import PassContext
    from converter.passes.structured import StructuredConfig, StructuredPass

    data = load_data(DataConfig(dataset="digits"))
    evaluator = Evaluator(data, EvaluateConfig(latency_runs=1, latency_warmup=0))
    source = artifact(model_dir / "cnn.onnx")
    ctx = PassContext(data=data, evaluator=evaluator, baseline=evaluator.evaluate(source).metrics)
    out = StructuredPass(StructuredConfig(fraction=0.75, sensitivity_max_drop=0.02), ctx).run(
        source, tmp_path
    )
    layers = out.details["layers"]
    assert len(layers) == 2
    for layer in layers.values():
        pruned = layer["channels_after"] < layer["channels_before"]
        assert pruned == (layer["sensitivity_drop"] <= 0.02)


def test_structured_without_a_prunable_layer_is_one_line(
    tmp_path: Path, model_dir: Path, capsys: Any
) -> None:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], "only", transB=1)], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.ones((10, 64), np.float32), "w")],
    )  # fmt: skip
    model = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    rc = edgectl("convert", model, "--dataset", "digits", "--structured", "0.5", "--name", "m",
                 "--version", "1.0.0", "--unsigned", "-o", tmp_path / "o")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no layer can lose channels" in err and "graph output" in err


@pytest.mark.torch
def test_structured_then_finetune_from_the_command_line(tmp_path: Path, model_dir: Path) -> None:
    pytest.importorskip("torch", reason="needs the torch extra")
    rc = edgectl("convert", model_dir / "cnn.onnx", "--dataset", "digits", "--structured", "0.5",
                 "--finetune", "5", "--name", "m", "--version", "1.0.0", "--unsigned",
                 "-o", tmp_path / "o")  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert names == ["structured", "finetune"]
    source, final = report["baseline"], report["steps"][-1]["after"]
    assert final["accuracy"] >= source["accuracy"] - 0.01
    assert final["size_bytes"] < source["size_bytes"] / 1.5


# ------------------------------------------------------------------------------ cluster


def test_kmeans_keeps_zeros_and_at_most_k_values() -> None:
    from converter.passes.cluster import kmeans_1d

    values = np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32)
    values[values < 0.2] = 0.0
    codebook, index = kmeans_1d(values, 16, preserve_zeros=True)
    assert codebook.size <= 16 and codebook[0] == 0.0
    assert np.array_equal(codebook[index] == 0, values == 0)
    assert np.sqrt(np.mean((codebook[index] - values) ** 2)) < 0.05 * np.abs(values).max()


def test_cluster_is_what_onnxruntime_runs_and_transfers_smaller(
    tmp_path: Path, model_dir: Path, digits: Any
) -> None:
    from converter.passes.cluster import ClusterConfig, ClusterPass

    source = artifact(model_dir / "mlp.onnx")
    out = ClusterPass(ClusterConfig(clusters=16)).run(source, tmp_path)
    inits = initializers(out.model.path)
    for name in out.details["clustered"]:
        assert inits[f"{name}__indices"].dtype == np.uint8 and inits[f"{name}__codebook"].size <= 16
        assert name not in inits
    # ORT must compute exactly the dense model with the shared values in place.
    dense = {n: inits[f"{n}__codebook"][inits[f"{n}__indices"]] for n in out.details["clustered"]}
    expanded = with_weights(source.path, dense, tmp_path / "expanded.onnx")
    x = flat(digits.x_test)
    np.testing.assert_allclose(outputs(out.model.path, x), outputs(expanded, x), rtol=1e-6, atol=1e-6)
    xz = [
        len(lzma.compress(p.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
        for p in (source.path, out.model.path)
    ]
    assert xz[1] < xz[0] / 3


@pytest.mark.torch
def test_finetune_after_cluster_trains_codebooks_with_assignments_fixed(
    tmp_path: Path, model_dir: Path
) -> None:
    pytest.importorskip("torch", reason="needs the torch extra")
    rc = edgectl("convert", model_dir / "mlp.onnx", "--dataset", "digits", "--prune", "0.7",
                 "--cluster", "8", "--finetune", "3", "--name", "m", "--version", "1.0.0", "--unsigned",
                 "-o", tmp_path / "o")  # fmt: skip
    assert rc == 0
    arts = tmp_path / "o" / "artifacts"
    clustered, tuned = initializers(arts / "mlp-p70-ft-c8.onnx"), initializers(arts / "mlp-p70-ft-c8-ft.onnx")
    for name in ("fc1.weight", "fc2.weight"):
        assert np.array_equal(clustered[f"{name}__indices"], tuned[f"{name}__indices"])
        assert tuned[f"{name}__codebook"][0] == 0.0  # the pruned weights' centroid
        assert not np.array_equal(clustered[f"{name}__codebook"], tuned[f"{name}__codebook"])


# ------------------------------------------------------------------------------ mixed


def test_mixed_keeps_the_layer_int8_breaks_in_fp32(tmp_path: Path, model_dir: Path, digits: Any) -> None:
    """fc1 gets one huge weight on pixel 0, which is 0 in every digit: the float model is unchanged,
    but one per-tensor int8 scale for fc1 rounds every other weight of it to zero."""
    assert not flat(digits.x_test)[:, 0].any() and not flat(digits.x_calib)[:, 0].any()
    w = initializers(model_dir / "mlp.onnx")["fc1.weight"].copy()
    w[0, 0] = 1000.0
    model = with_weights(model_dir / "mlp.onnx", {"fc1.weight": w}, tmp_path / "outlier.onnx")
    rc = edgectl("convert", model, "--dataset", "digits", "--max-drop", "0.01", "--mixed-precision",
                 "--name", "m", "--version", "1.0.0", "--unsigned", "-o", tmp_path / "o")  # fmt: skip
    assert rc == 0
    step = json.loads((tmp_path / "o" / "report.json").read_text())["steps"][0]
    details = step["details"]
    fc1 = next(n for n in details["sensitivity"] if "fc1" in n)
    assert details["sensitivity"][fc1] > 0.3
    assert details["fp32_nodes"] == [fc1]
    final = Path(tmp_path / "o" / "artifacts" / "outlier-mixed.onnx")
    ops = [n.op_type for n in onnx.load(str(final)).graph.node]
    assert "DequantizeLinear" in ops
    assert step["after"]["accuracy"] >= step["before"]["accuracy"] - 0.01


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "16", "--quantize", "int8"], "--cluster stores float codebooks"),
        (["--cluster", "300"], "expected 2-256"),
        (["--finetune", "3"], "--finetune retrains a compressed model: give --prune SPARSITY too"),
        (["--mixed-precision"], "--mixed-precision chooses layers within a budget"),
        (["--structured-criterion", "l2"], "--structured-criterion applies to --structured"),
        (["--structured", "1.0"], "not a fraction in [0, 1)"),
    ],
)
def test_bad_flags_are_one_line(
    tmp_path: Path, model_dir: Path, capsys: Any, argv: list[str], message: str
) -> None:
    rc = edgectl("convert", model_dir / "mlp.onnx", "--dataset", "digits", *argv, "--name", "m",
                 "--version", "1.0.0", "--unsigned", "-o", tmp_path / "o")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_clustered_bundle_passes_acceptance_on_the_device_runtime(
    tmp_path: Path, model_dir: Path, keypair: Any
) -> None:
    """The device needs nothing new: its ONNX Runtime adapter loads the indices + codebook graph
    (ORT expands it at load) and the artifact passes its own gate on the bundle's golden set."""
    from edgeagent.acceptance import load_golden, run_acceptance
    from edgeagent.bundle.reader import extract_bundle
    from edgeagent.runtimes import LoadOptions, load_model
    from edgeagent.signing import KeyRing

    out = tmp_path / "o"
    rc = edgectl("convert", model_dir / "mlp.onnx", "--dataset", "digits", "--cluster", "16", "--name", "m",
                 "--version", "1.0.0", "--key", keypair.private, "-o", out)  # fmt: skip
    assert rc == 0
    dest = tmp_path / "extracted"
    manifest = extract_bundle(next(out.glob("*.bundle")), dest, KeyRing.from_paths([keypair.public])).manifest
    (entry,) = manifest.models
    assert entry.path.endswith("-c16.onnx")
    golden = load_golden(dest / "acceptance" / "golden.npz")
    model = load_model(dest / entry.path, "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))
    try:
        verdict = run_acceptance(model, entry.acceptance or manifest.acceptance, golden)
    finally:
        model.close()
    assert verdict.passed, verdict.reason


def test_cluster_can_be_followed_only_by_finetune(tmp_path: Path, model_dir: Path, capsys: Any) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[data]\ndataset = "digits"\n[[passes]]\ntype = "cluster"\nclusters = 16\n'
        '[[passes]]\ntype = "quantize"\n[package]\nname = "m"\nversion = "1.0.0"\n'
    )
    rc = edgectl("convert", model_dir / "mlp.onnx", "--recipe", recipe, "--unsigned", "-o", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cluster can be followed only by finetune, not quantize" in err
