"""An ONNX graph as a trainable torch module, and its trained weights written back to the graph.

The module interprets the graph node by node with torch operators; every float initializer
becomes a ``torch.nn.Parameter``, except those that are not weights: quantization scales,
batch-norm running statistics and Clip bounds stay constants. Training changes only parameter
values, so the graph written back is the input graph with new initializer values: same nodes,
names and opset, nothing re-exported. The operators of MLPs and small CNNs are covered (Gemm,
MatMul, Conv, BatchNormalization, pools, Relu/Clip/Sigmoid/Softmax, Flatten/Reshape, Add/Mul, ...);
any other operator is refused by name.

Quantized (QDQ) graphs, as the ``quantize`` pass writes them, train quantization-aware: an int8
or int32 initializer read by a DequantizeLinear becomes a float parameter holding its dequantized
value and is fake-quantized with the graph's own scale and zero point on every forward pass
(rounding passes gradients straight through); QuantizeLinear/DequantizeLinear pairs on
activations round the same way. Written back, each such parameter is quantized again with the
unchanged scale and zero point, so the file stays an ORT-runnable int8 model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converter import extras
from converter.errors import ModelLoadError
from converter.model import check_one_input, load_onnx

Op = Callable[[list[Any], dict[str, Any]], Any]

#: Float inputs (by position) of these operators are constants, not weights to train.
FROZEN_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "BatchNormalization": (3, 4),
    "Clip": (1, 2),
    "Pad": (2,),
}
#: Internal operator a DequantizeLinear of a trainable quantized weight becomes.
_FAKE_QUANT = "_FakeQuantWeight"


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _symmetric_pads(pads: list[int], op: str) -> list[int]:
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):
        raise ModelLoadError(f"{op} with asymmetric pads {pads} is not supported for training")
    return list(pads[:half])


def _check_auto_pad(attrs: dict[str, Any], op: str) -> None:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ModelLoadError(f"{op} with auto_pad={attrs['auto_pad']!r} is not supported for training")


def _int_range(dtype: np.dtype[Any]) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _weight_range(stored: npt.NDArray[Any]) -> tuple[int, int]:
    """The integers a quantized weight may take while it trains.

    Weights stored in ORT's 7-bit range (``reduce_range``: int8 in [-64, 64], uint8 in [0, 127])
    stay there, so training cannot bring back the 8-bit weights that saturate ORT's int8 kernels
    on x86 without VNNI. Full-range quantization always reaches past 7 bits (the largest weight
    of each tensor or channel maps to the end of the range), so the stored values tell them apart.
    """
    low, high = _int_range(stored.dtype)
    # ORT's own reduced ranges: 2 * 255 * 64 still fits the int16 sum of a VPMADDUBSW pair.
    narrow = (-64, 64) if low < 0 else (0, 127)
    if stored.size and narrow[0] <= int(stored.min()) and int(stored.max()) <= narrow[1]:
        return narrow
    return low, high


def _ops() -> dict[str, Op]:
    torch = extras.torch()
    functional = torch.nn.functional

    def gemm(i: list[Any], a: dict[str, Any]) -> Any:
        x, w = i[0], i[1]
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (x @ w)
        return y + a.get("beta", 1.0) * i[2] if len(i) > 2 and i[2] is not None else y

    def conv(i: list[Any], a: dict[str, Any]) -> Any:
        _check_auto_pad(a, "Conv")
        rank = i[1].dim() - 2
        pads = list(a.get("pads", [0] * 2 * rank))
        x = i[0]
        if pads[:rank] != pads[rank:]:
            # F.pad takes (last-dim begin, last-dim end, ...): ONNX gives all begins, then all ends.
            x = functional.pad(x, [p for d in reversed(range(rank)) for p in (pads[d], pads[d + rank])])
            pads = [0] * 2 * rank
        f = (functional.conv1d, functional.conv2d, functional.conv3d)[rank - 1]
        return f(
            x,
            i[1],
            i[2] if len(i) > 2 else None,
            stride=a.get("strides", 1),
            padding=pads[:rank],
            dilation=a.get("dilations", 1),
            groups=a.get("group", 1),
        )

    def pool(kind: str) -> Op:
        def run(i: list[Any], a: dict[str, Any]) -> Any:
            _check_auto_pad(a, kind)
            kernel = a["kernel_shape"]
            rank = len(kernel)
            pads = _symmetric_pads(a.get("pads", [0] * 2 * rank), kind)
            strides = a.get("strides", kernel)
            ceil = bool(a.get("ceil_mode", 0))
            if kind == "MaxPool":
                f = (functional.max_pool1d, functional.max_pool2d, functional.max_pool3d)[rank - 1]
                return f(i[0], kernel, strides, pads, dilation=a.get("dilations", 1), ceil_mode=ceil)
            f = (functional.avg_pool1d, functional.avg_pool2d, functional.avg_pool3d)[rank - 1]
            # ONNX's default leaves the padding out of the average; torch's puts it in.
            return f(i[0], kernel, strides, pads, ceil, bool(a.get("count_include_pad", 0)))

        return run

    def batch_norm(i: list[Any], a: dict[str, Any]) -> Any:
        # Inference form: the running statistics are constants, scale and shift train.
        return functional.batch_norm(i[0], i[3], i[4], i[1], i[2], training=False, eps=a.get("epsilon", 1e-5))

    def clip(i: list[Any], a: dict[str, Any]) -> Any:
        low = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
        high = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
        return torch.clamp(i[0], low, high)

    def flatten(i: list[Any], a: dict[str, Any]) -> Any:
        axis = a.get("axis", 1) % max(i[0].dim(), 1)
        return i[0].reshape(int(np.prod(i[0].shape[:axis])), -1)

    def reshape(i: list[Any], a: dict[str, Any]) -> Any:
        shape = [int(d) for d in i[1].tolist()]
        shape = [i[0].shape[k] if d == 0 else d for k, d in enumerate(shape)]
        return i[0].reshape(shape)

    def axes(i: list[Any], a: dict[str, Any]) -> list[int]:
        # Opset 13 moved axes from an attribute to the second input.
        return [int(v) for v in (i[1].tolist() if len(i) > 1 and i[1] is not None else a.get("axes", []))]

    def unsqueeze(i: list[Any], a: dict[str, Any]) -> Any:
        out = i[0]
        rank = out.dim() + len(axes(i, a))
        for axis in sorted(d % rank for d in axes(i, a)):
            out = out.unsqueeze(axis)
        return out

    def squeeze(i: list[Any], a: dict[str, Any]) -> Any:
        dims = axes(i, a)
        return i[0].squeeze() if not dims else i[0].squeeze(tuple(d % i[0].dim() for d in dims))

    def pad(i: list[Any], a: dict[str, Any]) -> Any:
        mode = a.get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            raise ModelLoadError(f"Pad mode {mode!r} is not supported for training")
        pads = [int(p) for p in (i[1].tolist() if len(i) > 1 else a["pads"])]
        rank = len(pads) // 2
        value = float(i[2]) if len(i) > 2 and i[2] is not None else a.get("value", 0.0)
        order = [p for d in reversed(range(rank)) for p in (pads[d], pads[d + rank])]
        return functional.pad(i[0], order, value=value)

    def quantize(i: list[Any], a: dict[str, Any]) -> Any:
        zero = i[2] if len(i) > 2 and i[2] is not None else torch.tensor(0, dtype=torch.uint8)
        scale, zero_f = _broadcast(i[1], i[0], a), _broadcast(zero.float(), i[0], a)
        # A weight's own integer type travels as "_range" (its zero point may be absent).
        low, high = a.get("_range") or _int_range(np.dtype(str(zero.dtype).removeprefix("torch.")))
        scaled = i[0] / scale
        rounded = scaled + (torch.round(scaled) - scaled).detach()  # straight-through rounding
        return torch.clamp(rounded + zero_f, low, high)

    def dequantize(i: list[Any], a: dict[str, Any]) -> Any:
        zero = i[2] if len(i) > 2 and i[2] is not None else torch.zeros(())
        return (i[0].float() - _broadcast(zero.float(), i[0], a)) * _broadcast(i[1], i[0], a)

    def fake_quant(i: list[Any], a: dict[str, Any]) -> Any:
        return dequantize([quantize(i, a), *i[1:]], a)

    def _broadcast(v: Any, x: Any, a: dict[str, Any]) -> Any:
        if v.dim() == 0:
            return v
        shape = [1] * x.dim()
        shape[a.get("axis", 1) % x.dim()] = -1
        return v.reshape(shape)

    def gather(i: list[Any], a: dict[str, Any]) -> Any:
        index, axis = i[1].long(), a.get("axis", 0) % i[0].dim()
        picked = torch.index_select(i[0], axis, index.reshape(-1) % i[0].shape[axis])
        return picked.reshape([*i[0].shape[:axis], *index.shape, *i[0].shape[axis + 1 :]])

    # ONNX TensorProto data types -> torch dtypes, for Cast.
    dtypes = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool}

    def cast(i: list[Any], a: dict[str, Any]) -> Any:
        if a["to"] not in dtypes:
            raise ModelLoadError(f"Cast to ONNX data type {a['to']} is not supported for training")
        return i[0].to(dtypes[a["to"]])

    return {
        "Cast": cast,
        "Gemm": gemm,
        "MatMul": lambda i, a: i[0] @ i[1],
        "Add": lambda i, a: i[0] + i[1],
        "Sub": lambda i, a: i[0] - i[1],
        "Mul": lambda i, a: i[0] * i[1],
        "Div": lambda i, a: i[0] / i[1],
        "Relu": lambda i, a: functional.relu(i[0]),
        "Clip": clip,
        "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
        "Tanh": lambda i, a: torch.tanh(i[0]),
        "LeakyRelu": lambda i, a: functional.leaky_relu(i[0], a.get("alpha", 0.01)),
        "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
        "Softmax": lambda i, a: torch.softmax(i[0], a.get("axis", -1)),
        "LogSoftmax": lambda i, a: torch.log_softmax(i[0], a.get("axis", -1)),
        "Conv": conv,
        "BatchNormalization": batch_norm,
        "MaxPool": pool("MaxPool"),
        "AveragePool": pool("AveragePool"),
        "GlobalAveragePool": lambda i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
        "GlobalMaxPool": lambda i, a: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
        "Transpose": lambda i, a: i[0].permute(*a.get("perm", list(range(i[0].dim()))[::-1])),
        "Flatten": flatten,
        "Reshape": reshape,
        "Squeeze": squeeze,
        "Unsqueeze": unsqueeze,
        "Concat": lambda i, a: torch.cat(i, dim=a["axis"]),
        "Pad": pad,
        "Shape": lambda i, a: torch.tensor(list(i[0].shape), dtype=torch.int64),
        "Gather": gather,
        "Identity": lambda i, a: i[0],
        "Dropout": lambda i, a: i[0],
        "QuantizeLinear": quantize,
        "DequantizeLinear": dequantize,
        _FAKE_QUANT: fake_quant,
    }


@dataclass(frozen=True)
class QuantizedWeight:
    """How a trainable quantized initializer is stored: its scale, zero point, axis and dtype."""

    scale: npt.NDArray[np.float32]
    zero_point: npt.NDArray[Any]
    axis: int
    dtype: np.dtype[Any]
    bounds: tuple[int, int]  # the integers the weight may take (see _weight_range)

    def _shape(self, ndim: int) -> list[int]:
        shape = [1] * ndim
        if self.scale.ndim:
            shape[self.axis % ndim] = -1
        return shape

    def quantize(self, value: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        """``value`` (dequantized floats) as the stored integers, rounded half to even like ONNX."""
        shape = self._shape(value.ndim)
        scale, zero = self.scale.reshape(shape), self.zero_point.astype(np.float64).reshape(shape)
        low, high = self.bounds
        return np.clip(np.round(value / scale) + zero, low, high).astype(self.dtype)

    def dequantize(self, stored: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """The float values the stored integers stand for: (q - zero point) * scale."""
        shape = self._shape(stored.ndim)
        zero = self.zero_point.astype(np.float64).reshape(shape)
        return ((stored.astype(np.float64) - zero) * self.scale.reshape(shape)).astype(np.float32)


def _quantized_weights(graph: Any, initializers: dict[str, npt.NDArray[Any]]) -> dict[str, QuantizedWeight]:
    """Integer initializers that a DequantizeLinear reads as its data: the weights of a QDQ graph."""
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        data = initializers[node.input[0]]
        if data.dtype.kind not in "iu":
            continue
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        found[node.input[0]] = QuantizedWeight(
            scale=np.asarray(initializers[node.input[1]], dtype=np.float32),
            zero_point=np.zeros((), data.dtype) if zero is None else np.asarray(zero),
            axis=int(_attrs(node).get("axis", 1)),
            dtype=data.dtype,
            bounds=_weight_range(data),
        )
    return found


def onnx_module(path: Path) -> Any:
    """A torch module computing what the ONNX model at ``path`` computes, its weights trainable.

    The module's ``quantized`` maps the names of fake-quantized weights (QDQ graphs) to their
    storage; ``export_weights()`` gives every trained initializer in its stored dtype.
    """
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
            f"{path}: cannot train through operator{'s' if len(unsupported) > 1 else ''} "
            f"{', '.join(unsupported)} (supported: {', '.join(sorted(set(ops) - {_FAKE_QUANT}))})",
            path=str(path),
        )
    quantized = _quantized_weights(graph, initializers)
    frozen = {
        name
        for node in graph.node
        for position in FROZEN_INPUTS.get(node.op_type, ())
        if position < len(node.input) and (name := node.input[position])
    }
    trainable = [
        n for n, a in initializers.items() if n in quantized or (a.dtype.kind == "f" and n not in frozen)
    ]

    def initial(name: str) -> npt.NDArray[np.float32]:
        array = initializers[name]
        return quantized[name].dequantize(array) if name in quantized else array.astype(np.float32)

    def _node(node: Any) -> tuple[str, list[str], str, dict[str, Any]]:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            weight = quantized[node.input[0]]
            attrs = {**_attrs(node), "_range": weight.bounds}
            return _FAKE_QUANT, list(node.input), node.output[0], attrs
        return node.op_type, list(node.input), node.output[0], _attrs(node)

    class OnnxModule(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.names = trainable
            self.quantized = quantized
            self.weights = torch.nn.ParameterList(
                torch.nn.Parameter(torch.from_numpy(initial(n).copy())) for n in self.names
            )
            self.constants = {
                n: torch.from_numpy(np.array(a)) for n, a in initializers.items() if n not in trainable
            }
            for node in graph.node:
                if node.op_type == "Constant":
                    self.constants[node.output[0]] = torch.from_numpy(
                        np.array(numpy_helper.to_array(_attrs(node)["value"]))
                    )
            self.nodes = [_node(n) for n in graph.node if n.op_type != "Constant"]

        def forward(self, x: Any) -> Any:
            env: dict[str, Any] = {**self.constants, **dict(zip(self.names, self.weights, strict=True))}
            env[inputs[0].name] = x
            for op, names, out, attrs in self.nodes:
                env[out] = ops[op]([env[n] if n else None for n in names], attrs)
            return env[graph.output[0].name]

        def named_weights(self) -> dict[str, Any]:
            return dict(zip(self.names, self.weights, strict=True))

        def export_weights(self) -> dict[str, npt.NDArray[Any]]:
            out = {}
            for name, weight in self.named_weights().items():
                value = weight.detach().numpy()
                out[name] = self.quantized[name].quantize(value) if name in self.quantized else value
            return out

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
