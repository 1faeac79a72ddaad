"""The bundle manifest: the pydantic schema of ``manifest.json``.

The manifest is the contract between host and device. It lists every other file of the
bundle with its size and sha256, so the Ed25519 signature of the exact manifest bytes
covers the whole bundle. Readers refuse a manifest whose ``schema_version`` they do not
know before looking at anything else, so a newer host cannot half-work on an old agent.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgeagent.errors import MalformedManifest, SchemaViolation, UnknownSchemaVersion
from edgeagent.validation import problems

SCHEMA_VERSION = 1
#: The first version whose model entries may carry their own acceptance gate
#: (``models[].acceptance``). A writer uses it only for manifests that need it, so bundles
#: without per-artifact gates stay readable by agents that know only version 1.
GATED_MODELS_VERSION = 2
#: The first version whose gates may carry a task, per-output bounds and latency shapes
#: (``task``, ``outputs``, ``latency_shapes``), and whose model entries may declare state
#: (``models[].state``: an agent that predates it would serve a stateful model as if it had
#: none, so it must refuse such a bundle); used only by manifests that set them.
TASK_GATES_VERSION = STATE_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = frozenset({SCHEMA_VERSION, GATED_MODELS_VERSION, TASK_GATES_VERSION})
#: What a model does; it decides which metrics judge each output (docs/bundle.md).
Task = Literal["classification", "regression", "detection", "segmentation", "embedding", "custom"]
TASKS: tuple[str, ...] = get_args(Task)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
GOLDEN_PATH = "acceptance/golden.npz"
LABELS_PATH = "labels.txt"
MODELS_DIR = "models"

# Semantic version 2.0.0, as published at semver.org.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def is_semver(value: str) -> bool:
    """True when ``value`` is a semantic version (semver 2.0.0), e.g. 1.2.3 or 2.0.0-rc.1."""
    return _SEMVER.match(value) is not None


# A relative POSIX path of plain components: what a bundle member may be called.
_MEMBER_PATH = re.compile(r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")


def _check_member_path(value: str) -> str:
    if not _MEMBER_PATH.match(value) or any(part in (".", "..") for part in value.split("/")):
        raise ValueError(f"{value!r} is not a relative path of plain names (letters, digits, '.', '_', '-')")
    return value


BundleName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Bundle name: up to 64 letters, digits, '.', '_' or '-'; starts with a letter or digit.",
    ),
]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Lowercase hex sha256.")]
MemberPath = Annotated[
    str,
    AfterValidator(_check_member_path),
    Field(max_length=255, description="Relative POSIX path inside the bundle."),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One file of the bundle other than the manifest and its signature."""

    path: MemberPath
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: Sha256Hex


class Quantization(_Strict):
    """Affine quantization of a tensor: real = scale * (q - zero_point)."""

    scale: list[float] = Field(min_length=1, description="One scale, or one per channel along `axis`.")
    zero_point: list[int] = Field(min_length=1, description="Same length as `scale`.")
    axis: int | None = Field(default=None, description="Channel axis for per-channel parameters.")

    @model_validator(mode="after")
    def _lengths_match(self) -> Quantization:
        if len(self.scale) != len(self.zero_point):
            raise ValueError(f"scale has {len(self.scale)} values but zero_point has {len(self.zero_point)}")
        return self


class TensorSpec(_Strict):
    """An input or output of a model, as read from the model file."""

    name: str = Field(min_length=1, description="Tensor name in the model.")
    shape: list[int | None] = Field(description="Dimensions; null for a dynamic one (e.g. batch).")
    dtype: str = Field(description="numpy dtype name: float32, float16, int8, uint8, int64, ...")
    quantization: Quantization | None = Field(default=None, description="Set for quantized tensors.")


class StatePair(_Strict):
    """One recurrent state tensor: what ``output`` returns feeds ``input`` on the next step."""

    output: str = Field(min_length=1, description="Output that returns the new state, e.g. 'stateN'.")
    input: str = Field(min_length=1, description="Input that takes it on the next step, e.g. 'state'.")
    initial: MemberPath | None = Field(
        default=None,
        description="A .npy in the bundle holding the initial state (one sample, with its batch "
        "dimension); null = zeros of the input's shape (dynamic dimensions as 1).",
    )


class ModelState(_Strict):
    """What makes a model stateful: state pairs passed in and out, or state kept inside the model."""

    pairs: list[StatePair] = Field(
        default_factory=list, description="State carried from an output to an input, step to step."
    )
    variables: bool = Field(
        default=False,
        description="The model keeps state in resource variables (TFLite VAR_HANDLE/READ_VARIABLE/"
        "ASSIGN_VARIABLE): every session gets its own interpreter.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> ModelState:
        for field_name in ("output", "input"):
            names = [getattr(p, field_name) for p in self.pairs]
            if len(set(names)) != len(names):
                raise ValueError(f"state pairs name an {field_name} twice: {names}")
        if not self.pairs and not self.variables:
            raise ValueError("state declares neither pairs nor variables")
        return self


Format = Literal["onnx", "tflite"]
Precision = Literal["fp32", "fp16", "int8"]


class ModelEntry(_Strict):
    """One model artifact; a bundle may carry several (e.g. ONNX fp32 and TFLite int8)."""

    path: MemberPath = Field(description="Path of the model file inside the bundle (under models/).")
    format: Format = Field(description="Model file format.")
    precision: Precision = Field(description="Numeric precision of the weights/compute.")
    inputs: list[TensorSpec] = Field(min_length=1, description="Model inputs, in order.")
    outputs: list[TensorSpec] = Field(min_length=1, description="Model outputs, in order.")
    runtimes: list[str] = Field(
        default_factory=list, description="Runtimes that can run it: 'onnxruntime', 'litert'."
    )
    delegates: list[str] = Field(
        default_factory=list,
        description="Delegates/execution providers it was prepared for (e.g. 'edgetpu'); empty = any.",
    )
    profiles: list[str] = Field(
        default_factory=list, description="Device profiles it suits; empty = every profile."
    )
    acceptance: AcceptanceGate | None = Field(
        default=None,
        description="This artifact's own gate, from its own measured numbers (schema_version 2); "
        "null = the bundle-level gate applies. Its golden null = the bundle-level golden set. A "
        "device serves the artifact only if it passes it.",
    )
    state: ModelState | None = Field(
        default=None,
        description="Set for a stateful model (schema_version 3); null = stateless: every request "
        "stands alone.",
    )

    @model_validator(mode="after")
    def _state_names(self) -> ModelEntry:
        if self.state is None:
            return self
        ins, outs = {s.name: s for s in self.inputs}, {s.name for s in self.outputs}
        for pair in self.state.pairs:
            if pair.output not in outs:
                raise ValueError(f"state output {pair.output!r} is not an output of {self.path}")
            if pair.input not in ins:
                raise ValueError(f"state input {pair.input!r} is not an input of {self.path}")
        return self


class Preprocessing(_Strict):
    """How raw application input becomes the model's input: x' = (x * scale - mean) / std."""

    scale: float = Field(default=1.0, description="Multiplier applied first (e.g. 1/255).")
    mean: list[float] = Field(default_factory=list, description="Per-channel mean subtracted after scaling.")
    std: list[float] = Field(default_factory=list, description="Per-channel divisor applied last.")
    layout: str | None = Field(default=None, description="Input layout, e.g. NHWC or NCHW.")
    notes: str = Field(default="", description="Anything else the application must do, in words.")


class OutputGate(_Strict):
    """Bounds on one output against its golden reference (``output.<name>``); unset = unchecked."""

    min_top1_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Fraction of samples whose top-1 matches the reference."
    )
    min_topk_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Fraction whose reference top-1 is in the top-k."
    )
    top_k: int | None = Field(default=None, ge=1, description="k of min_topk_agreement.")
    max_mse: float | None = Field(default=None, ge=0.0, description="Mean squared error vs reference.")
    max_abs_error: float | None = Field(default=None, ge=0.0, description="Largest |out - ref|.")
    min_cosine: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="Mean per-sample cosine similarity with the reference."
    )
    min_mask_iou: float | None = Field(
        default=None, ge=0.0, le=1.0, description="IoU of the masks out > mask_threshold and ref > it."
    )
    mask_threshold: float | None = Field(default=None, description="Where a score map becomes a mask.")
    min_box_match: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fraction of reference boxes (x1, y1, x2, y2 in the last axis) that an output box "
        "of the same sample overlaps with IoU >= box_iou.",
    )
    box_iou: float | None = Field(default=None, gt=0.0, le=1.0, description="IoU a box match needs.")
    atol: float | None = Field(default=None, ge=0.0, description="Absolute tolerance (allclose).")
    rtol: float | None = Field(default=None, ge=0.0, description="Relative tolerance (allclose).")

    @model_validator(mode="after")
    def _pairs(self) -> OutputGate:
        pairs = (
            ("min_topk_agreement", "top_k"),
            ("min_mask_iou", "mask_threshold"),
            ("min_box_match", "box_iou"),
        )
        for bound, parameter in pairs:
            if getattr(self, bound) is not None and getattr(self, parameter) is None:
                raise ValueError(f"{bound} needs {parameter}")
        return self


class AcceptanceGate(_Strict):
    """What a device must show on the golden set before it commits to a bundle."""

    golden: MemberPath | None = Field(
        default=None,
        description="The golden .npz: 'input.<name>' per model input, optional 'output.<name>' "
        "reference outputs and 'labels' (legacy files: 'inputs' and 'reference').",
    )
    samples: int | None = Field(default=None, ge=1, description="Number of golden samples.")
    min_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Minimum top-1 accuracy on the golden labels (0-1)."
    )
    min_top1_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Minimum fraction of samples whose top-1 matches reference."
    )
    atol: float | None = Field(
        default=None, ge=0.0, description="Absolute tolerance against reference outputs."
    )
    rtol: float | None = Field(
        default=None, ge=0.0, description="Relative tolerance against reference outputs."
    )
    latency_p95_ms: dict[str, float] = Field(
        default_factory=dict,
        description="p95 latency budget in ms per device profile name ('*' = any profile).",
    )
    task: Task | None = Field(
        default=None,
        description="What the model does (schema_version 3); it chose the per-output bounds. "
        "null = a gate written before tasks: accuracy/agreement on the first output, atol/rtol on all.",
    )
    outputs: dict[str, OutputGate] = Field(
        default_factory=dict,
        description="Per-output bounds against the golden references, by output name (schema_version 3).",
    )
    latency_shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Per input: the full shape (batch 1) latency is timed on when there is no golden "
        "set (schema_version 3); from the golden set or --input-shape, never invented.",
    )

    @property
    def needs_golden(self) -> bool:
        """True when a bound can only be checked against a golden set."""
        bounds = (self.min_accuracy, self.min_top1_agreement, self.atol, self.rtol)
        return any(b is not None for b in bounds) or bool(self.outputs)

    @property
    def uses_tasks(self) -> bool:
        """True when the gate sets a field that needs schema_version 3."""
        return self.task is not None or bool(self.outputs) or bool(self.latency_shapes)

    @field_validator("latency_p95_ms")
    @classmethod
    def _positive_budgets(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if v <= 0}
        if bad:
            raise ValueError(f"latency budgets must be > 0 ms: {bad}")
        return value


# ModelEntry names AcceptanceGate before it is defined (kept below for a stable layout).
ModelEntry.model_rebuild()


class CompressionStep(_Strict):
    """One converter pass as measured by the evaluator (numbers before -> after)."""

    name: str = Field(description="Pass name, e.g. 'prune', 'quantize'.")
    params: dict[str, Any] = Field(default_factory=dict, description="The pass's configuration.")
    accuracy_before: float | None = Field(default=None, description="Accuracy 0-1 before the pass.")
    accuracy_after: float | None = Field(default=None, description="Accuracy 0-1 after the pass.")
    size_before: int | None = Field(default=None, description="Model size in bytes before the pass.")
    size_after: int | None = Field(default=None, description="Model size in bytes after the pass.")
    sparsity: float | None = Field(default=None, description="Fraction of zero weights after the pass (0-1).")
    latency_p50_ms_before: float | None = Field(default=None, description="Host p50 latency before, ms.")
    latency_p50_ms_after: float | None = Field(default=None, description="Host p50 latency after, ms.")
    latency_p95_ms_before: float | None = Field(default=None, description="Host p95 latency before, ms.")
    latency_p95_ms_after: float | None = Field(default=None, description="Host p95 latency after, ms.")
    notes: str = Field(default="", description="Free text, e.g. what the pass could not do.")


class Manifest(_Strict):
    """``manifest.json``: what the bundle is and what it contains."""

    schema_version: Literal[1, 2, 3] = Field(
        description="Version of this schema; readers refuse unknown ones. 2 adds models[].acceptance; "
        "3 adds task, outputs and latency_shapes to gates, and models[].state."
    )
    name: BundleName
    version: str = Field(description="Semantic version of the bundle (semver 2.0.0).")
    description: str = Field(default="", max_length=4096, description="Free text for people.")
    files: list[FileEntry] = Field(description="Every other file in the bundle, sorted by path.")
    models: list[ModelEntry] = Field(min_length=1, description="The model artifacts.")
    labels: MemberPath | None = Field(default=None, description="Class names, one per line.")
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    acceptance: AcceptanceGate = Field(
        default_factory=AcceptanceGate,
        description="The bundle-level gate: the gate of every model entry without its own, and "
        "the golden set an entry's gate without one uses.",
    )
    compression: list[CompressionStep] = Field(
        default_factory=list, description="The converter's report, one entry per pass."
    )
    serve_precision: list[Precision] = Field(
        default_factory=list,
        description=(
            "The bundle author's precision preference: artifact precisions a device may serve, most "
            "preferred first (`edgectl bundle create --precision`); empty = the device profile's order. "
            "A device's own override wins."
        ),
    )

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not is_semver(value):
            raise ValueError(f"version {value!r} is not a semantic version like 1.2.3")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [f.path for f in self.files]
        if paths != sorted(paths):
            raise ValueError("files must be sorted by path")
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path twice")
        reserved = {MANIFEST_NAME, SIGNATURE_NAME} & set(paths)
        if reserved:
            raise ValueError(f"files must not list {sorted(reserved)}")
        listed = set(paths)
        gated = [i for i, m in enumerate(self.models) if m.acceptance is not None]
        if gated and self.schema_version < GATED_MODELS_VERSION:
            raise ValueError(
                f"models[{gated[0]}].acceptance needs schema_version {GATED_MODELS_VERSION} "
                f"(this manifest says {self.schema_version})"
            )
        stateful = [i for i, m in enumerate(self.models) if m.state is not None]
        if stateful and self.schema_version < STATE_VERSION:
            raise ValueError(
                f"models[{stateful[0]}].state needs schema_version {STATE_VERSION} "
                f"(this manifest says {self.schema_version})"
            )
        tasked = [g for g in (self.acceptance, *(m.acceptance for m in self.models)) if g and g.uses_tasks]
        if tasked and self.schema_version < TASK_GATES_VERSION:
            raise ValueError(
                f"gates with task, outputs or latency_shapes need schema_version {TASK_GATES_VERSION} "
                f"(this manifest says {self.schema_version})"
            )
        gates = [self.gate_for(m) for m in self.models]
        referenced = [m.path for m in self.models]
        referenced += [p for p in (self.labels, self.acceptance.golden) if p is not None]
        referenced += [g.golden for g in gates if g.golden is not None]
        referenced += [p.initial for m in self.models if m.state for p in m.state.pairs if p.initial]
        missing = sorted({p for p in referenced if p not in listed})
        if missing:
            raise ValueError(f"referenced but not listed in files: {missing}")
        if self.acceptance.needs_golden and self.acceptance.golden is None:
            raise ValueError("acceptance bounds on accuracy/agreement need a golden set (acceptance.golden)")
        for model, gate in zip(self.models, gates, strict=True):
            if gate.needs_golden and gate.golden is None:
                raise ValueError(f"{model.path}: its acceptance bounds need a golden set, and none is named")
        if len(set(self.serve_precision)) != len(self.serve_precision):
            raise ValueError(f"serve_precision {self.serve_precision} names a precision twice")
        carried = {m.precision for m in self.models}
        absent = [p for p in self.serve_precision if p not in carried]
        if absent:
            raise ValueError(f"serve_precision lists {', '.join(absent)} but no model artifact has it")
        return self

    def gate_for(self, model: ModelEntry) -> AcceptanceGate:
        """The gate ``model`` must pass on a device: its own, or the bundle-level one.

        An entry's own gate without a golden set (or latency shapes) uses the bundle-level one's.
        """
        own = model.acceptance
        if own is None:
            return self.acceptance
        shared: dict[str, Any] = {}
        if own.golden is None and self.acceptance.golden is not None:
            shared = {"golden": self.acceptance.golden, "samples": self.acceptance.samples}
        if not own.latency_shapes and self.acceptance.latency_shapes:
            shared["latency_shapes"] = self.acceptance.latency_shapes
        return own.model_copy(update=shared) if shared else own

    @property
    def bundle_filename(self) -> str:
        return f"{self.name}-{self.version}.bundle"

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, two-space indent, trailing newline (these are signed)."""
        # Left out when empty, so bundles that do not use it keep their bytes (and sha256),
        # and agents that predate the field still read them.
        body = self.model_dump(mode="json", exclude=set() if self.serve_precision else {"serve_precision"})
        _drop_task_fields(body["acceptance"])
        for model in body["models"]:
            # Absent, not null: a schema-1 manifest stays byte-identical to what agents that
            # know only schema 1 read (their ModelEntry forbids unknown keys).
            if model["state"] is None:
                del model["state"]
            if model["acceptance"] is None:
                del model["acceptance"]
            else:
                _drop_task_fields(model["acceptance"])
        return (json.dumps(body, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _drop_task_fields(gate: dict[str, Any]) -> None:
    """Leave unset schema-3 gate fields out, so older manifests keep their bytes (and sha256)."""
    for key, empty in (("task", None), ("outputs", {}), ("latency_shapes", {})):
        if gate.get(key, empty) == empty:
            gate.pop(key, None)
    for bounds in gate.get("outputs", {}).values():
        for key in [k for k, v in bounds.items() if v is None]:
            del bounds[key]


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes, naming the precise reason for a refusal."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedManifest(f"{MANIFEST_NAME} is not valid JSON ({exc})", member=MANIFEST_NAME) from exc
    if not isinstance(body, dict):
        raise MalformedManifest(f"{MANIFEST_NAME} must be a JSON object", member=MANIFEST_NAME)
    version = body.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        known = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMA_VERSIONS))
        raise UnknownSchemaVersion(
            f"{MANIFEST_NAME} has schema_version {version!r}; this agent reads {known} (upgrade the agent)",
            member=MANIFEST_NAME,
        )
    try:
        return Manifest.model_validate(body)
    except ValidationError as exc:
        raise SchemaViolation(
            f"{MANIFEST_NAME} fails the schema: {problems(exc)}", member=MANIFEST_NAME
        ) from exc
