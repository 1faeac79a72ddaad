"""Small deterministic ONNX models with several inputs, integer inputs and several outputs.

Built with ``onnx.helper`` from a seeded generator, so every test gets the same bytes:

* :func:`token_model`: ``tokens`` (int32 ids, N x 8) and ``mask`` (N x 8, int32 by default)
  -> embedding lookup (Gather), masked mean over the sequence, MatMul + Add -> ``logits`` (N x 4);
  a token classifier's shape, with integer inputs that must never be cast to float;
* :func:`two_output_model`: ``x`` (float, N x 4) -> ``logits`` (N x 3) and ``embedding`` (N x 5),
  optionally with a scalar ``gain`` input that multiplies ``x``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, SEQ, DIM, CLASSES = 32, 8, 16, 4


def token_model(path: Path, *, mask_dtype: str = "int32", seed: int = 0) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, (VOCAB, DIM)).astype(np.float32)
    weight = rng.normal(0, 1, (DIM, CLASSES)).astype(np.float32)
    bias = rng.normal(0, 0.1, (CLASSES,)).astype(np.float32)
    mask_type = helper.np_dtype_to_tensor_dtype(np.dtype(mask_dtype))
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["embedded"], axis=0),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "weight"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT32, ["N", SEQ]),
            helper.make_tensor_value_info("mask", mask_type, ["N", SEQ]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8  # readable by every onnxruntime the project supports
    save(model, str(path))
    return path


def token_data(n: int, *, seed: int = 1, mask_dtype: str = "int32") -> dict[str, np.ndarray]:
    """``n`` samples: random token ids and a mask with 1 to SEQ leading ones."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (n, SEQ)).astype(np.int32)
    lengths = rng.integers(1, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(mask_dtype)
    return {"tokens": tokens, "mask": mask}


def two_output_model(path: Path, *, scalar_input: bool = False, seed: int = 0) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, (4, 3)).astype(np.float32)
    w2 = rng.normal(0, 1, (4, 5)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    nodes = []
    source = "x"
    if scalar_input:
        inputs.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, []))
        nodes.append(helper.make_node("Mul", ["x", "gain"], ["scaled"]))
        source = "scaled"
    nodes += [
        helper.make_node("MatMul", [source, "w1"], ["logits"]),
        helper.make_node("MatMul", [source, "w2"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_outputs",
        inputs,
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 5]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    save(model, str(path))
    return path


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``path`` for ``feeds`` from a bare ONNX Runtime session (the reference)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def token_tflite(path: Path, *, seed: int = 0) -> Path:
    """:func:`token_model`'s computation as a float TFLite model (int32 ``tokens`` and ``mask``)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    table = tf.constant(rng.normal(0, 1, (VOCAB, DIM)).astype(np.float32))
    weight = tf.constant(rng.normal(0, 1, (DIM, CLASSES)).astype(np.float32))
    spec = tf.TensorSpec([None, SEQ], tf.int32)

    @tf.function(input_signature=[spec, spec])
    def forward(tokens: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        maskf = tf.cast(mask, tf.float32)[:, :, None]
        summed = tf.reduce_sum(tf.gather(table, tokens) * maskf, axis=1)
        count = tf.maximum(tf.reduce_sum(maskf, axis=1), 1.0)
        return {"logits": tf.matmul(summed / count, weight)}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()])
    path.write_bytes(converter.convert())
    return path


def litert_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of a TFLite model for ``feeds`` (by input name) from a bare interpreter."""
    from edgeagent.modelinfo import tflite_interpreter_class

    interpreter = tflite_interpreter_class()(model_path=str(path))
    for detail in interpreter.get_input_details():
        interpreter.resize_tensor_input(detail["index"], feeds[detail["name"]].shape)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], feeds[detail["name"]])
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
