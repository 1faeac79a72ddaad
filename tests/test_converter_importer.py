"""The ONNX -> torch importer (``converter/onnx_torch.py``) on the operators small models are made of.

Each case is a small torch module exported to ONNX; the imported module must compute what ONNX
Runtime computes on the same graph, and the graph must contain the operators the case is about.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.lazy_imports import lazy, needs

torch = lazy("torch")
pytestmark = [pytest.mark.torch, needs("torch", "needs the torch extra: pip install 'edgeagent[torch]'")]
onnx = pytest.importorskip("onnx", reason="needs the host extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="needs the host extra (onnxruntime)")


def residual() -> Any:
    """Add and Mul of two branches, a Clip (ReLU6), a view-style Reshape."""
    nn = torch.nn

    class Residual(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: Any) -> Any:
            x = x.view(x.shape[0], -1)
            return torch.sigmoid(self.a(x) + x * self.b(x)).clamp(0.0, 6.0).softmax(-1)

    return Residual()


def conv_stack() -> Any:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.MaxPool2d(2, stride=1, padding=1),
        nn.AvgPool2d(2, padding=1),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def mlp_batch_norm() -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


CASES: list[tuple[str, Callable[[], Any], tuple[int, ...], set[str]]] = [
    (
        "conv-bn-pools",
        conv_stack,
        (2, 10, 10),
        {"Conv", "BatchNormalization", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm"},
    ),
    ("mlp-bn", mlp_batch_norm, (4, 4), {"Flatten", "BatchNormalization", "Relu", "Gemm"}),
    ("residual", residual, (4, 4), {"Reshape", "Add", "Mul", "Sigmoid", "Clip", "Softmax"}),
]


def export(module: Any, sample: tuple[int, ...], path: Path) -> Path:
    """Export with batch-norm statistics kept as BatchNormalization nodes (not folded into Conv)."""
    torch.manual_seed(0)
    module.eval()
    for m in module.modules():  # non-trivial statistics, so that using them wrongly shows
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (torch.zeros(2, *sample),), str(path), input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False,
            do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
        )  # fmt: skip
    return path


@pytest.mark.parametrize(("name", "factory", "sample", "ops"), CASES, ids=[c[0] for c in CASES])
def test_imported_module_matches_onnxruntime(
    tmp_path: Path, name: str, factory: Callable[[], Any], sample: tuple[int, ...], ops: set[str]
) -> None:
    from converter.onnx_torch import onnx_module
    from converter.training import predict

    torch.manual_seed(1)
    path = export(factory(), sample, tmp_path / f"{name}.onnx")
    found = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= found, f"the export lacks {ops - found}"
    x = np.random.default_rng(0).normal(size=(16, *sample)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    module = onnx_module(path)
    np.testing.assert_allclose(predict(module, x), expected, rtol=1e-4, atol=1e-5)
    # Batch-norm statistics are constants; its scale and shift are weights that train.
    names = set(module.named_weights())
    assert not any(n.endswith(("running_mean", "running_var")) for n in names)
    if "BatchNormalization" in ops:
        assert any(n.endswith("weight") for n in names)


def test_asymmetric_conv_padding(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from converter.onnx_torch import onnx_module
    from converter.training import predict

    weight = np.random.default_rng(0).normal(size=(3, 1, 2, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 1, 0], kernel_shape=[2, 2])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    path = tmp_path / "pad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(1).normal(size=(2, 1, 5, 5)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(predict(onnx_module(path), x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("op", "plural"), [(["Erf"], "operator Erf"), (["Erf", "Einsum"], "operators Einsum, Erf")]
)
def test_unsupported_operators_are_named_in_one_line(tmp_path: Path, op: list[str], plural: str) -> None:
    from onnx import TensorProto, helper

    from converter.errors import ModelLoadError
    from converter.onnx_torch import onnx_module

    nodes = [helper.make_node("Erf", ["x"], ["e"])]
    if "Einsum" in op:
        nodes.append(helper.make_node("Einsum", ["e", "e"], ["y"], equation="ij,ij->ij"))
    else:
        nodes.append(helper.make_node("Identity", ["e"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(ModelLoadError, match=f"cannot train through {plural} \\(supported: Add, ") as info:
        onnx_module(tmp_path / "m.onnx")
    assert "\n" not in str(info.value)
