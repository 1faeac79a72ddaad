"""Which weights a channel of an ONNX layer owns: the graph analysis behind structured pruning.

A *producer* is a Conv (group 1) or a Gemm/MatMul whose weight is an initializer; each of its
output channels (filters, neurons) is one slice of its weight and bias. Removing a channel also
removes what downstream layers read from it: the input channels of the next Conv, or the input
rows of the next Gemm/MatMul, found by following the activation through operators that keep the
channel structure (activations, pools, batch norm, bias Add/Mul, Transpose, Flatten). Through a
Flatten a channel owns a set of feature positions, so it is tracked as a *group map*: the channel
id of every index along the tracked axis. Any other operator, or reaching a graph output, makes
the producer unprunable (the logits layer is never pruned this way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Operators that apply per element or per channel and keep the tensor's layout.
_PASSTHROUGH = frozenset(
    {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
     "Identity", "Dropout"}
)  # fmt: skip
#: Spatial operators on NC... tensors that keep axis 1 (the channels).
_CHANNEL_KEEPING = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization"}
)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})


@dataclass(frozen=True)
class Cut:
    """A slice of initializer ``tensor`` along ``axis``: index i belongs to channel ``groups[i]``."""

    tensor: str
    axis: int
    groups: tuple[int, ...]  # channel id of each index along ``axis``


@dataclass
class Producer:
    """A prunable layer: its node, weight, output channel count and every slice it owns."""

    node: str
    weight: str
    channels: int
    #: The weight's output-channel axis (0 for Conv and Gemm with transB, 1 for MatMul).
    weight_axis: int
    cuts: list[Cut] = field(default_factory=list)
    #: Depthwise Convs on the path: their ``group`` becomes the kept channel count.
    depthwise: list[str] = field(default_factory=list)

    def importance(self, weights: dict[str, npt.NDArray[Any]], criterion: str) -> npt.NDArray[np.float64]:
        """L1 or L2 norm of each output channel's weights (larger = more important)."""
        w = np.moveaxis(weights[self.weight].astype(np.float64), self.weight_axis, 0).reshape(
            self.channels, -1
        )
        norms: npt.NDArray[np.float64] = (
            np.abs(w).sum(axis=1) if criterion == "l1" else np.sqrt((w * w).sum(axis=1))
        )
        return norms


class _Blocked(Exception):
    """The channels of a producer reach an operator they cannot be traced through."""


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_of(node: Any, inits: dict[str, npt.NDArray[Any]]) -> tuple[str, int, int] | None:
    """(weight name, output-channel axis of the weight, output channel axis of the activation)."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = inits[node.input[1]]
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1 and w.ndim >= 3:
        return node.input[1], 0, 1
    if node.op_type == "Gemm" and w.ndim == 2 and not _attr(node, "transA", 0):
        return node.input[1], 0 if _attr(node, "transB", 0) else 1, 1
    if node.op_type == "MatMul" and w.ndim == 2:
        return node.input[1], 1, -1
    return None


class ChannelGraph:
    """The producers of an ONNX model and, for each, the initializer slices its channels own."""

    def __init__(self, model: Any, inits: dict[str, npt.NDArray[Any]]) -> None:
        from onnx import shape_inference

        self.inits = inits
        inferred = shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[int]] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = info.type.tensor_type.shape.dim
            self.shapes[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
        self.users: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.outputs = {o.name for o in model.graph.output}
        uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        self.shared = {n for n, count in uses.items() if count > 1 and n in inits}
        self.producers: list[Producer] = []
        self.blocked: dict[str, str] = {}
        for node in model.graph.node:
            found = _weight_of(node, inits)
            if found is None or found[0] in self.shared:
                continue
            self._add(node, *found)

    def _add(self, node: Any, weight: str, weight_axis: int, out_axis: int) -> None:
        channels = int(self.inits[weight].shape[weight_axis])
        groups = tuple(range(channels))
        producer = Producer(node.name or node.output[0], weight, channels, weight_axis)
        producer.cuts.append(Cut(weight, weight_axis, groups))
        if len(node.input) > 2 and node.input[2] in self.inits:
            bias = self.inits[node.input[2]]
            if bias.size == channels and bias.ndim == 1:
                producer.cuts.append(Cut(node.input[2], 0, groups))
            elif bias.size != 1:
                self.blocked[producer.node] = "its bias is not one value per channel"
                return
        rank = len(self.shapes.get(node.output[0], [])) or (4 if out_axis == 1 else 2)
        try:
            self._follow(node.output[0], out_axis % rank, groups, producer, depth=0)
        except _Blocked as reason:
            self.blocked[producer.node] = str(reason)
            return
        self.producers.append(producer)

    def _follow(
        self, tensor: str, axis: int, groups: tuple[int, ...], producer: Producer, depth: int
    ) -> None:
        if tensor in self.outputs:
            raise _Blocked(f"its channels reach the graph output {tensor!r}")
        if depth > 64:
            raise _Blocked("the channel path is too long")
        users = self.users.get(tensor, [])
        if not users:
            raise _Blocked(f"{tensor!r} has no consumer")
        for user in users:
            self._through(user, tensor, axis, groups, producer, depth)

    def _through(
        self, node: Any, tensor: str, axis: int, groups: tuple[int, ...], producer: Producer, depth: int
    ) -> None:
        op, out = node.op_type, node.output[0] if node.output else ""
        if node.input[0] != tensor and op not in _ELEMENTWISE:
            raise _Blocked(f"{op} {node.name!r} reads the channels as a parameter")
        if op in ("Conv", "Gemm", "MatMul") and _weight_of(node, self.inits) is not None:
            self._consume(node, axis, groups, producer)
        elif op == "Conv" and self._depthwise(node, axis, groups):
            # One filter per channel: the channel and its filter go together, the count stays.
            producer.cuts += [Cut(name, 0, groups) for name in node.input[1:3] if name]
            producer.depthwise.append(node.name)
            self._follow(out, axis, groups, producer, depth + 1)
        elif op in _PASSTHROUGH:
            self._follow(out, axis, groups, producer, depth + 1)
        elif op in _CHANNEL_KEEPING and axis == 1:
            if op == "BatchNormalization":
                for name in node.input[1:5]:
                    producer.cuts.append(Cut(name, 0, groups))
            self._follow(out, axis, groups, producer, depth + 1)
        elif op in _ELEMENTWISE:
            self._elementwise(node, tensor, axis, groups, producer, depth)
        elif op == "Transpose":
            rank = len(self.shapes.get(tensor, [])) or 4
            perm = list(_attr(node, "perm", list(reversed(range(rank)))))
            self._follow(out, perm.index(axis), groups, producer, depth + 1)
        elif op == "Flatten":
            self._flatten(node, tensor, axis, groups, producer, depth)
        else:
            raise _Blocked(f"its channels reach {op} {node.name!r}, which structured pruning cannot trace")

    def _depthwise(self, node: Any, axis: int, groups: tuple[int, ...]) -> bool:
        weight = self.inits.get(node.input[1]) if len(node.input) > 1 else None
        return (
            axis == 1
            and weight is not None
            and node.input[1] not in self.shared
            and node.name != ""
            and _attr(node, "group", 1) == len(groups) == weight.shape[0]
            and weight.shape[1] == 1
            and groups == tuple(range(len(groups)))
        )

    def _consume(self, node: Any, axis: int, groups: tuple[int, ...], producer: Producer) -> None:
        weight = node.input[1]
        if weight in self.shared:
            raise _Blocked(f"the weight {weight!r} of {node.name!r} is shared")
        rank = len(self.shapes.get(node.input[0], [])) or 2
        if node.op_type == "Conv":
            if axis != 1:
                raise _Blocked(f"Conv {node.name!r} reads the channels on axis {axis}")
            producer.cuts.append(Cut(weight, 1, groups))
        elif node.op_type == "Gemm":
            if axis != 1:
                raise _Blocked(f"Gemm {node.name!r} reads the channels on axis {axis}")
            producer.cuts.append(Cut(weight, 1 if _attr(node, "transB", 0) else 0, groups))
        else:
            if axis != rank - 1:
                raise _Blocked(f"MatMul {node.name!r} reads the channels on axis {axis}")
            producer.cuts.append(Cut(weight, 0, groups))

    def _elementwise(
        self, node: Any, tensor: str, axis: int, groups: tuple[int, ...], producer: Producer, depth: int
    ) -> None:
        others = [n for n in node.input if n != tensor]
        if len(others) != 1 or others[0] not in self.inits or others[0] in self.shared:
            raise _Blocked(f"{node.op_type} {node.name!r} mixes the channels with another activation")
        const = self.inits[others[0]]
        rank = len(self.shapes.get(tensor, [])) or const.ndim
        const_axis = axis - (rank - const.ndim)
        if const.size != 1:
            if const_axis < 0 or const.shape[const_axis] != len(groups):
                raise _Blocked(f"{node.op_type} {node.name!r} has a constant not shaped per channel")
            producer.cuts.append(Cut(others[0], const_axis, groups))
        self._follow(node.output[0], axis, groups, producer, depth + 1)

    def _flatten(
        self, node: Any, tensor: str, axis: int, groups: tuple[int, ...], producer: Producer, depth: int
    ) -> None:
        shape = self.shapes.get(tensor)
        start = int(_attr(node, "axis", 1))
        if not shape or start <= 0 or axis < start or any(d <= 0 for d in shape[start:]):
            raise _Blocked(f"Flatten {node.name!r}: the flattened dimensions are not known")
        # Channel id of every flattened position: the group map broadcast over the other dims.
        inner = shape[start:]
        ids = np.asarray(groups).reshape([len(groups) if i == axis - start else 1 for i in range(len(inner))])
        flat = np.broadcast_to(ids, inner).reshape(-1)
        self._follow(node.output[0], 1, tuple(int(v) for v in flat), producer, depth + 1)


def apply_cuts(
    inits: dict[str, npt.NDArray[Any]], kept: dict[str, npt.NDArray[np.int64]], producers: list[Producer]
) -> dict[str, npt.NDArray[Any]]:
    """New values of every cut initializer, each producer keeping the channel ids in ``kept``."""
    out: dict[str, npt.NDArray[Any]] = {}
    for producer in producers:
        if producer.node not in kept:
            continue
        for cut in producer.cuts:
            array = out.get(cut.tensor, inits[cut.tensor])
            mask = np.isin(np.asarray(cut.groups), kept[producer.node])
            if array.shape[cut.axis] != mask.size:
                raise ValueError(f"{cut.tensor}: cut twice along axis {cut.axis}")
            out[cut.tensor] = np.compress(mask, array, axis=cut.axis)
    return out
