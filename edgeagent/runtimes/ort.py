"""ONNX Runtime adapter: execution providers, typed session options, silent-fallback detection.

ONNX Runtime quietly runs on the CPU when an execution provider it was given cannot be
used: a provider missing from this build only warns, and one whose libraries fail to
initialise (no CUDA, no TensorRT) is dropped from the session. So the adapter:

1. asks for a provider only when ``onnxruntime.get_available_providers()`` lists it, else
   records a :class:`Fallback` ("not in this onnxruntime build");
2. after creating the session compares ``session.get_providers()`` with what it asked, and
   records a :class:`Fallback` for a provider that was dropped;
3. if the session cannot be created with the provider at all, retries on the CPU alone and
   records why.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.bundle.manifest import TensorSpec
from edgeagent.errors import InferenceError, ModelLoadError
from edgeagent.modelinfo import ORT_TYPES
from edgeagent.runtimes.base import Fallback, LoadOptions, SessionInfo, one_line

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def _ort() -> Any:
    return importlib.import_module("onnxruntime")


def session_options(options: LoadOptions) -> Any:
    """The one place our typed options become ``onnxruntime.SessionOptions``."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if options.threads is not None:
        so.intra_op_num_threads = options.threads
    so.log_severity_level = 3  # errors only; fallbacks are reported through Fallback records
    return so


def provider_options(options: LoadOptions) -> dict[str, str]:
    """The one place our typed options become a provider's string options."""
    if options.delegate == "TensorrtExecutionProvider":
        opts = {
            "trt_fp16_enable": str(options.precision == "fp16"),
            "trt_int8_enable": str(options.precision == "int8"),
        }
        if options.cache_dir is not None:
            opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(options.cache_dir))
        return opts
    return {}


class OrtSession(SessionInfo):
    """An ``onnxruntime.InferenceSession`` behind the :class:`~edgeagent.runtimes.base.Session` protocol."""

    runtime = "onnxruntime"

    def __init__(self, session: Any, delegate: str, fallbacks: Sequence[Fallback]) -> None:
        self._session: Any = session
        self._delegate = delegate
        self._fallbacks = tuple(fallbacks)
        self._inputs = tuple(_spec(a) for a in session.get_inputs())
        self._outputs = tuple(_spec(a) for a in session.get_outputs())
        self._output_names = [o.name for o in self._outputs]
        self._lock = threading.Lock()  # guards close() against a concurrent run()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # InferenceSession.run is thread-safe; no lock on the hot path.
        session = self._session
        if session is None:
            raise InferenceError("the onnxruntime session is closed", runtime=self.runtime)
        try:
            return list(session.run(self._output_names, dict(feeds)))
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
            raise InferenceError(f"onnxruntime failed: {exc}", runtime=self.runtime) from exc

    def close(self) -> None:
        with self._lock:
            self._session = None  # the C++ session is freed with its last reference


class OrtAdapter:
    """Loads ``.onnx`` files into ONNX Runtime with one requested execution provider."""

    name = "onnxruntime"
    formats = ("onnx",)

    def unavailable_reason(self) -> str | None:
        try:
            _ort()
        except ImportError as exc:
            return f"onnxruntime does not import ({exc}): pip install 'edgeagent[onnx]'"
        return None

    def load(self, path: Path, options: LoadOptions) -> OrtSession:
        ort = _ort()
        requested = options.delegate
        available = list(ort.get_available_providers())
        fallbacks: list[Fallback] = []
        providers: list[Any] = [CPU]
        if requested != CPU:
            if requested in available:
                providers = [(requested, provider_options(options)), CPU]
            else:
                fallbacks.append(
                    Fallback(
                        requested, CPU, f"not in this onnxruntime build (available: {', '.join(available)})"
                    )
                )
        so = session_options(options)
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            if len(providers) == 1:
                raise ModelLoadError(
                    f"{path.name}: onnxruntime cannot load it ({exc})", runtime=self.name, path=str(path)
                ) from exc
            fallbacks.append(Fallback(requested, CPU, f"session creation failed with it: {one_line(exc)}"))
            try:
                session = ort.InferenceSession(str(path), sess_options=so, providers=[CPU])
            except Exception as exc2:
                raise ModelLoadError(
                    f"{path.name}: onnxruntime cannot load it ({exc2})", runtime=self.name, path=str(path)
                ) from exc2
        in_use = list(session.get_providers())
        fallbacks.extend(dropped_providers([p if isinstance(p, str) else p[0] for p in providers], in_use))
        delegate = requested if requested in in_use else in_use[0]
        for fallback in fallbacks:
            log.info("%s: %s", path.name, fallback)
        return OrtSession(session, delegate, fallbacks)


def dropped_providers(asked: Sequence[str], in_use: Sequence[str]) -> list[Fallback]:
    """Providers ORT silently left out of a session: asked for, but not in ``get_providers()``."""
    used = in_use[0] if in_use else CPU
    return [
        Fallback(
            name,
            used,
            "onnxruntime dropped it when creating the session (its libraries or device failed to "
            "initialise; run with -vv for onnxruntime's log)",
        )
        for name in asked
        if name not in in_use
    ]


def _spec(arg: Any) -> TensorSpec:
    dtype = ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(
            f"unsupported tensor type {arg.type} for {arg.name}", runtime="onnxruntime", path=""
        )
    dims = [d if isinstance(d, int) and d > 0 else None for d in arg.shape]
    return TensorSpec(name=arg.name, shape=dims, dtype=dtype)
