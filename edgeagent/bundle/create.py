"""Build a bundle from model files, an optional golden set and labels (host side).

The model specs come from the model files themselves (:mod:`edgeagent.modelinfo`);
the golden set is checked against the first model's input before anything is written,
so a mismatch is caught on the host rather than by a device's acceptance test.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgeagent.bundle.golden import load_golden
from edgeagent.bundle.manifest import (
    GOLDEN_PATH,
    LABELS_PATH,
    MODELS_DIR,
    SCHEMA_VERSION,
    AcceptanceGate,
    CompressionStep,
    Manifest,
    ModelEntry,
    Preprocessing,
    TensorSpec,
)
from edgeagent.bundle.writer import file_entries, write_bundle
from edgeagent.errors import UsageError
from edgeagent.modelinfo import inspect_model
from edgeagent.signing import SigningKey
from edgeagent.storage import hash_file
from edgeagent.validation import problems

_RUNTIMES = {"onnx": ["onnxruntime"], "tflite": ["litert"]}


@dataclass(frozen=True)
class CreatedBundle:
    path: Path
    sha256: str
    manifest: Manifest


def create_bundle(
    *,
    name: str,
    version: str,
    models: Sequence[Path],
    key: SigningKey | None,
    out_dir: Path,
    golden: Path | None = None,
    labels: Path | None = None,
    description: str = "",
    gate: AcceptanceGate | None = None,
    preprocessing: Preprocessing | None = None,
    compression: Sequence[CompressionStep] = (),
) -> CreatedBundle:
    """Write ``out_dir/NAME-VERSION.bundle`` and return its path, sha256 and manifest.

    ``gate`` gives the acceptance bounds; its ``golden`` and ``samples`` are filled in here.
    """
    if not models:
        raise UsageError("a bundle needs at least one --model")
    files: dict[str, Path] = {}
    entries = []
    for model_path in models:
        arcname = f"{MODELS_DIR}/{model_path.name}"
        if arcname in files:
            raise UsageError(f"two models are named {model_path.name}; rename one")
        fmt, precision, inputs, outputs = inspect_model(model_path)
        files[arcname] = model_path
        entries.append(
            ModelEntry(
                path=arcname,
                format=fmt,
                precision=precision,
                inputs=inputs,
                outputs=outputs,
                runtimes=_RUNTIMES[fmt],
                # Edge TPU artifacts are compiled for the TPU and useless anywhere else.
                delegates=["edgetpu"] if model_path.name.endswith("_edgetpu.tflite") else [],
            )
        )
    gate_fields = (gate or AcceptanceGate()).model_dump()
    if golden is not None:
        samples = check_golden(golden, entries[0].inputs)
        files[GOLDEN_PATH] = golden
        gate_fields.update(golden=GOLDEN_PATH, samples=samples)
    if labels is not None:
        if not labels.is_file():
            raise UsageError(f"{labels}: no such labels file")
        files[LABELS_PATH] = labels
    try:
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=name,
            version=version,
            description=description,
            files=file_entries(files),
            models=entries,
            labels=LABELS_PATH if labels is not None else None,
            preprocessing=preprocessing or Preprocessing(),
            acceptance=AcceptanceGate.model_validate(gate_fields),
            compression=list(compression),
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise UsageError(_invalid_bundle(exc)) from exc
    out_path = out_dir / manifest.bundle_filename
    if out_path.exists():
        return _same_as_existing(manifest, files, key, out_path)
    sha = write_bundle(manifest, files, key, out_path)
    return CreatedBundle(path=out_path, sha256=sha, manifest=manifest)


def _same_as_existing(
    manifest: Manifest, files: dict[str, Path], key: SigningKey | None, out: Path
) -> CreatedBundle:
    """Rebuilding an existing name-version is fine when the bytes agree; anything else is refused.

    A name-version names one bundle everywhere (registry, devices' stores, events): silently
    replacing it would leave two different files under one name.
    """
    _, existing = hash_file(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".rebuild-") as tmp:
        sha = write_bundle(manifest, files, key, Path(tmp) / out.name)
    if sha != existing:
        raise UsageError(
            f"{out} already exists with different content (sha256 {existing[:12]}…, this build {sha[:12]}…); "
            "bump --version, or remove the old bundle"
        )
    return CreatedBundle(path=out, sha256=sha, manifest=manifest)


def check_golden(path: Path, model_inputs: Sequence[TensorSpec]) -> int:
    """Validate a golden ``.npz`` against the first model's input; return its number of samples."""
    golden = load_golden(path)
    if len(model_inputs) == 1:
        expected = model_inputs[0].shape[1:]
        sample = list(golden.inputs.shape[1:])
        mismatch = len(expected) != len(sample) or any(
            e is not None and e != s for e, s in zip(expected, sample, strict=True)
        )
        if mismatch:
            raise UsageError(
                f"{path}: golden inputs have sample shape {sample} but the model's "
                f"{model_inputs[0].name!r} takes {expected} per sample"
            )
    return len(golden)


def _invalid_bundle(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid bundle: {problems(exc)}"
    return str(exc)
