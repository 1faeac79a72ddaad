"""Run a model of any kind on the host: ONNX Runtime, LiteRT, Keras, a SavedModel or a torch program.

Every runner takes float32 inputs shaped like the evaluation data (one row per sample) and
returns float32 outputs; quantized TFLite inputs/outputs are (de)quantized here with the
tensor's own scale and zero point, as a device's runtime adapter does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from converter import extras
from converter.errors import DataError, ModelLoadError
from converter.model import ModelArtifact, check_one_input, load_keras, load_torch_program

FloatArray = npt.NDArray[np.float32]


class Runner(Protocol):
    #: Per-sample input shape (no batch dimension); None where the model leaves a dim dynamic.
    sample_shape: tuple[int | None, ...]

    def predict(self, x: FloatArray) -> FloatArray:
        """Outputs for a batch ``x`` of shape (N, *sample_shape)."""
        ...

    def invoke_one(self, x: FloatArray) -> None:
        """Run one sample of shape (1, *sample_shape); used for latency."""
        ...


def open_runner(model: ModelArtifact) -> Runner:
    """A runner for ``model`` (imports the runtime it needs)."""
    openers: dict[str, Callable[[ModelArtifact], Runner]] = {
        "onnx": OnnxRunner,
        "tflite": TfliteRunner,
        "keras": KerasRunner,
        "savedmodel": SavedModelRunner,
        "torch": TorchRunner,
    }
    return openers[model.kind](model)


def fit_inputs(x: npt.NDArray[Any], sample_shape: tuple[int | None, ...]) -> FloatArray:
    """Reshape data rows to the model's per-sample shape when only the layout differs.

    Digits images (N, 8, 8, 1) feed an MLP that takes (N, 64): same elements per sample, so
    the rows are reshaped (row-major). Anything else that does not fit is a :class:`DataError`.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] == sample_shape or (None in sample_shape and len(sample_shape) == x.ndim - 1):
        return x
    want = int(np.prod([d for d in sample_shape if d is not None]))
    have = int(np.prod(x.shape[1:]))
    if None not in sample_shape and want == have:
        return x.reshape((len(x), *[int(d) for d in sample_shape if d is not None]))
    raise DataError(
        f"data samples have shape {list(x.shape[1:])} but the model takes {list(sample_shape)} per sample"
    )


def time_invocations(runner: Runner, sample: FloatArray, runs: int, warmup: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` single-sample invocations after ``warmup`` untimed ones."""
    for _ in range(warmup):
        runner.invoke_one(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.invoke_one(sample)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


class OnnxRunner:
    def __init__(self, model: ModelArtifact) -> None:
        ort = extras.require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = extras.THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises Fail/InvalidGraph/NotImplemented from C++
            raise ModelLoadError(f"{model.path}: onnxruntime cannot load it ({exc})") from exc
        inputs = self.session.get_inputs()
        check_one_input(model.path, len(inputs))
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        self.batch_dynamic = not isinstance(shape[0], int) or shape[0] <= 0
        if not self.batch_dynamic and shape[0] != 1:
            # Evaluation and latency run one sample at a time; ORT would refuse it in 35 lines.
            raise ModelLoadError(
                f"{model.path}: input {self.input_name!r} has a fixed batch of {shape[0]}; the converter "
                "needs a batch of 1 or a dynamic batch (export with a dynamic first dimension)"
            )
        self.sample_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in shape[1:])

    def predict(self, x: FloatArray) -> FloatArray:
        if self.batch_dynamic:
            out = self.session.run(None, {self.input_name: x})[0]
        else:
            out = np.concatenate(
                [self.session.run(None, {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
            )
        return np.asarray(out, dtype=np.float32)

    def invoke_one(self, x: FloatArray) -> None:
        self.session.run(None, {self.input_name: x})


class TfliteRunner:
    def __init__(self, model: ModelArtifact) -> None:
        from edgeagent.modelinfo import tflite_interpreter_class

        interpreter_class = tflite_interpreter_class()
        try:
            self.interpreter = interpreter_class(model_path=str(model.path), num_threads=extras.THREADS)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{model.path}: LiteRT cannot load it ({exc})") from exc
        inputs = self.interpreter.get_input_details()
        check_one_input(model.path, len(inputs))
        self.input = inputs[0]
        self.output = self.interpreter.get_output_details()[0]
        self.sample_shape: tuple[int | None, ...] = tuple(int(d) for d in self.input["shape"][1:])

    def _quantize(self, x: FloatArray) -> npt.NDArray[Any]:
        dtype = np.dtype(self.input["dtype"])
        scale, zero_point = self.input["quantization"]
        if dtype.kind in "iu" and scale:
            info = np.iinfo(dtype)
            return np.asarray(np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype))
        return np.asarray(x.astype(dtype))

    def _dequantize(self, y: npt.NDArray[Any]) -> FloatArray:
        scale, zero_point = self.output["quantization"]
        if y.dtype.kind in "iu" and scale:
            return np.asarray((y.astype(np.float32) - zero_point) * scale, dtype=np.float32)
        return y.astype(np.float32)

    def _invoke(self, x: FloatArray) -> FloatArray:
        self.interpreter.set_tensor(self.input["index"], self._quantize(x))
        self.interpreter.invoke()
        return self._dequantize(self.interpreter.get_tensor(self.output["index"]))

    def predict(self, x: FloatArray) -> FloatArray:
        # The artifact's batch is fixed to 1 (what a device runs), so one invoke per sample.
        return np.concatenate([self._invoke(x[i : i + 1]) for i in range(len(x))])

    def invoke_one(self, x: FloatArray) -> None:
        self._invoke(x)


class KerasRunner:
    def __init__(self, model: ModelArtifact) -> None:
        self.model = load_keras(model.path)
        shape = self.model.inputs[0].shape
        self.sample_shape = tuple(None if d is None else int(d) for d in shape[1:])

    def predict(self, x: FloatArray) -> FloatArray:
        out = [np.asarray(self.model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)]
        return np.concatenate(out).astype(np.float32)

    def invoke_one(self, x: FloatArray) -> None:
        self.model(x, training=False)


class SavedModelRunner:
    def __init__(self, model: ModelArtifact) -> None:
        tf = extras.tensorflow()
        try:
            loaded = tf.saved_model.load(str(model.path))
            self.fn = loaded.signatures["serving_default"]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"{model.path}: no loadable serving_default signature ({exc})") from exc
        self._loaded = loaded  # keeps the variables alive
        specs = self.fn.structured_input_signature[1]
        check_one_input(model.path, len(specs))
        self.input_key, spec = next(iter(specs.items()))
        self.sample_shape = tuple(None if d is None else int(d) for d in spec.shape[1:])
        self.batch = spec.shape[0]

    def _call(self, x: FloatArray) -> FloatArray:
        outputs = self.fn(**{self.input_key: x})
        return np.asarray(next(iter(outputs.values())), dtype=np.float32)

    def predict(self, x: FloatArray) -> FloatArray:
        if self.batch is None:
            return self._call(x)
        return np.concatenate([self._call(x[i : i + 1]) for i in range(len(x))])

    def invoke_one(self, x: FloatArray) -> None:
        self._call(x)


class TorchRunner:
    """A ``torch.export`` program (``.pt2``); a dynamic batch dimension is used as such."""

    def __init__(self, model: ModelArtifact) -> None:
        self.torch = extras.torch()
        program = load_torch_program(model.path)
        user_inputs = program.graph_signature.user_inputs
        check_one_input(model.path, len(user_inputs))
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
        shape = list(node.meta["val"].shape)
        fixed = [d if isinstance(d, int) else None for d in shape]
        # A batch size fixed at export time is run sample by sample in chunks of that size.
        self.batch = fixed[0]
        self.sample_shape = tuple(fixed[1:])
        self.module = program.module()

    def _call(self, x: FloatArray) -> FloatArray:
        with self.torch.no_grad():
            out = self.module(self.torch.from_numpy(np.ascontiguousarray(x)))
        return np.asarray(out.detach().numpy(), dtype=np.float32)

    def predict(self, x: FloatArray) -> FloatArray:
        step = self.batch or 512
        if self.batch is None or len(x) % step == 0:
            return np.concatenate([self._call(x[i : i + step]) for i in range(0, len(x), step)])
        rows = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            rows.append(self._call(padded)[: len(chunk)])
        return np.concatenate(rows)

    def invoke_one(self, x: FloatArray) -> None:
        self.predict(x)
