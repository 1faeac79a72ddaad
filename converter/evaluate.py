"""The one evaluator every pass is measured by: accuracy, size, transfer size, host latency.

* every input of the model is fed from the named evaluation data (:mod:`converter.feeds`);
  accuracy and agreement judge the first output, every output is kept as the reference;
* accuracy: top-1 and top-k for classifiers (labels are integer class ids), MSE for regressors;
* ``top1_agreement``: fraction of samples whose top-1 matches the reference (input) model's;
* size: bytes on disk; transfer size: bytes after the transfer codec (xz by default: LZMA2
  at preset 9e, which squeezes the long runs of zeros that pruning leaves in dense tensors);
* latency: wall-clock ms of single-sample invocations on this host, p50 and p95.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from converter.data import Dataset
from converter.feeds import fit_feeds, take
from converter.model import ModelArtifact
from converter.runners import FloatArray, open_runner, time_invocations

Codec = Literal["xz", "zlib"]


class EvaluateConfig(BaseModel):
    """How every model of a run is measured."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["classification", "regression"] | None = Field(
        default=None,
        description="Classification (top-1/top-k accuracy) or regression (MSE against 'y' when it has "
        "the first output's size). Unset: classification when 'y' holds integers, else regression "
        "(and the package task, when it is not classification).",
    )
    top_k: int = Field(default=3, ge=1, description="k of the top-k accuracy reported besides top-1.")
    latency_runs: int = Field(default=100, ge=1, description="Timed single-sample invocations per model.")
    latency_warmup: int = Field(default=10, ge=0, description="Untimed invocations before timing.")
    transfer_codec: Codec = Field(
        default="xz", description="Codec the transfer size is measured with: 'xz' (LZMA2 9e) or 'zlib' (9)."
    )


class Metrics(BaseModel):
    """One model measured once. Sizes in bytes, latencies in ms, accuracies as fractions 0-1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(description="Evaluation samples used.")
    accuracy: float | None = Field(default=None, description="Top-1 accuracy (classification), 0-1.")
    top_k: int | None = Field(default=None, description="k of top_k_accuracy.")
    top_k_accuracy: float | None = Field(default=None, description="Top-k accuracy, 0-1.")
    mse: float | None = Field(default=None, description="Mean squared error (regression).")
    top1_agreement: float | None = Field(
        default=None, description="Fraction of samples whose top-1 matches the reference model's."
    )
    size_bytes: int = Field(description="Size on disk, bytes.")
    transfer_bytes: int = Field(description="Size after the transfer codec, bytes.")
    transfer_codec: Codec = Field(description="Codec of transfer_bytes.")
    latency_p50_ms: float = Field(description="Median single-sample latency on this host, ms.")
    latency_p95_ms: float = Field(description="95th percentile single-sample latency on this host, ms.")


def compressed_size(data: bytes, codec: Codec) -> int:
    """Bytes of ``data`` after ``codec``."""
    if codec == "xz":
        return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return len(zlib.compress(data, 9))


def top1(outputs: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    return np.asarray(outputs.reshape(len(outputs), -1).argmax(axis=1), dtype=np.int64)


@dataclass
class Evaluation:
    metrics: Metrics
    #: Every output on the evaluation data, by output name in the model's order.
    outputs: dict[str, npt.NDArray[Any]]


class Evaluator:
    """Measures models on one data set; the first model evaluated becomes the agreement reference."""

    def __init__(self, data: Dataset, config: EvaluateConfig | None = None) -> None:
        self.data = data
        self.config = config or EvaluateConfig()
        self.reference: FloatArray | None = None  # the first model's first output

    def evaluate(self, model: ModelArtifact) -> Evaluation:
        runner = open_runner(model)
        feeds = fit_feeds(runner.inputs, self.data.inputs)
        every = runner.run(feeds)
        outputs = np.asarray(every[0], dtype=np.float32)
        if self.reference is None:
            self.reference = outputs
        times = time_invocations(
            runner, take(feeds, slice(0, 1)), self.config.latency_runs, self.config.latency_warmup
        )
        fields: dict[str, Any] = {}
        if self.classification:
            fields = self._classification(outputs)
        elif np.size(self.data.y) == outputs.size:
            target = np.asarray(self.data.y, dtype=np.float32).reshape(outputs.shape)
            fields = {"mse": float(np.mean((outputs - target) ** 2))}
        metrics = Metrics(
            samples=len(outputs),
            size_bytes=model.size_bytes(),
            transfer_bytes=compressed_size(model.read_bytes(), self.config.transfer_codec),
            transfer_codec=self.config.transfer_codec,
            latency_p50_ms=float(np.percentile(times, 50)),
            latency_p95_ms=float(np.percentile(times, 95)),
            **fields,
        )
        return Evaluation(metrics=metrics, outputs=dict(zip(runner.output_names, every, strict=True)))

    @property
    def classification(self) -> bool:
        """Whether accuracy is measured: the configured task, or integer labels when it is unset."""
        if self.config.task is not None:
            return self.config.task == "classification"
        return bool(np.issubdtype(np.asarray(self.data.y).dtype, np.integer))

    def _classification(self, outputs: FloatArray) -> dict[str, Any]:
        labels = np.asarray(self.data.y).reshape(-1).astype(np.int64)
        flat = outputs.reshape(len(outputs), -1)
        k = min(self.config.top_k, flat.shape[1])
        # Stable, so that ties (common in dequantized int8 outputs) go to the lowest class id as argmax does.
        best_k = np.argsort(-flat, axis=1, kind="stable")[:, :k]
        fields: dict[str, Any] = {
            "accuracy": float(np.mean(best_k[:, 0] == labels)),
            "top_k": k,
            "top_k_accuracy": float(np.mean((best_k == labels[:, None]).any(axis=1))),
        }
        if self.reference is not None:
            fields["top1_agreement"] = float(np.mean(top1(self.reference) == best_k[:, 0]))
        return fields


#: A top-1 loss (fraction) past which the report and the command line warn about an artifact.
ACCURACY_WARNING = 0.05


def accuracy_loss(model: Metrics, source: Metrics, source_name: str) -> str | None:
    """Why ``model`` lost more than :data:`ACCURACY_WARNING` of top-1 against ``source``; else None.

    The gate is derived from the artifact's own numbers, so a converted model that lost most of
    its accuracy would still pass its own acceptance test: this says so where the user looks.
    """
    if model.accuracy is None or source.accuracy is None:
        return None
    lost = source.accuracy - model.accuracy
    if lost <= ACCURACY_WARNING:
        return None
    return (
        f"top-1 {model.accuracy:.2%} against {source.accuracy:.2%} for {source_name} "
        f"({lost * 100:.1f} points lost; int8: try --per-channel, or --max-drop to search settings)"
    )


def regressions(model: Metrics, source: Metrics, source_name: str) -> list[str]:
    """How ``model`` is larger on disk or slower (host p50) than ``source``; empty when it is not.

    Strict comparisons on numbers measured by the same evaluator. Each reason quotes both values
    and their ratio, so a reader can tell timing noise (1.02x) from a real regression (6x).
    """
    reasons = []
    if model.size_bytes > source.size_bytes:
        ratio = model.size_bytes / max(source.size_bytes, 1)
        reasons.append(
            f"larger than {source_name} ({model.size_bytes:,} vs {source.size_bytes:,} bytes, {ratio:.2f}x)"
        )
    if model.latency_p50_ms > source.latency_p50_ms:
        ratio = model.latency_p50_ms / max(source.latency_p50_ms, 1e-9)
        reasons.append(
            f"slower than {source_name} (p50 {model.latency_p50_ms:.3f} vs {source.latency_p50_ms:.3f} ms, "
            f"{ratio:.2f}x)"
        )
    return reasons
