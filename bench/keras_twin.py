"""A Keras twin of a bench ONNX model, so that LiteRT can time what ONNX Runtime times.

The converter has no ONNX -> TFLite path. The bench's models are plain chains (Conv/MaxPool/
Relu/Flatten/Gemm, an optional leading Transpose), so their twin is built layer by layer from the
ONNX weights: Conv [O, I, kh, kw] -> Conv2D [kh, kw, I, O], Gemm [N, K] -> Dense [K, N], and a
Permute to channels-first before Flatten, so the Dense rows line up with ONNX's NCHW flattening.
Clustered weights (Cast + Gather of a codebook) are expanded first. The twin takes NHWC input
(digits images as they are); the bench checks that its top-1 matches the ONNX model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converter import extras


def _weights(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # clustered weights: W = Gather(codebook, Cast(indices))
        if node.op_type == "Cast" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]].astype(np.int64)
        elif node.op_type == "Gather" and node.input[0] in values and node.input[1] in values:
            values[node.output[0]] = values[node.input[0]][values[node.input[1]]]
    return values


def keras_twin(onnx_path: Path, out: Path) -> Path:
    """Save the Keras twin of the chain-shaped ONNX model at ``onnx_path`` to ``out`` (.keras)."""
    onnx = extras.require("onnx")
    extras.tensorflow()
    keras = extras.require("keras")
    from onnx import helper

    graph = onnx.load(str(onnx_path)).graph
    w = _weights(graph)
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    image = len(dims) == 3
    shape = (dims[1], dims[2], dims[0]) if image and dims[0] == 1 and dims[1] > 1 else tuple(dims)
    layers: list[Any] = []
    assigned: list[tuple[Any, list[np.ndarray]]] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            kernel = w[node.input[1]]
            layer = keras.layers.Conv2D(kernel.shape[0], kernel.shape[2:], padding="same")
            assigned.append((layer, [kernel.transpose(2, 3, 1, 0), w[node.input[2]]]))
        elif node.op_type == "Gemm":
            kernel = w[node.input[1]]
            kernel = kernel.T if attrs.get("transB", 0) else kernel
            layer = keras.layers.Dense(kernel.shape[1])
            assigned.append((layer, [kernel, w[node.input[2]]]))
        elif node.op_type == "Relu":
            layer = keras.layers.ReLU()
        elif node.op_type == "MaxPool":
            layer = keras.layers.MaxPooling2D(tuple(attrs["kernel_shape"]))
        elif node.op_type == "Flatten":
            if image:
                layers.append(keras.layers.Permute((3, 1, 2)))  # NHWC -> NCHW, as ONNX flattens
            layer = keras.layers.Flatten()
        else:  # Transpose at the input, Cast/Gather of clustered weights
            continue
        layers.append(layer)
    net = keras.Sequential([keras.Input(shape), *layers])
    for layer, values in assigned:
        layer.set_weights([np.asarray(v, np.float32) for v in values])
    net.save(str(out))
    return out
