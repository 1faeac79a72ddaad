"""An ONNX graph as a trainable torch module, and its trained weights written back to the graph.

The module interprets the graph node by node with torch operators; every float initializer
becomes a ``torch.nn.Parameter``. Training changes only those values, so the graph written back
is the input graph with new initializer values: same nodes, names and opset, nothing re-exported.
Covers the operators of MLPs and small CNNs (Gemm, MatMul, Add, Relu, Conv, MaxPool, Transpose,
Flatten, Reshape, ...); any other operator is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converter import extras
from converter.errors import ModelLoadError
from converter.model import check_one_input, load_onnx


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _symmetric_pads(pads: list[int], op: str) -> list[int]:
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):
        raise ModelLoadError(f"{op} with asymmetric pads {pads} is not supported for training")
    return list(pads[:half])


def _ops() -> dict[str, Callable[[list[Any], dict[str, Any]], Any]]:
    torch = extras.torch()
    functional = torch.nn.functional

    def gemm(i: list[Any], a: dict[str, Any]) -> Any:
        x, w = i[0], i[1]
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (x @ w)
        return y + a.get("beta", 1.0) * i[2] if len(i) > 2 and i[2] is not None else y

    def conv(i: list[Any], a: dict[str, Any]) -> Any:
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ModelLoadError("Conv with auto_pad is not supported for training")
        pads = _symmetric_pads(a.get("pads", [0, 0, 0, 0]), "Conv")
        return functional.conv2d(
            i[0],
            i[1],
            i[2] if len(i) > 2 else None,
            stride=a.get("strides", 1),
            padding=pads,
            dilation=a.get("dilations", 1),
            groups=a.get("group", 1),
        )

    def pool(kind: str) -> Callable[[list[Any], dict[str, Any]], Any]:
        def run(i: list[Any], a: dict[str, Any]) -> Any:
            kernel = a["kernel_shape"]
            pads = _symmetric_pads(a.get("pads", [0] * 2 * len(kernel)), kind)
            f = functional.max_pool2d if kind == "MaxPool" else functional.avg_pool2d
            return f(i[0], kernel, a.get("strides", kernel), pads, ceil_mode=bool(a.get("ceil_mode", 0)))

        return run

    def flatten(i: list[Any], a: dict[str, Any]) -> Any:
        axis = a.get("axis", 1)
        return i[0].reshape(int(np.prod(i[0].shape[:axis])), -1)

    def reshape(i: list[Any], a: dict[str, Any]) -> Any:
        shape = [int(d) for d in i[1].tolist()]
        shape = [i[0].shape[k] if d == 0 else d for k, d in enumerate(shape)]
        return i[0].reshape(shape)

    return {
        "Gemm": gemm,
        "MatMul": lambda i, a: i[0] @ i[1],
        "Add": lambda i, a: i[0] + i[1],
        "Sub": lambda i, a: i[0] - i[1],
        "Mul": lambda i, a: i[0] * i[1],
        "Div": lambda i, a: i[0] / i[1],
        "Relu": lambda i, a: functional.relu(i[0]),
        "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
        "Tanh": lambda i, a: torch.tanh(i[0]),
        "LeakyRelu": lambda i, a: functional.leaky_relu(i[0], a.get("alpha", 0.01)),
        "Softmax": lambda i, a: torch.softmax(i[0], a.get("axis", -1)),
        "LogSoftmax": lambda i, a: torch.log_softmax(i[0], a.get("axis", -1)),
        "Conv": conv,
        "MaxPool": pool("MaxPool"),
        "AveragePool": pool("AveragePool"),
        "GlobalAveragePool": lambda i, a: i[0].mean(dim=(2, 3), keepdim=True),
        "Transpose": lambda i, a: i[0].permute(*a["perm"]),
        "Flatten": flatten,
        "Reshape": reshape,
        "Identity": lambda i, a: i[0],
        "Dropout": lambda i, a: i[0],
    }


def onnx_module(path: Path) -> Any:
    """A torch module computing what the ONNX model at ``path`` computes, its weights trainable."""
    from onnx import numpy_helper

    torch = extras.torch()
    graph_model = load_onnx(path)
    graph = graph_model.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    check_one_input(path, len(inputs))
    ops = _ops()
    unsupported = sorted({n.op_type for n in graph.node} - set(ops) - {"Constant"})
    if unsupported:
        raise ModelLoadError(
            f"{path}: cannot train through operators {', '.join(unsupported)} "
            f"(supported: {', '.join(sorted(ops))})",
            path=str(path),
        )

    class OnnxModule(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.names = [n for n, a in initializers.items() if a.dtype.kind == "f"]
            self.weights = torch.nn.ParameterList(
                torch.nn.Parameter(torch.from_numpy(initializers[n].astype(np.float32).copy()))
                for n in self.names
            )
            self.constants = {
                n: torch.from_numpy(np.array(a)) for n, a in initializers.items() if a.dtype.kind != "f"
            }
            for node in graph.node:
                if node.op_type == "Constant":
                    self.constants[node.output[0]] = torch.from_numpy(
                        np.array(numpy_helper.to_array(_attrs(node)["value"]))
                    )
            self.nodes = [
                (n.op_type, list(n.input), n.output[0], _attrs(n))
                for n in graph.node
                if n.op_type != "Constant"
            ]

        def forward(self, x: Any) -> Any:
            env: dict[str, Any] = {**self.constants, **dict(zip(self.names, self.weights, strict=True))}
            env[inputs[0].name] = x
            for op, names, out, attrs in self.nodes:
                env[out] = ops[op]([env[n] if n else None for n in names], attrs)
            return env[graph.output[0].name]

        def named_weights(self) -> dict[str, Any]:
            return dict(zip(self.names, self.weights, strict=True))

    return OnnxModule()


def sample_shape(path: Path) -> tuple[int, ...]:
    """Per-sample input shape of an ONNX model (batch dimension dropped); all dims must be fixed."""
    graph = load_onnx(path).graph
    initializers = {i.name for i in graph.initializer}
    first = next(i for i in graph.input if i.name not in initializers)
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim[1:]]
    if any(d <= 0 for d in dims):
        raise ModelLoadError(f"{path}: input has dynamic non-batch dimensions {dims}", path=str(path))
    return tuple(dims)


def write_weights(source: Path, weights: dict[str, npt.NDArray[Any]], out: Path) -> None:
    """Copy the ONNX model at ``source`` to ``out`` with ``weights`` (by initializer name) replaced."""
    onnx = extras.require("onnx")
    from onnx import numpy_helper

    graph_model = load_onnx(source)
    for init in graph_model.graph.initializer:
        if init.name in weights:
            dtype = numpy_helper.to_array(init).dtype
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(dtype), init.name))
    onnx.save(graph_model, str(out))
