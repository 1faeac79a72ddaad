"""Small deterministic stateful models: a recurrent cell with state in/out, and a TFLite
model that keeps its state in resource variables.

* :func:`gru_model` (ONNX, ``onnx.helper``): ``x`` (N x 4) and ``state`` (N x 8) ->
  ``h' = tanh(x W + state U + b)``; outputs ``y = h' V`` (N x 3) and ``stateN = h'`` (N x 8):
  a streaming cell whose output ``stateN`` feeds input ``state`` on the next chunk;
* :func:`variable_tflite` (TFLite, a ``tf.Variable`` in a ``tf.function``): ``x`` (1 x 4) ->
  the variable ``acc`` (1 x 4) becomes ``0.5 * acc + x`` and the output is ``acc * 2``; the
  state never appears among the model's inputs or outputs (VAR_HANDLE / READ_VARIABLE /
  ASSIGN_VARIABLE ops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES, HIDDEN, OUTPUTS = 4, 8, 3


def gru_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.6, (FEATURES, HIDDEN)).astype(np.float32)
    u = rng.normal(0, 0.4, (HIDDEN, HIDDEN)).astype(np.float32)
    b = rng.normal(0, 0.1, (HIDDEN,)).astype(np.float32)
    v = rng.normal(0, 0.5, (HIDDEN, OUTPUTS)).astype(np.float32)
    return w, u, b, v


def gru_model(path: Path, *, seed: int = 0, batch: int | str = "N") -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    w, u, b, v = gru_weights(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("MatMul", ["state", "U"], ["hu"]),
        helper.make_node("Add", ["xw", "hu"], ["pre0"]),
        helper.make_node("Add", ["pre0", "b"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["stateN"]),
        helper.make_node("MatMul", ["stateN", "V"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gru",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [batch, HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, OUTPUTS]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [batch, HIDDEN]),
        ],
        [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (u, "U"), (b, "b"), (v, "V"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    save(model, str(path))
    return path


def chunks(n: int, *, seed: int = 1) -> np.ndarray:
    """``n`` chunks of one sample each: (n, 1, FEATURES) float32."""
    return np.random.default_rng(seed).normal(0, 1, (n, 1, FEATURES)).astype(np.float32)


def gru_reference(path: Path, xs: np.ndarray, state: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """Every step's outputs of ``path`` over chunks ``xs`` from a bare ONNX Runtime session, state carried."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h = np.zeros((1, HIDDEN), np.float32) if state is None else state
    steps = []
    for x in xs:
        y, h = session.run(["y", "stateN"], {"x": x, "state": h})
        steps.append({"y": y, "stateN": h})
    return steps


def variable_tflite(path: Path, *, int8: bool = False) -> Path:
    """A TFLite model whose state lives in a resource variable (see the module doc).

    ``int8``: full-integer quantization with int8 input and output (the variable stays float
    inside, as the TFLite converter keeps resource variables).
    """
    import tensorflow as tf

    class Accumulator(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.acc = tf.Variable(tf.zeros([1, FEATURES]), name="acc")

        @tf.function(input_signature=[tf.TensorSpec([1, FEATURES], tf.float32, name="x")])
        def __call__(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            self.acc.assign(self.acc * 0.5 + x)
            return {"y": self.acc * 2.0}

    module = Accumulator()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module
    )
    converter.experimental_enable_resource_variables = True
    if int8:
        rng = np.random.default_rng(3)
        calibration = [rng.normal(0, 1, (1, FEATURES)).astype(np.float32) for _ in range(64)]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x] for x in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())
    return path


def litert_stream(path: Path, xs: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Every step's output of ``path`` over float chunks ``xs`` on one fresh bare interpreter.

    Quantized input/output are converted with the model's own scale and zero point (the
    outputs come back as float); returns (outputs, the output's scale, 0.0 for a float model).
    """
    from edgeagent.modelinfo import tflite_interpreter_class

    interpreter = tflite_interpreter_class()(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    steps = []
    for x in xs:
        if in_scale:
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.rint(x / np.float32(in_scale)) + in_zero, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        if out_scale:
            y = ((y.astype(np.float32) - np.float32(out_zero)) * np.float32(out_scale)).astype(np.float32)
        steps.append(y)
    return steps, float(out_scale)


LAYERS = 2  # axis 0 of the axis-1 state: layers, not samples


def axis1_model(path: Path, *, batch: int | str = 1, seed: int = 5) -> Path:
    """Silero VAD's state layout in small: ``x`` (B x 4) and ``state`` (2 x B x 8), batch on axis 1.

    ``y = tanh(x W + sum over the layer axis of state)`` (B x 8) and ``stateN = tanh(0.9 state +
    x V + L)`` (2 x B x 8, x V broadcast over the layers, L a per-layer bias). ``batch`` 1 is
    Silero's fixed export, a name its dynamic one (op15: ``state`` is (2, batch, 128)).
    """
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.6, (FEATURES, HIDDEN)).astype(np.float32)
    v = rng.normal(0, 0.6, (FEATURES, HIDDEN)).astype(np.float32)
    bias = rng.normal(0, 0.3, (LAYERS, 1, HIDDEN)).astype(np.float32)
    consts = [(w, "W"), (v, "V"), (bias, "L"), (np.array([0], np.int64), "axis0"), (np.float32(0.9), "decay")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("ReduceSum", ["state", "axis0"], ["ssum"], keepdims=0),
        helper.make_node("Add", ["xw", "ssum"], ["pre_y"]),
        helper.make_node("Tanh", ["pre_y"], ["y"]),
        helper.make_node("MatMul", ["x", "V"], ["xv"]),
        helper.make_node("Mul", ["state", "decay"], ["kept"]),
        helper.make_node("Add", ["kept", "xv"], ["pre_s0"]),
        helper.make_node("Add", ["pre_s0", "L"], ["pre_s"]),
        helper.make_node("Tanh", ["pre_s"], ["stateN"]),
    ]
    graph = helper.make_graph(
        nodes,
        "axis1",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [LAYERS, batch, HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, HIDDEN]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [LAYERS, batch, HIDDEN]),
        ],
        [numpy_helper.from_array(a, n) for a, n in consts],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    save(model, str(path))
    return path


def axis1_reference(path: Path, xs: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Every step's outputs of :func:`axis1_model` over chunks ``xs`` (n, 1, 4) on bare ORT, state
    carried from zeros (2, 1, 8)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    steps = []
    for x in xs:
        y, h = session.run(["y", "stateN"], {"x": x, "state": h})
        steps.append({"y": y, "stateN": h})
    return steps
