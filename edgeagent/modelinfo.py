"""Read a model file's format, precision and input/output specs from the file itself.

Used by ``edgectl bundle create`` so that nobody types tensor names or shapes by hand.
ONNX files are read with the ``onnx`` package when installed (it sees the weights, so it
can tell int8 and fp16 models apart), else with onnxruntime (inputs/outputs only).
TFLite files are read with the first interpreter that imports: ``ai_edge_litert`` ->
``tflite_runtime`` -> ``tensorflow.lite``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.bundle.manifest import Format, Precision, Quantization, TensorSpec
from edgeagent.errors import ModelInspectionError, UsageError

# Importable module path and attribute of a TFLite Interpreter class, best first.
TFLITE_INTERPRETERS = (
    ("ai_edge_litert.interpreter", "Interpreter"),
    ("tflite_runtime.interpreter", "Interpreter"),
    ("tensorflow.lite", "Interpreter"),
)
_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "QLinearAdd",
        "QLinearMul",
    }
)


def model_format(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        return "tflite"
    raise UsageError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected .onnx or .tflite")


def inspect_model(path: Path) -> tuple[Format, Precision, list[TensorSpec], list[TensorSpec]]:
    """(format, precision, inputs, outputs) of a model file."""
    if not path.is_file():
        raise UsageError(f"{path}: no such model file")
    fmt = model_format(path)
    if fmt == "onnx":
        return (fmt, *_inspect_onnx(path))
    return (fmt, *_inspect_tflite(path))


def tflite_interpreter_class() -> Any:
    """The first TFLite Interpreter class that imports, or a one-line install hint."""
    for module_name, attr in TFLITE_INTERPRETERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return getattr(module, attr)
    raise UsageError("no TFLite runtime is installed: pip install 'edgeagent[litert]'")


def tflite_uses_variables(path: Path) -> bool:
    """True when a TFLite model keeps state in resource variables (VAR_HANDLE/READ/ASSIGN_VARIABLE ops)."""
    from edgeagent.runtimes.tflite_ops import uses_variables

    return uses_variables(path)


def _inspect_onnx(path: Path) -> tuple[Precision, list[TensorSpec], list[TensorSpec]]:
    try:
        import onnx
    except ImportError:
        return _inspect_onnx_with_ort(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise ModelInspectionError(f"{path}: not a readable ONNX model ({exc})", path=str(path)) from exc
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tensor_type.shape.dim
        ]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        return TensorSpec(name=value.name, shape=dims, dtype=dtype)

    inputs = [spec(v) for v in graph.input if v.name not in initializer_names]
    outputs = [spec(v) for v in graph.output]
    weight_types = {onnx.helper.tensor_dtype_to_np_dtype(init.data_type) for init in graph.initializer}
    if any(node.op_type in _QUANT_OPS for node in graph.node) or weight_types & {
        np.dtype("int8"),
        np.dtype("uint8"),
    }:
        precision: Precision = "int8"
    elif np.dtype("float16") in weight_types or any(i.dtype == "float16" for i in inputs):
        precision = "fp16"
    else:
        precision = "fp32"
    return precision, inputs, outputs


def _inspect_onnx_with_ort(path: Path) -> tuple[Precision, list[TensorSpec], list[TensorSpec]]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UsageError(
            "reading ONNX models needs onnx or onnxruntime: pip install 'edgeagent[onnx]'"
        ) from exc
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelInspectionError(f"{path}: onnxruntime cannot load it ({exc})", path=str(path)) from exc

    def spec(arg: Any) -> TensorSpec:
        dtype = ORT_TYPES.get(arg.type)
        if dtype is None:
            raise ModelInspectionError(f"{path}: unsupported tensor type {arg.type}", path=str(path))
        dims = [d if isinstance(d, int) and d > 0 else None for d in arg.shape]
        return TensorSpec(name=arg.name, shape=dims, dtype=dtype)

    inputs = [spec(a) for a in session.get_inputs()]
    outputs = [spec(a) for a in session.get_outputs()]
    # Without the graph the weights are invisible: judge by the inputs (fp16 models take fp16).
    precision: Precision = "fp16" if any(i.dtype == "float16" for i in inputs) else "fp32"
    return precision, inputs, outputs


ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _inspect_tflite(path: Path) -> tuple[Precision, list[TensorSpec], list[TensorSpec]]:
    interpreter_class = tflite_interpreter_class()
    try:
        interpreter = interpreter_class(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise ModelInspectionError(f"{path}: not a readable TFLite model ({exc})", path=str(path)) from exc

    def spec(detail: dict[str, Any]) -> TensorSpec:
        signature = detail.get("shape_signature")
        shape = signature if signature is not None and len(signature) else detail["shape"]
        dims = [int(d) if int(d) > 0 else None for d in shape]
        q = detail.get("quantization_parameters") or {}
        scales = [float(s) for s in q.get("scales", [])]
        quant = None
        if scales:
            axis = int(q.get("quantized_dimension", 0))
            quant = Quantization(
                scale=scales,
                zero_point=[int(z) for z in q.get("zero_points", [])],
                axis=axis if len(scales) > 1 else None,
            )
        return TensorSpec(
            name=detail["name"], shape=dims, dtype=np.dtype(detail["dtype"]).name, quantization=quant
        )

    inputs = [spec(d) for d in interpreter.get_input_details()]
    outputs = [spec(d) for d in interpreter.get_output_details()]
    tensor_types = {np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    if tensor_types & {np.dtype("int8"), np.dtype("uint8")}:
        precision: Precision = "int8"
    elif np.dtype("float16") in tensor_types:
        precision = "fp16"
    else:
        precision = "fp32"
    return precision, inputs, outputs
