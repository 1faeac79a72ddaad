"""Run passes in order and measure the model after each one with the same evaluator."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from converter.data import Dataset
from converter.evaluate import Evaluator, Metrics
from converter.model import ModelArtifact
from converter.passes import EpochLog, PassConfig, PassContext, pass_class

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Shows what a long step is doing (the CLI uses rich; the API default shows nothing)."""

    def step(self, description: str) -> contextlib.AbstractContextManager[None]: ...

    def epoch(self, entry: EpochLog) -> None:
        """A training pass finished an epoch (called inside its ``step``)."""
        ...


class NoProgress:
    def step(self, description: str) -> contextlib.AbstractContextManager[None]:
        log.info("%s", description)
        return contextlib.nullcontext()

    def epoch(self, entry: EpochLog) -> None:
        log.debug(
            "%s epoch %d/%d: loss %.4f, validation accuracy %.4f",
            entry.pass_name,
            entry.epoch,
            entry.epochs,
            entry.loss,
            entry.val_accuracy,
        )


@dataclass(frozen=True)
class PassSpec:
    """A pass by registry name with its validated config."""

    name: str
    config: PassConfig


@dataclass
class StepRecord:
    """One pass as run: its config, the model before/after and both measurements."""

    name: str
    params: dict[str, Any]
    model: ModelArtifact
    before: Metrics
    after: Metrics
    seconds: float
    sparsity: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass
class PipelineResult:
    source: ModelArtifact
    baseline: Metrics
    steps: list[StepRecord]
    #: The source model's outputs on the evaluation data by output name (the fp32 reference).
    reference: dict[str, npt.NDArray[Any]]

    @property
    def final(self) -> ModelArtifact:
        return self.steps[-1].model if self.steps else self.source

    @property
    def final_metrics(self) -> Metrics:
        return self.steps[-1].after if self.steps else self.baseline

    def artifacts(self) -> list[tuple[ModelArtifact, Metrics]]:
        """Every deployable model the passes produced (or the source when none did), in order."""
        seen: dict[Path, tuple[ModelArtifact, Metrics]] = {}
        for step in self.steps:
            if step.model.deployable and step.model != self.source:
                seen.setdefault(step.model.path, (step.model, step.after))
        if not seen and self.final.deployable:
            return [(self.final, self.final_metrics)]
        return list(seen.values())


def run_pipeline(
    source: ModelArtifact,
    passes: Sequence[PassSpec],
    data: Dataset,
    evaluator: Evaluator,
    out_dir: Path,
    progress: Progress | None = None,
) -> PipelineResult:
    """Measure ``source``, then run each pass on the previous one's output and measure again."""
    progress = progress or NoProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress.step(f"evaluating {source.path.name}"):
        first = evaluator.evaluate(source)
    context = PassContext(data=data, evaluator=evaluator, baseline=first.metrics, on_epoch=progress.epoch)
    model, before, steps = source, first.metrics, []
    for spec in passes:
        instance = pass_class(spec.name)(spec.config, context)
        started = time.monotonic()
        with progress.step(f"{spec.name}: {model.path.name}"):
            output = instance.run(model, out_dir)
        seconds = time.monotonic() - started
        if output.metrics is not None:
            after = output.metrics
        elif output.model == model:
            after = before
        else:
            with progress.step(f"evaluating {output.model.path.name}"):
                after = evaluator.evaluate(output.model).metrics
        steps.append(
            StepRecord(
                name=spec.name,
                params=spec.config.model_dump(mode="json"),
                model=output.model,
                before=before,
                after=after,
                seconds=seconds,
                sparsity=output.sparsity,
                details=output.details,
                notes=output.notes,
            )
        )
        log.info("%s -> %s: %s", spec.name, output.model.path.name, output.notes)
        model, before = output.model, after
    return PipelineResult(source=source, baseline=first.metrics, steps=steps, reference=first.outputs)
