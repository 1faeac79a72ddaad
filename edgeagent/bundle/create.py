"""Build a bundle from model files, an optional golden set and labels (host side).

The model specs come from the model files themselves (:mod:`edgeagent.modelinfo`);
the golden set is checked against every model's inputs and outputs (names, per-sample
shapes, dtypes) before anything is written, so a mismatch is caught on the host rather
than by a device's acceptance test.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from edgeagent.bundle.golden import GoldenSet, load_golden, match_inputs, match_outputs
from edgeagent.bundle.manifest import (
    GATED_MODELS_VERSION,
    GOLDEN_PATH,
    LABELS_PATH,
    MODELS_DIR,
    SCHEMA_VERSION,
    STATE_VERSION,
    AcceptanceGate,
    CompressionStep,
    Manifest,
    ModelEntry,
    ModelState,
    Preprocessing,
    StatePair,
    TensorSpec,
)
from edgeagent.bundle.writer import file_entries, write_bundle
from edgeagent.errors import UsageError
from edgeagent.modelinfo import inspect_model, tflite_uses_variables
from edgeagent.runtimes.model import fed_whole
from edgeagent.signing import SigningKey
from edgeagent.storage import hash_file
from edgeagent.validation import problems

STATE_DIR = "state"  # initial state arrays: state/<input>.npy
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
    model_gates: Mapping[Path, AcceptanceGate] | None = None,
    serve_precision: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    state: Mapping[str, str] | None = None,
    state_initial: Mapping[str, Path] | None = None,
) -> CreatedBundle:
    """Write ``out_dir/NAME-VERSION.bundle`` and return its path, sha256 and manifest.

    ``gate`` gives the bundle-level acceptance bounds; its ``golden`` and ``samples`` are
    filled in here. ``model_gates`` gives some models (keyed by the path in ``models``) their
    own gate, checked on the bundle's golden set; the manifest is then schema_version 2.
    ``serve_precision`` is the author's precision preference (manifest ``serve_precision``).
    ``input_shapes`` (input name, or "" for the only input -> full shape with batch 1) give the
    shapes a latency budget is timed on without a golden set; see :func:`latency_shapes`.
    ``state`` maps state outputs to the inputs they feed on the next step (every model must
    have them), ``state_initial`` a state input to a ``.npy`` holding its initial value; a
    TFLite model that keeps state in resource variables is marked stateful on its own. A
    stateful bundle's manifest is schema_version 3.
    """
    if not models:
        raise UsageError("a bundle needs at least one --model")
    own_gates = dict(model_gates or {})
    unknown = sorted(str(p) for p in set(own_gates) - set(models))
    if unknown:
        raise UsageError(f"gates given for models that are not in the bundle: {', '.join(unknown)}")
    files: dict[str, Path] = {}
    entries = []
    for model_path in models:
        arcname = f"{MODELS_DIR}/{model_path.name}"
        if arcname in files:
            raise UsageError(f"two models are named {model_path.name}; rename one")
        fmt, precision, inputs, outputs = inspect_model(model_path)
        model_state = model_state_of(model_path, fmt, state or {}, state_initial or {})
        files[arcname] = model_path
        entries.append(
            _entry(
                path=arcname,
                format=fmt,
                precision=precision,
                inputs=inputs,
                outputs=outputs,
                runtimes=_RUNTIMES[fmt],
                # Edge TPU artifacts are compiled for the TPU and useless anywhere else.
                delegates=["edgetpu"] if model_path.name.endswith("_edgetpu.tflite") else [],
                # One golden set per bundle: an artifact's own gate is checked on it.
                acceptance=_own_gate(own_gates.get(model_path)),
                state=model_state,
            )
        )
    for name, path in (state_initial or {}).items():
        if not path.is_file():
            raise UsageError(f"{path}: no such initial state file")
        files[f"{STATE_DIR}/{name}.npy"] = path
    gate_fields = (gate or AcceptanceGate()).model_dump()
    golden_set = None
    if golden is not None:
        samples = check_golden(golden, entries)
        golden_set = load_golden(golden)
        files[GOLDEN_PATH] = golden
        gate_fields.update(golden=GOLDEN_PATH, samples=samples)
    gate_fields["latency_shapes"] = _recorded_shapes(entries, golden_set, input_shapes or {}, gate, own_gates)
    tasked = any(gate_fields[k] for k in ("task", "outputs", "latency_shapes")) or any(
        g.uses_tasks for g in own_gates.values()
    )
    if labels is not None:
        if not labels.is_file():
            raise UsageError(f"{labels}: no such labels file")
        files[LABELS_PATH] = labels
    try:
        manifest = Manifest(
            schema_version=_schema_version(entries, bool(own_gates), bool(tasked)),
            name=name,
            version=version,
            description=description,
            files=file_entries(files),
            models=entries,
            labels=LABELS_PATH if labels is not None else None,
            preprocessing=preprocessing or Preprocessing(),
            acceptance=AcceptanceGate.model_validate(gate_fields),
            compression=list(compression),
            serve_precision=list(serve_precision),
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


def _recorded_shapes(
    entries: Sequence[ModelEntry],
    golden: GoldenSet | None,
    given: Mapping[str, Sequence[int]],
    gate: AcceptanceGate | None,
    own_gates: Mapping[Path, AcceptanceGate],
) -> dict[str, list[int]]:
    """The bundle gate's ``latency_shapes``: only when some gate has a latency budget."""
    if any(g.latency_p95_ms for g in (gate, *own_gates.values()) if g is not None):
        return latency_shapes(entries, golden, given)
    if given:
        raise UsageError(
            "--input-shape sets the shapes a latency budget is timed on, and no latency budget is set"
        )
    return {}


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``NAME=1x3x320x320`` (or ``1x3x320x320`` for a one-input model) -> (NAME or "", dimensions)."""
    name, _, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise UsageError(
            f"--input-shape {text!r}: expected NAME=DxDx... with whole dimensions >= 1, e.g. x=1x3x320x320"
        )
    return name, shape


def latency_shapes(
    models: Sequence[ModelEntry], golden: GoldenSet | None, given: Mapping[str, Sequence[int]]
) -> dict[str, list[int]]:
    """The shape (batch 1) each input is timed on for a latency budget; empty when nothing is dynamic.

    The golden set's sample shapes when there is one (``given`` must agree with them); else
    ``given``. UsageError when an input has a dynamic dimension past the batch one and neither
    says how large it is: timing it as 1 (a 1x3x1x1 image) would pass budgets real inputs miss.
    """
    shapes: dict[str, list[int]] = {}
    for model in models:
        for spec in _timed_inputs(model):
            found = _given_shape(spec, model, given) if golden is None else _golden_shape(spec, model, golden)
            if found is None:
                if any(d is None for d in spec.shape[1:]):
                    dims = "x".join("?" if d is None else str(d) for d in spec.shape)
                    raise UsageError(
                        f"{model.path}: input {spec.name!r} has dynamic dimensions ({dims}); a latency "
                        f"budget timed with them as 1 would mean nothing: give --golden or "
                        f"--input-shape {spec.name}=<shape>"
                    )
                continue
            _fits(model, spec, found)
            if golden is not None and (want := _given_shape(spec, model, given)) and want != found:
                raise UsageError(
                    f"--input-shape {spec.name}={'x'.join(map(str, want))} differs from the golden set's "
                    f"{'x'.join(map(str, found))}; latency is timed on the golden set"
                )
            shapes[spec.name] = found
    dynamic = any(d is None for m in models for s in _timed_inputs(m) for d in s.shape[1:])
    return shapes if dynamic or given else {}


def _timed_inputs(model: ModelEntry) -> list[TensorSpec]:
    """The inputs latency is timed on zeros of: all but the state inputs (fed the initial state)."""
    carried = {p.input for p in model.state.pairs} if model.state is not None else set()
    return [s for s in model.inputs if s.name not in carried]


def _given_shape(spec: TensorSpec, model: ModelEntry, given: Mapping[str, Sequence[int]]) -> list[int] | None:
    if spec.name in given:
        return list(given[spec.name])
    if len(model.inputs) == 1 and len(given) == 1:
        return list(next(iter(given.values())))
    return None


def _golden_shape(spec: TensorSpec, model: ModelEntry, golden: GoldenSet) -> list[int]:
    array = match_inputs(golden.inputs, [s.name for s in model.inputs])[spec.name]
    return [] if not spec.shape else [1, *array.shape[1:]]


def _fits(model: ModelEntry, spec: TensorSpec, shape: list[int]) -> None:
    bad = (
        len(shape) != len(spec.shape)
        or min(shape, default=1) < 1
        or any(d is not None and d != s for d, s in zip(spec.shape, shape, strict=False))
    )
    if bad:
        dims = "x".join("?" if d is None else str(d) for d in spec.shape)
        wanted = "x".join(map(str, shape))
        raise UsageError(f"{model.path}: input {spec.name!r} is {dims}; the shape {wanted} does not fit it")


def _entry(**fields: Any) -> ModelEntry:
    """A model entry; UsageError naming the problem (e.g. a state pair naming a tensor it lacks)."""
    try:
        return ModelEntry(**fields)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise UsageError(_invalid_bundle(exc)) from exc


def _schema_version(entries: Sequence[ModelEntry], gated: bool, tasked: bool) -> int:
    """The oldest schema that holds these entries and gates, so older agents keep reading what they can."""
    if tasked or any(e.state is not None for e in entries):
        return STATE_VERSION  # == TASK_GATES_VERSION
    return GATED_MODELS_VERSION if gated else SCHEMA_VERSION


def model_state_of(
    path: Path, fmt: str, pairs: Mapping[str, str], initial: Mapping[str, Path]
) -> ModelState | None:
    """The ``state`` of one model entry: the declared pairs, and resource variables found in a TFLite file."""
    unknown = sorted(set(initial) - set(pairs.values()))
    if unknown:
        raise UsageError(f"an initial state is given for {unknown[0]!r}, which no --state pair feeds")
    variables = fmt == "tflite" and tflite_uses_variables(path)
    if not pairs and not variables:
        return None
    try:
        return ModelState(
            pairs=[
                StatePair(
                    output=out,
                    input=inp,
                    initial=f"{STATE_DIR}/{inp}.npy" if inp in initial else None,
                )
                for out, inp in pairs.items()
            ],
            variables=variables,
        )
    except ValueError as exc:
        raise UsageError(f"--state: {_invalid_bundle(exc)}") from exc


def _own_gate(gate: AcceptanceGate | None) -> AcceptanceGate | None:
    if gate is None:
        return None
    return gate.model_copy(update={"golden": None, "samples": None})


def check_golden(path: Path, models: Sequence[ModelEntry]) -> int:
    """Validate a golden ``.npz`` against every model's inputs and outputs; return its sample count."""
    golden = load_golden(path)
    for model in models:
        where = f"{path}: for {model.path}"
        carried = {p.input for p in model.state.pairs} if model.state is not None else set()
        try:
            inputs = match_inputs(golden.inputs, [s.name for s in model.inputs if s.name not in carried])
            references = match_outputs(golden.reference, [s.name for s in model.outputs])
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from exc
        # Inputs without a batch dimension (Silero's state (2, batch, 128)) take one whole value
        # per row, and so do the state outputs that feed them.
        whole = fed_whole({s.name: s.shape for s in model.inputs})
        whole_out = (
            {p.output for p in model.state.pairs if p.input in whole} if model.state is not None else set()
        )
        for spec in model.inputs:
            if spec.name in inputs:
                _check_array(where, "input", spec, inputs[spec.name], caller=True, whole=spec.name in whole)
        by_name = {s.name: s for s in model.outputs}
        for name, array in references.items():
            _check_array(where, "output", by_name[name], array, caller=False, whole=name in whole_out)
    return len(golden)


def _check_array(
    where: str, kind: str, spec: TensorSpec, array: np.ndarray, *, caller: bool, whole: bool = False
) -> None:
    """One golden array (N rows) against the tensor it feeds (``caller``) or is compared with;
    ``whole``: a tensor without a batch dimension, each row its whole declared shape."""
    expected = list(spec.shape) if whole else spec.shape[1:] if spec.shape else []
    sample = list(array.shape[1:])
    mismatch = len(expected) != len(sample) or any(
        e is not None and e != s for e, s in zip(expected, sample, strict=True)
    )
    if mismatch:
        what = "a scalar" if not spec.shape else f"{expected} per sample"
        raise UsageError(
            f"{where}: golden {kind} {spec.name!r} has sample shape {sample} but the model's is {what}"
        )
    if not caller:
        return
    # Quantized inputs take float values (the runtime quantizes them); others their own dtype.
    quantized = spec.quantization is not None and spec.dtype in ("int8", "uint8", "int16")
    want = np.dtype("float32") if quantized else np.dtype(spec.dtype)
    if not np.can_cast(array.dtype, want, casting="same_kind"):
        raise UsageError(
            f"{where}: golden input {spec.name!r} is {array.dtype} but the model takes {want}; "
            f"store it as {want}"
        )


def _invalid_bundle(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid bundle: {problems(exc)}"
    return str(exc)
