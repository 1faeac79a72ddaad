"""``package``: the pipeline's artifacts as a signed bundle with its own acceptance test.

By default the bundle carries the final artifacts only: for each (format, precision) the
passes produced, the last one (after pruning, fine-tuning, quantization); intermediates are
kept only with ``keep_intermediates``. The acceptance set is a seeded sample of the
evaluation data: every input by name (in the dtypes the first artifact takes), labels and
every output of the source (fp32) model.

Every artifact carries its own gate, derived from what it measurably does on exactly that
sample — its accuracy minus ``accuracy_margin`` and its top-1 agreement with the reference
minus ``agreement_margin`` — unless overridden. The bundle-level gate is the lowest of the
final artifacts' gates, and a kept intermediate's gate is never below it, so a device (which
serves only an artifact that passes its own gate) never serves an intermediate that does
worse than what the pipeline delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from converter import task_gates
from converter.data import Dataset
from converter.errors import RecipeError
from converter.evaluate import top1
from converter.feeds import fit_feeds, take
from converter.model import ModelArtifact
from converter.pipeline import PipelineResult, StepRecord
from converter.runners import open_runner
from converter.stateful import golden_inputs, replay
from edgeagent.bundle.create import CreatedBundle, create_bundle
from edgeagent.bundle.golden import GoldenSet, match_outputs, save_golden
from edgeagent.bundle.manifest import (
    AcceptanceGate,
    BundleName,
    CompressionStep,
    OutputGate,
    Preprocessing,
    Task,
    is_semver,
)
from edgeagent.modelinfo import inspect_model
from edgeagent.signing import SigningKey


class PackageConfig(BaseModel):
    """Bundle identity, what goes in, and how the acceptance gate is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: BundleName
    version: str = Field(description="Semantic version, e.g. 1.0.0.")
    description: str = Field(default="", description="Free text shown by `edgectl bundle inspect`.")
    artifacts: Literal["final", "last"] = Field(
        default="final",
        description="'final': the last model the passes produced of each format and precision (e.g. "
        "the fine-tuned fp32 and the int8 made from it); 'last': only the pipeline's last model.",
    )
    keep_intermediates: bool = Field(
        default=False,
        description="Also ship the models the passes produced on the way (e.g. pruned before "
        "fine-tuning), each gated no lower than the final artifacts: for inspection, never served "
        "when worse.",
    )
    golden_samples: int = Field(
        default=100, ge=1, description="Size of the acceptance set (capped by the data)."
    )
    seed: int = Field(default=0, description="Seed of the acceptance-set sample.")
    accuracy_margin: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Gate min_accuracy = lowest measured accuracy on the set minus this.",
    )
    agreement_margin: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Gate min_top1_agreement = lowest measured agreement with the reference minus this.",
    )
    min_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Override the derived min_accuracy."
    )
    min_top1_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Override the derived min_top1_agreement."
    )
    atol: float | None = Field(
        default=None, ge=0.0, description="Also bound |output - reference| (absolute)."
    )
    rtol: float | None = Field(
        default=None, ge=0.0, description="Also bound |output - reference| (relative)."
    )
    latency_p95_ms: dict[str, float] = Field(
        default_factory=dict, description="p95 latency budget in ms per device profile ('*' = any)."
    )
    input_shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Per input name: the shape (batch 1) latency budgets are timed on; must agree "
        "with the acceptance set, which decides them otherwise.",
    )
    task: Task | None = Field(
        default=None,
        description="classification, regression, detection, segmentation, embedding or custom: which "
        "metrics gate each output. Unset: classification when the labels are integer classes and the "
        "first output is class scores, else regression.",
    )
    top_k: int = Field(default=3, ge=1, description="classification: k of the top-k agreement bound.")
    mask_threshold: float = Field(
        default=0.5, description="detection/segmentation: score-map value above which a pixel is in the mask."
    )
    box_iou: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="detection: IoU at which an output box matches a reference box.",
    )
    error_margin: float = Field(
        default=1.0, ge=0.0, description="Error bounds (MSE, max-abs, atol) = measured * (1 + this) + floor."
    )
    error_floor: float = Field(
        default=1e-3,
        ge=0.0,
        description="Floor of error bounds, as a fraction of the reference's largest |value|.",
    )
    cosine_margin: float = Field(
        default=0.002, ge=0.0, le=1.0, description="min_cosine = measured - max(this, 1 - measured)."
    )
    labels: Path | None = Field(default=None, description="Class names file, one per line (digits: 0-9).")
    preprocessing: Preprocessing | None = Field(
        default=None, description="How raw input becomes model input (digits sets this itself)."
    )
    state: dict[str, str] = Field(
        default_factory=dict,
        description="A streaming model's state pairs, output -> the input it feeds on the next step "
        "(`--state OUT=IN`): the golden set becomes one sequence, the first golden_samples rows in "
        "order, replayed with the state carried from zeros.",
    )

    @field_validator("artifacts", mode="before")
    @classmethod
    def _no_all(cls, value: object) -> object:
        if value == "all":
            raise ValueError("artifacts = 'all' is now keep_intermediates = true (artifacts = 'final')")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        # Checked here as well as in the manifest so a typo fails before minutes of work, not after.
        if not is_semver(value):
            raise ValueError(f"version {value!r} is not a semantic version like 1.2.3")
        return value


@dataclass
class Packaged:
    bundle: CreatedBundle
    #: The bundle-level gate (the lowest of the final artifacts' own gates).
    gate: AcceptanceGate
    #: Per packaged artifact: accuracy and top-1 agreement measured on the acceptance set.
    measured: dict[str, dict[str, float]]
    #: The task the gates were derived for (given, or inferred).
    task: Task = "classification"
    #: Per packaged artifact (file name): its own gate, as the manifest carries it.
    gates: dict[str, AcceptanceGate] = field(default_factory=dict)
    #: File names of the intermediates shipped (``keep_intermediates``), after the finals.
    intermediates: list[str] = field(default_factory=list)
    #: What the user should know about the packaged set (e.g. an intermediate never served).
    notes: list[str] = field(default_factory=list)


def compression_steps(steps: list[StepRecord]) -> list[CompressionStep]:
    """The report in the manifest's schema, one entry per pass."""
    out = []
    for step in steps:
        b, a = step.before, step.after
        transfer = f"transfer ({a.transfer_codec}) {b.transfer_bytes} -> {a.transfer_bytes} B"
        out.append(
            CompressionStep(
                name=step.name,
                params=step.params,
                accuracy_before=b.accuracy,
                accuracy_after=a.accuracy,
                size_before=b.size_bytes,
                size_after=a.size_bytes,
                sparsity=step.sparsity,
                latency_p50_ms_before=b.latency_p50_ms,
                latency_p50_ms_after=a.latency_p50_ms,
                latency_p95_ms_before=b.latency_p95_ms,
                latency_p95_ms_after=a.latency_p95_ms,
                notes="; ".join(n for n in (step.notes, transfer) if n),
            )
        )
    return out


def package(
    result: PipelineResult,
    data: Dataset,
    config: PackageConfig,
    key: SigningKey | None,
    out_dir: Path,
) -> Packaged:
    """Write ``out_dir/NAME-VERSION.bundle`` holding the artifacts, acceptance set and report."""
    finals, intermediates = choose_artifacts(result, config)
    artifacts = finals + intermediates
    work = out_dir / "package"
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    n = min(config.golden_samples, len(data))
    # A stream is judged in order; independent samples are drawn at random.
    index = np.arange(n) if config.state else np.sort(rng.choice(len(data), size=n, replace=False))
    labels = np.asarray(data.y)[index]
    runners = [open_runner(model) for model in artifacts]
    inputs = fit_feeds(runners[0].inputs, take(data.inputs, index))
    if config.state:
        source = open_runner(result.source)
        reference = dict(zip(source.output_names, replay(source, inputs, config.state), strict=True))
    else:
        reference = take(result.reference, index)
    first_reference = next(iter(reference.values()))
    # The evaluator measured accuracy exactly when the labels are classes.
    task = config.task or task_gates.infer_task(result.baseline.accuracy is not None, reference)
    classification = task == "classification"
    if classification and result.baseline.accuracy is None:
        raise RecipeError("task = classification needs integer class labels as 'y'", where="package.task")
    golden = work / "golden.npz"
    save_golden(
        golden,
        GoldenSet(
            golden_inputs(inputs, config.state),
            labels.astype(np.int64) if classification else None,
            reference,
            np.zeros(n, np.int64) if config.state else None,
        ),
    )

    measured: dict[str, dict[str, float]] = {}
    per_output: dict[str, dict[str, OutputGate]] = {}
    for model, runner in zip(artifacts, runners, strict=True):
        every = replay(runner, inputs, config.state) if config.state else runner.run(inputs)
        outputs = np.asarray(every[0])
        row = {"top1_agreement": float(np.mean(top1(outputs) == top1(first_reference)))}
        if classification:
            row["accuracy"] = float(np.mean(top1(outputs) == labels))
        named = dict(zip(runner.output_names, (np.asarray(o) for o in every), strict=True))
        refs = match_outputs(reference, list(runner.output_names))
        numbers = task_gates.measure(task, named, refs, config)
        row.update(
            {f"{task_gates.CHECK_NAMES[k]}[{name}]": v for name, r in numbers.items() for k, v in r.items()}
        )
        measured[model.path.name] = row
        per_output[model.path.name] = task_gates.bounds(numbers, refs, config)
    floor = _gate(config, [measured[m.path.name] for m in finals], classification, task)
    floor = floor.model_copy(
        update={"outputs": task_gates.loosest([per_output[m.path.name] for m in finals])}
    )
    gates = {
        m.path.name: _gate(config, [measured[m.path.name]], classification, task).model_copy(
            update={"outputs": per_output[m.path.name]}
        )
        for m in finals
    }
    for model in intermediates:
        own = _gate(config, [measured[model.path.name]], classification, task)
        outputs_floor = task_gates.at_least(per_output[model.path.name], floor.outputs)
        gates[model.path.name] = _at_least(own, floor).model_copy(update={"outputs": outputs_floor})
    label_file = _labels(config, data, work)
    bundle = create_bundle(
        name=config.name,
        version=config.version,
        models=[model.path for model in artifacts],
        key=key,
        out_dir=out_dir,
        golden=golden,
        labels=label_file,
        description=config.description,
        gate=floor,
        preprocessing=config.preprocessing or data.preprocessing,
        compression=compression_steps(result.steps),
        model_gates={model.path: gates[model.path.name] for model in artifacts},
        input_shapes=config.input_shapes,
        state=config.state,
    )
    return Packaged(
        bundle=bundle,
        gate=bundle.manifest.acceptance,
        measured=measured,
        task=task,
        gates={e.path.rsplit("/", 1)[-1]: bundle.manifest.gate_for(e) for e in bundle.manifest.models},
        intermediates=[m.path.name for m in intermediates],
        notes=[
            _never_served(m.path.name, measured, gates) for m in intermediates if _below(m, measured, gates)
        ],
    )


def choose_artifacts(
    result: PipelineResult, config: PackageConfig
) -> tuple[list[ModelArtifact], list[ModelArtifact]]:
    """(final artifacts in pipeline order, intermediates to ship as well) for ``config``."""
    produced = [model for model, _ in result.artifacts()]
    if not produced:
        raise RecipeError(
            f"{result.final.path.name} is a {result.final.kind} model, which no device runs: "
            "add the tflite pass (--tflite)"
        )
    if config.artifacts == "last":
        finals = produced[-1:]
    else:
        # A later model of the same format and precision supersedes an earlier one (the pruned
        # fp32 by the fine-tuned fp32): only the last of each kind is what the device should run.
        last_of_kind = {_kind(model): model for model in produced}
        finals = [model for model in produced if last_of_kind[_kind(model)] == model]
    intermediates = [m for m in produced if m not in finals] if config.keep_intermediates else []
    return finals, intermediates


def _kind(model: ModelArtifact) -> tuple[str, str]:
    fmt, precision, _, _ = inspect_model(model.path)
    return fmt, precision


def _at_least(gate: AcceptanceGate, floor: AcceptanceGate) -> AcceptanceGate:
    """``gate`` with each data bound raised to ``floor``'s where that is higher."""

    def higher(a: float | None, b: float | None) -> float | None:
        return b if a is None else a if b is None else max(a, b)

    return gate.model_copy(
        update={
            "min_accuracy": higher(gate.min_accuracy, floor.min_accuracy),
            "min_top1_agreement": higher(gate.min_top1_agreement, floor.min_top1_agreement),
        }
    )


def _below(
    model: ModelArtifact, measured: dict[str, dict[str, float]], gates: dict[str, AcceptanceGate]
) -> bool:
    row, gate = measured[model.path.name], gates[model.path.name]
    return (gate.min_accuracy is not None and row.get("accuracy", 1.0) < gate.min_accuracy) or (
        gate.min_top1_agreement is not None and row["top1_agreement"] < gate.min_top1_agreement
    )


def _never_served(name: str, measured: dict[str, dict[str, float]], gates: dict[str, AcceptanceGate]) -> str:
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in sorted(measured[name].items()))
    gate = gates[name]
    return (
        f"{name} is kept for inspection only: it measured {numbers}, below its gate (accuracy >= "
        f"{gate.min_accuracy}, top-1 agreement >= {gate.min_top1_agreement}, the final artifacts' floor); "
        "no device will serve it"
    )


def _floor(value: float) -> float:
    """Round down to 4 decimals, so a gate printed in the manifest is never above what was measured."""
    return max(0.0, float(np.floor(value * 10_000) / 10_000))


def _gate(
    config: PackageConfig, measured: list[dict[str, float]], classification: bool, task: Task | None = None
) -> AcceptanceGate:
    """The gate the lowest of ``measured`` (one row per artifact) passes, less the margins."""
    min_accuracy = config.min_accuracy
    if min_accuracy is None and classification:
        min_accuracy = _floor(min(m["accuracy"] for m in measured) - config.accuracy_margin)
    agreement = config.min_top1_agreement
    # Top-1 agreement means nothing for a regressor: bound its outputs with atol/rtol instead.
    if agreement is None and classification:
        agreement = _floor(min(m["top1_agreement"] for m in measured) - config.agreement_margin)
    return AcceptanceGate(
        golden="acceptance/golden.npz",
        min_accuracy=min_accuracy,
        min_top1_agreement=agreement,
        atol=config.atol,
        rtol=config.rtol,
        latency_p95_ms=config.latency_p95_ms,
        task=task,
    )


def _labels(config: PackageConfig, data: Dataset, work: Path) -> Path | None:
    if config.labels is not None:
        return config.labels
    if data.labels is None:
        return None
    path = work / "labels.txt"
    path.write_text("".join(f"{label}\n" for label in data.labels), encoding="utf-8")
    return path
