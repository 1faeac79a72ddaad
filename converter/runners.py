"""Run a model of any kind on the host: ONNX Runtime, LiteRT, Keras, a SavedModel or a torch program.

Every runner takes named inputs (:mod:`converter.feeds`: one array per input, one row per
sample, in the dtype the model declares) and returns every output in the model's order.
Quantized TFLite inputs/outputs are (de)quantized here with the tensor's own scale and zero
point, as a device's runtime adapter does, so such a runner takes and returns float32.
ONNX and TFLite runners take any number of inputs; Keras, SavedModel and torch programs
(host-side sources and teachers) take one. ``predict(x)`` is the one-input shortcut the
training passes use: float32 rows in, the first output as float32 out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from converter import extras
from converter.errors import ModelLoadError
from converter.feeds import Feeds, InputSpec, fit_feeds, fit_shape, rows, sample, stack_rows
from converter.model import ModelArtifact, check_one_input, load_keras, load_torch_program

FloatArray = npt.NDArray[np.float32]


class Runner(Protocol):
    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """Per-sample shape of a one-input model (no batch dimension); None where a dim is dynamic."""
        ...

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Every output for the N samples of ``feeds`` (fitted to the inputs with :func:`fit_feeds`)."""
        ...

    def predict(self, x: npt.NDArray[Any]) -> FloatArray:
        """One-input models: the first output for a batch ``x`` of shape (N, *sample_shape)."""
        ...

    def first_sample(self, feeds: Mapping[str, npt.NDArray[Any]]) -> Feeds:
        """Sample 0 of ``feeds``, fitted, as :meth:`invoke_one` takes it."""
        ...

    def invoke_one(self, one: Feeds) -> None:
        """Run one sample from :meth:`first_sample`; used for latency."""
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
    """Float32 rows reshaped to a one-input model's per-sample shape (see :func:`fit_shape`)."""
    return fit_shape(np.asarray(x, dtype=np.float32), sample_shape)


def time_invocations(
    runner: Runner, sample: Mapping[str, npt.NDArray[Any]] | npt.NDArray[Any], runs: int, warmup: int
) -> list[float]:
    """Wall-clock milliseconds of ``runs`` single-sample invocations after ``warmup`` untimed ones.

    ``sample`` holds at least one row per input (an array for a one-input model); row 0 runs.
    """
    feeds = sample if isinstance(sample, Mapping) else {runner.inputs[0].name: sample}
    one = runner.first_sample(feeds)
    for _ in range(warmup):
        runner.invoke_one(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.invoke_one(one)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


class _Base:
    """Batching and fitting shared by the runners; subclasses set the specs and ``_call``."""

    inputs: tuple[InputSpec, ...]
    output_names: tuple[str, ...]
    path: Path
    batch_dynamic: bool

    def _call(self, feeds: Feeds) -> list[npt.NDArray[Any]]:
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        check_one_input(self.path, len(self.inputs))
        return self.inputs[0].shape

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        fitted = fit_feeds(self.inputs, feeds)
        if self.batch_dynamic and not any(s.unbatched for s in self.inputs):
            return self._call(fitted)
        # A fixed batch (a TFLite artifact: what a device runs) or an input without a batch
        # dimension (a scalar, a state fed whole): one sample at a time.
        return stack_rows([self._call(sample(self.inputs, fitted, i)) for i in range(rows(fitted))])

    def predict(self, x: npt.NDArray[Any]) -> FloatArray:
        check_one_input(self.path, len(self.inputs))
        return np.asarray(self.run({self.inputs[0].name: x})[0], dtype=np.float32)

    def first_sample(self, feeds: Mapping[str, npt.NDArray[Any]]) -> Feeds:
        return sample(self.inputs, fit_feeds(self.inputs, {k: v[:1] for k, v in feeds.items()}), 0)

    def invoke_one(self, one: Feeds) -> None:
        self._call(one)


def _dims(shape: Any) -> tuple[int | None, ...]:
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in shape)


class OnnxRunner(_Base):
    def __init__(self, model: ModelArtifact) -> None:
        from edgeagent.modelinfo import ORT_TYPES
        from edgeagent.runtimes.model import fed_whole

        ort = extras.require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = extras.THREADS
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises Fail/InvalidGraph/NotImplemented from C++
            raise ModelLoadError(f"{model.path}: onnxruntime cannot load it ({exc})") from exc
        self.path = model.path
        args = self.session.get_inputs()
        unknown = [a for a in args if a.type not in ORT_TYPES]
        if unknown:
            raise ModelLoadError(
                f"{model.path}: input {unknown[0].name!r} has unsupported type {unknown[0].type}"
            )
        whole = fed_whole({a.name: _dims(a.shape) for a in args})
        self.inputs = tuple(
            InputSpec(
                a.name,
                np.dtype(ORT_TYPES[a.type]),
                _dims(a.shape if a.name in whole else a.shape[1:]),
                scalar=not a.shape,
                whole=a.name in whole,
            )
            for a in args
        )
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        batched = [a for a in args if a.shape and a.name not in whole]
        self.batch_dynamic = all(not isinstance(a.shape[0], int) or a.shape[0] <= 0 for a in batched)
        fixed = next((a for a in batched if isinstance(a.shape[0], int) and a.shape[0] > 1), None)
        if fixed is not None:
            # Evaluation and latency run one sample at a time; ORT would refuse it in 35 lines.
            raise ModelLoadError(
                f"{model.path}: input {fixed.name!r} has a fixed batch of {fixed.shape[0]}; the converter "
                "needs a batch of 1 or a dynamic batch (export with a dynamic first dimension)"
            )

    def _call(self, feeds: Feeds) -> list[npt.NDArray[Any]]:
        return list(self.session.run(list(self.output_names), feeds))


class TfliteRunner(_Base):
    """The artifact's batch is fixed to 1 (what a device runs), so one invocation per sample."""

    batch_dynamic = False

    def __init__(self, model: ModelArtifact) -> None:
        from edgeagent.modelinfo import tflite_interpreter_class
        from edgeagent.runtimes.model import fed_whole

        interpreter_class = tflite_interpreter_class()
        try:
            self.interpreter = interpreter_class(model_path=str(model.path), num_threads=extras.THREADS)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{model.path}: LiteRT cannot load it ({exc})") from exc
        self.path = model.path
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        whole = fed_whole({str(d["name"]): [int(x) for x in d["shape"]] for d in self._in})
        self.inputs = tuple(
            InputSpec(
                str(d["name"]),
                np.dtype(np.float32) if _quantized(d) else np.dtype(d["dtype"]),
                tuple(int(x) for x in d["shape"][0 if d["name"] in whole else 1 :]),
                scalar=len(d["shape"]) == 0,
                whole=d["name"] in whole,
            )
            for d in self._in
        )
        self.output_names = tuple(str(d["name"]) for d in self._out)

    def _call(self, feeds: Feeds) -> list[npt.NDArray[Any]]:
        for detail, spec in zip(self._in, self.inputs, strict=True):
            self.interpreter.set_tensor(detail["index"], _quantize(detail, feeds[spec.name]))
        self.interpreter.invoke()
        return [_dequantize(d, self.interpreter.get_tensor(d["index"])) for d in self._out]


def _quantized(detail: Mapping[str, Any]) -> bool:
    scale, _ = detail["quantization"]
    return bool(scale) and np.dtype(detail["dtype"]).kind in "iu"


def _quantize(detail: Mapping[str, Any], x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    dtype = np.dtype(detail["dtype"])
    if _quantized(detail):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(dtype)
        return np.asarray(np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype))
    return np.asarray(x, dtype=dtype)


def _dequantize(detail: Mapping[str, Any], y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if _quantized(detail):
        scale, zero_point = detail["quantization"]
        return np.asarray((y.astype(np.float32) - zero_point) * scale, dtype=np.float32)
    return y


class _OneInput(_Base):
    """Keras, SavedModel and torch sources: one float input, the first output; batching their own."""

    output_names: tuple[str, ...] = ("output",)
    batch_dynamic = True

    def _setup(self, path: Path, sample_shape: tuple[int | None, ...]) -> None:
        self.path = path
        self.inputs = (InputSpec("x", np.dtype(np.float32), sample_shape),)

    def _predict(self, x: FloatArray) -> FloatArray:
        raise NotImplementedError

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return [self._predict(fit_feeds(self.inputs, feeds)["x"])]

    def _call(self, feeds: Feeds) -> list[npt.NDArray[Any]]:
        return [self._predict(feeds["x"])]


class KerasRunner(_OneInput):
    def __init__(self, model: ModelArtifact) -> None:
        self.model = load_keras(model.path)
        check_one_input(model.path, len(self.model.inputs))
        shape = self.model.inputs[0].shape
        self._setup(model.path, tuple(None if d is None else int(d) for d in shape[1:]))

    def _predict(self, x: FloatArray) -> FloatArray:
        out = [np.asarray(self.model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)]
        return np.concatenate(out).astype(np.float32)


class SavedModelRunner(_OneInput):
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
        self._setup(model.path, tuple(None if d is None else int(d) for d in spec.shape[1:]))
        self.batch = spec.shape[0]

    def _signature(self, x: FloatArray) -> FloatArray:
        outputs = self.fn(**{self.input_key: x})
        return np.asarray(next(iter(outputs.values())), dtype=np.float32)

    def _predict(self, x: FloatArray) -> FloatArray:
        if self.batch is None:
            return self._signature(x)
        return np.concatenate([self._signature(x[i : i + 1]) for i in range(len(x))])


class TorchRunner(_OneInput):
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
        self._setup(model.path, tuple(fixed[1:]))
        self.module = program.module()

    def _forward(self, x: FloatArray) -> FloatArray:
        with self.torch.no_grad():
            out = self.module(self.torch.from_numpy(np.ascontiguousarray(x)))
        return np.asarray(out.detach().numpy(), dtype=np.float32)

    def _predict(self, x: FloatArray) -> FloatArray:
        step = self.batch or 512
        if self.batch is None or len(x) % step == 0:
            return np.concatenate([self._forward(x[i : i + step]) for i in range(0, len(x), step)])
        parts = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            parts.append(self._forward(padded)[: len(chunk)])
        return np.concatenate(parts)
