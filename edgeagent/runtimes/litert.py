"""LiteRT (TFLite) adapter: XNNPACK CPU path, GPU / Edge TPU / external delegates with fallback.

The interpreter class comes from :func:`edgeagent.modelinfo.tflite_interpreter_class`
(``ai_edge_litert`` -> ``tflite_runtime`` -> ``tensorflow.lite``). XNNPACK is the built-in
CPU path of all three, so ``xnnpack`` means "no external delegate, ``num_threads``
threads". Any other delegate is a shared library loaded with ``load_delegate``; when the
library is missing (OSError), is not a delegate, or refuses the options or the model
(ValueError/RuntimeError), the model is loaded on XNNPACK and a :class:`Fallback` says why.

The library is opened with ``ctypes`` first: LiteRT's own ``Delegate`` object raises from
its ``__del__`` when the library does not open, which Python reports as an unraisable
exception, so a missing library is caught before LiteRT sees it.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.bundle.manifest import Quantization, TensorSpec
from edgeagent.errors import InferenceError, ModelLoadError, UsageError
from edgeagent.modelinfo import tflite_interpreter_class
from edgeagent.runtimes.base import Fallback, LoadOptions, SessionInfo, one_line
from edgeagent.runtimes.tflite_ops import uses_variables

log = logging.getLogger(__name__)

XNNPACK = "xnnpack"
# Shared library of each named delegate, as its vendor ships it on Linux.
DELEGATE_LIBRARIES = {
    "gpu": "libtensorflowlite_gpu_delegate.so",
    "edgetpu": "libedgetpu.so.1",
}


class LiteRTSession(SessionInfo):
    """A TFLite ``Interpreter`` behind the :class:`~edgeagent.runtimes.base.Session` protocol.

    An interpreter is not thread-safe, so ``run`` holds a lock: concurrent requests on one
    LiteRT model are served one after the other.
    """

    runtime = "litert"

    def __init__(
        self, interpreter: Any, delegate: str, fallbacks: Sequence[Fallback], keep: Sequence[Any]
    ) -> None:
        self._interpreter: Any = interpreter
        self._delegate = delegate
        self._fallbacks = tuple(fallbacks)
        self._keep_alive = tuple(keep)  # delegate objects must outlive the interpreter
        self._lock = threading.Lock()
        in_details = interpreter.get_input_details()
        out_details = interpreter.get_output_details()
        self._inputs = tuple(tensor_spec(d) for d in in_details)
        self._outputs = tuple(tensor_spec(d) for d in out_details)
        self._input_index = {d["name"]: int(d["index"]) for d in in_details}
        self._input_shape = {d["name"]: tuple(int(x) for x in d["shape"]) for d in in_details}
        self._output_index = [int(d["index"]) for d in out_details]
        self.keeps_variables = False  # state in resource variables (set by the adapter from the file)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            interp = self._interpreter
            if interp is None:
                raise InferenceError("the LiteRT interpreter is closed", runtime=self.runtime)
            try:
                self._resize_for(feeds)
                for name, array in feeds.items():
                    interp.set_tensor(self._input_index[name], array)
                interp.invoke()
                return [interp.get_tensor(i) for i in self._output_index]  # get_tensor copies
            except (ValueError, RuntimeError) as exc:
                raise InferenceError(f"LiteRT failed: {exc}", runtime=self.runtime) from exc

    def _resize_for(self, feeds: Mapping[str, np.ndarray]) -> None:
        changed = False
        for name, array in feeds.items():
            if array.shape != self._input_shape[name]:
                self._interpreter.resize_tensor_input(self._input_index[name], list(array.shape), strict=True)
                self._input_shape[name] = array.shape
                changed = True
        if changed:
            self._interpreter.allocate_tensors()

    def close(self) -> None:
        with self._lock:
            self._interpreter = None
            self._keep_alive = ()


class LiteRTAdapter:
    """Loads ``.tflite`` files into the first TFLite interpreter that imports."""

    name = "litert"
    formats = ("tflite",)

    def unavailable_reason(self) -> str | None:
        try:
            tflite_interpreter_class()
        except UsageError as exc:
            return str(exc)
        return None

    def load(self, path: Path, options: LoadOptions) -> LiteRTSession:
        interpreter_class = tflite_interpreter_class()
        fallbacks: list[Fallback] = []
        delegates: list[Any] = []
        used = XNNPACK
        if options.delegate != XNNPACK:
            delegate, reason = _load_delegate(interpreter_class, options)
            if delegate is None:
                fallbacks.append(Fallback(options.delegate, XNNPACK, reason))
            else:
                delegates.append(delegate)
                used = options.delegate
        try:
            interpreter = _interpreter(interpreter_class, path, options, delegates)
        except (ValueError, RuntimeError) as exc:
            if not delegates:
                raise ModelLoadError(
                    f"{path.name}: LiteRT cannot load it ({exc})", runtime=self.name, path=str(path)
                ) from exc
            fallbacks.append(Fallback(options.delegate, XNNPACK, f"the delegate refused the model: {exc}"))
            delegates, used = [], XNNPACK
            try:
                interpreter = _interpreter(interpreter_class, path, options, delegates)
            except (ValueError, RuntimeError) as exc2:
                raise ModelLoadError(
                    f"{path.name}: LiteRT cannot load it ({exc2})", runtime=self.name, path=str(path)
                ) from exc2
        for fallback in fallbacks:
            log.info("%s: %s", path.name, fallback)
        session = LiteRTSession(interpreter, used, fallbacks, delegates)
        session.keeps_variables = uses_variables(path)
        return session


def _interpreter(interpreter_class: Any, path: Path, options: LoadOptions, delegates: list[Any]) -> Any:
    """The one place our typed options become Interpreter arguments."""
    interpreter = interpreter_class(
        model_path=str(path), num_threads=options.threads, experimental_delegates=delegates or None
    )
    interpreter.allocate_tensors()
    return interpreter


def _load_delegate(interpreter_class: Any, options: LoadOptions) -> tuple[Any | None, str]:
    """(delegate, "") or (None, why it cannot be used)."""
    if options.delegate == "external":
        if options.delegate_library is None:
            return None, "delegate 'external' needs delegate_library (the .so path)"
        library = str(options.delegate_library)
    elif options.delegate in DELEGATE_LIBRARIES:
        library = DELEGATE_LIBRARIES[options.delegate]
    else:
        known = ", ".join(sorted([XNNPACK, "external", *DELEGATE_LIBRARIES]))
        return None, f"unknown LiteRT delegate {options.delegate!r} (known: {known})"
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        return None, f"delegate library {library} does not load: {exc}"
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        return None, f"{library} is not a TFLite delegate (no tflite_plugin_create_delegate)"
    load_delegate = importlib.import_module(interpreter_class.__module__).load_delegate
    try:
        return load_delegate(library, dict(options.delegate_options)), ""
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"load_delegate({library!r}) failed: {one_line(exc)}"


def tensor_spec(detail: Mapping[str, Any]) -> TensorSpec:
    """A :class:`TensorSpec` from one entry of ``get_input_details()``/``get_output_details()``."""
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    q = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in q.get("scales", [])]
    quant = None
    if scales:
        quant = Quantization(
            scale=scales,
            zero_point=[int(z) for z in q.get("zero_points", [])],
            axis=int(q.get("quantized_dimension", 0)) if len(scales) > 1 else None,
        )
    return TensorSpec(
        name=str(detail["name"]),
        shape=[int(d) if int(d) > 0 else None for d in shape],
        dtype=np.dtype(detail["dtype"]).name,
        quantization=quant,
    )
