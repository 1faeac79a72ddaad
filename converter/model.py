"""What flows between passes: a model file and its kind.

A model is always a file (or a SavedModel folder) on disk, so every pass reads its input
and writes a new file: intermediate artifacts stay inspectable and the evaluator measures
exactly the bytes that would ship.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from converter import extras
from converter.errors import ModelLoadError, ModelPathError

ModelKind = Literal["onnx", "tflite", "keras", "savedmodel", "torch"]

#: Kinds a device can run (the others are host-side sources: Keras/SavedModel for the tflite
#: pass, torch programs as distillation teachers).
DEPLOYABLE: frozenset[str] = frozenset({"onnx", "tflite"})


@dataclass(frozen=True)
class ModelArtifact:
    """A model on disk. ``path`` is a file, or a folder for a SavedModel."""

    path: Path
    kind: ModelKind

    @property
    def deployable(self) -> bool:
        return self.kind in DEPLOYABLE

    @property
    def stem(self) -> str:
        name = self.path.name
        for suffix in (".onnx", ".tflite", ".keras", ".h5", ".pt2"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def size_bytes(self) -> int:
        """Size on disk in bytes (the sum over files for a SavedModel folder)."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in sorted(self.path.rglob("*")) if p.is_file())
        return self.path.stat().st_size

    def read_bytes(self) -> bytes:
        """The artifact's bytes (files of a SavedModel concatenated in name order)."""
        if self.path.is_dir():
            return b"".join(p.read_bytes() for p in sorted(self.path.rglob("*")) if p.is_file())
        return self.path.read_bytes()


def detect(path: Path) -> ModelArtifact:
    """Recognise an input model by its suffix (or a SavedModel folder)."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return ModelArtifact(path, "savedmodel")
        raise ModelPathError(f"{path}: a folder, but not a SavedModel (no saved_model.pb)", path=str(path))
    if not path.is_file():
        raise ModelPathError(f"{path}: no such model file", path=str(path))
    suffix = path.suffix.lower()
    kinds: dict[str, ModelKind] = {
        ".onnx": "onnx",
        ".tflite": "tflite",
        ".keras": "keras",
        ".h5": "keras",
        ".pt2": "torch",
    }
    if suffix not in kinds:
        raise ModelPathError(
            f"{path}: unknown model type {suffix or '(no suffix)'}; "
            "expected .onnx, .keras, .h5, .tflite, .pt2 (torch.export) or a SavedModel folder",
            path=str(path),
        )
    return ModelArtifact(path, kinds[suffix])


def check_one_input(path: Path, count: int) -> None:
    """Training, distillation and the TFLite conversion handle one-input models; say so for any other.

    (Evaluation, quantization and packaging take any number of named inputs.)
    """
    if count != 1:
        raise ModelLoadError(
            f"{path}: this step (fine-tuning, distillation, TFLite conversion) handles models with "
            f"one input, not {count}",
            path=str(path),
        )


def load_onnx(path: Path) -> Any:
    """An ``onnx.ModelProto`` (weights included), or :class:`ModelLoadError`."""
    onnx = extras.require("onnx")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends have no common base
        raise ModelLoadError(f"{path}: not a readable ONNX model ({exc})", path=str(path)) from exc


def load_keras(path: Path) -> Any:
    """A Keras model (without its optimizer), or :class:`ModelLoadError`."""
    extras.tensorflow()
    keras = extras.require("keras")
    try:
        return keras.models.load_model(str(path), compile=False)
    except (ValueError, OSError, TypeError) as exc:
        raise ModelLoadError(f"{path}: Keras cannot load it ({exc})", path=str(path)) from exc


def load_torch_program(path: Path) -> Any:
    """A ``torch.export.ExportedProgram`` saved with ``torch.export.save``, or :class:`ModelLoadError`."""
    torch = extras.torch()
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # zip, pickle and version errors have no common base
        raise ModelLoadError(
            f"{path}: not a torch.export program ({exc}); save one with "
            "torch.export.save(torch.export.export(model, (example,)), 'model.pt2')",
            path=str(path),
        ) from exc
