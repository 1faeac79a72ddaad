"""Small ONNX graphs, built with onnx.helper, that ORT's quantization pre-processing trips on.

* :func:`concat_of_shape_values`: a classifier whose Flatten is spelled Shape -> Slice ->
  Concat(axis=-1) -> Reshape, as exporters write it; ORT's symbolic shape inference asserts
  ``axis == 0`` on Concats of shape values and raises an ``AssertionError`` with no message.
* :func:`dynamic_hw_detector`: a feature-pyramid-like detector with dynamic height and width
  (stride-2 branch upsampled and added back); symbolic inference cannot prove ``h == 2*ceil(h/2)``
  and gives up with ``Incomplete symbolic shape inference``.

* :func:`conv_classifier`: the same blocks with a plain GlobalAveragePool head, which ORT
  pre-processes fine: dynamic int8 makes it the smallest and by far the slowest.

All have Conv + BatchNormalization blocks, so a test can check that BatchNorm got folded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 32


def _init(name: str, array: Any) -> Any:
    return numpy_helper.from_array(np.asarray(array), name)


def conv_bn_relu(
    rng: np.random.Generator, prefix: str, source: str, cin: int, cout: int, stride: int = 1
) -> tuple[list[Any], list[Any], str]:
    """Conv 3x3 (pads 1) -> BatchNormalization -> Relu; returns nodes, initializers, output name."""
    w = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32) * np.float32(1.0 / np.sqrt(cin * 9))
    inits = [
        _init(prefix + "w", w),
        _init(prefix + "b", np.zeros(cout, np.float32)),
        _init(prefix + "scale", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
        _init(prefix + "shift", (rng.normal(size=cout) * 0.1).astype(np.float32)),
        _init(prefix + "mean", (rng.normal(size=cout) * 0.1).astype(np.float32)),
        _init(prefix + "var", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
    ]
    p = prefix
    nodes = [
        helper.make_node(
            "Conv",
            [source, p + "w", p + "b"],
            [p + "conv"],
            pads=[1, 1, 1, 1],
            strides=[stride] * 2,
            name=p + "conv",
        ),
        helper.make_node(
            "BatchNormalization",
            [p + "conv", p + "scale", p + "shift", p + "mean", p + "var"],
            [p + "bn"],
            name=p + "bn",
        ),
        helper.make_node("Relu", [p + "bn"], [p + "relu"], name=p + "relu"),
    ]
    return nodes, inits, p + "relu"


def _save(graph: Any, path: Path) -> Path:
    import onnx

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def concat_of_shape_values(path: Path, classes: int = 5, seed: int = 0) -> Path:
    """x (n, 3, h, w) -> 2 conv blocks -> reshape (n, C, -1) via Concat(axis=-1) -> mean -> MatMul."""
    rng = np.random.default_rng(seed)
    n1, i1, o1 = conv_bn_relu(rng, "a", "x", 3, CHANNELS)
    n2, i2, o2 = conv_bn_relu(rng, "b", o1, CHANNELS, CHANNELS)
    nodes = [
        *n1,
        *n2,
        helper.make_node("Shape", [o2], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "zero", "two"], ["nc"], name="slice"),
        helper.make_node("Concat", ["nc", "minus_one"], ["target"], axis=-1, name="concat"),
        helper.make_node("Reshape", [o2, "target"], ["flat"], name="reshape"),
        helper.make_node("ReduceMean", ["flat"], ["pooled"], axes=[2], keepdims=0, name="pool"),
        helper.make_node("MatMul", ["pooled", "fc"], ["y"], name="fc"),
    ]
    inits = [
        *i1,
        *i2,
        _init("zero", np.array([0], np.int64)),
        _init("two", np.array([2], np.int64)),
        _init("minus_one", np.array([-1], np.int64)),
        _init("fc", rng.normal(size=(CHANNELS, classes)).astype(np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "concat_of_shape_values",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])],
        inits,
    )
    return _save(graph, path)


def dynamic_hw_detector(path: Path, seed: int = 0) -> Path:
    """x (n, 3, h, w) -> block a; a -> stride-2 block b -> 2x nearest upsample; a + up -> 1x1 head."""
    rng = np.random.default_rng(seed)
    n1, i1, o1 = conv_bn_relu(rng, "a", "x", 3, CHANNELS)
    n2, i2, o2 = conv_bn_relu(rng, "b", o1, CHANNELS, CHANNELS, stride=2)
    nodes = [
        *n1,
        *n2,
        helper.make_node("Resize", [o2, "", "scales"], ["up"], mode="nearest", name="up"),
        helper.make_node("Add", [o1, "up"], ["sum"], name="add"),
        helper.make_node("Conv", ["sum", "head_w", "head_b"], ["y"], name="head"),
    ]
    inits = [
        *i1,
        *i2,
        _init("scales", np.array([1, 1, 2, 2], np.float32)),
        _init("head_w", (rng.normal(size=(1, CHANNELS, 1, 1)) / np.sqrt(CHANNELS)).astype(np.float32)),
        _init("head_b", np.zeros(1, np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamic_hw_detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        inits,
    )
    return _save(graph, path)


def conv_classifier(path: Path, classes: int = 5, seed: int = 0) -> Path:
    """x (n, 3, h, w) -> 2 conv blocks -> GlobalAveragePool -> Flatten -> MatMul."""
    rng = np.random.default_rng(seed)
    n1, i1, o1 = conv_bn_relu(rng, "a", "x", 3, CHANNELS)
    n2, i2, o2 = conv_bn_relu(rng, "b", o1, CHANNELS, CHANNELS)
    nodes = [
        *n1,
        *n2,
        helper.make_node("GlobalAveragePool", [o2], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc"),
    ]
    inits = [*i1, *i2, _init("fc", rng.normal(size=(CHANNELS, classes)).astype(np.float32))]
    graph = helper.make_graph(
        nodes,
        "conv_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", classes])],
        inits,
    )
    return _save(graph, path)
