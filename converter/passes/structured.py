"""``structured`` (ONNX, Keras Sequential): remove whole filters and neurons: a smaller dense graph.

Magnitude pruning (``prune``) zeroes single weights: the file and the arithmetic stay dense, so
only the transfer size falls. This pass removes whole output channels instead: the filters of a
Conv, the neurons of a Gemm/MatMul, with their biases, batch-norm parameters and the input
channels/rows of the layers that read them (:mod:`converter.channels`), so every later matrix
product is smaller and the model is faster on any runtime. Channels are ranked by the L1 or L2
norm of their weights; each prunable layer loses ``fraction`` of its channels (rounded so that a
multiple of ``multiple_of`` remain). With ``sensitivity_max_drop`` every layer is first pruned
alone and measured, and layers that lose more top-1 than that are left whole. Accuracy lost here
is recovered by a ``finetune`` pass after it.
"""

from __future__ import annotations

import fnmatch
import math
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from converter import extras
from converter.channels import ChannelGraph, Producer, apply_cuts
from converter.errors import PassFailed
from converter.model import ModelArtifact, ModelKind, load_keras, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput


class StructuredConfig(PassConfig):
    fraction: float = Field(
        gt=0.0, lt=1.0, description="Fraction (0-1) of each prunable layer's output channels removed."
    )
    criterion: Literal["l1", "l2"] = Field(
        default="l1", description="Channel importance: L1 or L2 norm of the channel's weights."
    )
    multiple_of: int = Field(
        default=1, ge=1, description="Round the kept channel count down to a multiple of this (SIMD width)."
    )
    min_channels: int = Field(default=1, ge=1, description="Never keep fewer channels than this in a layer.")
    exclude: list[str] = Field(
        default_factory=list,
        description="Shell-style patterns (fnmatch) of node or weight names never pruned, e.g. ['/conv1/*'].",
    )
    sensitivity_max_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Sensitivity scan: prune each layer alone first and leave whole the layers that lose "
        "more top-1 (fraction 0-1) than this; needs evaluation data. None = prune every layer.",
    )


def kept_count(channels: int, config: StructuredConfig) -> int:
    """How many of ``channels`` a layer keeps under ``config``."""
    keep = max(config.min_channels, math.ceil(channels * (1.0 - config.fraction)))
    if config.multiple_of > 1 and keep >= config.multiple_of:
        keep -= keep % config.multiple_of
    return min(channels, keep)


class StructuredPass(Pass[StructuredConfig]):
    name = "structured"
    config_class = StructuredConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx", "keras"})

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        if model.kind == "keras":
            return self._run_keras(model, out_dir)
        from onnx import numpy_helper

        graph_model = load_onnx(model.path)
        inits = {i.name: numpy_helper.to_array(i) for i in graph_model.graph.initializer}
        graph = ChannelGraph(graph_model, inits)
        producers = [p for p in graph.producers if not self._excluded(p)]
        kept = {p.node: k for p in producers if len(k := self._keep(p, inits)) < p.channels}
        if not kept:
            reasons = "; ".join(f"{n}: {r}" for n, r in graph.blocked.items()) or (
                "no Conv/Gemm/MatMul with float initializer weights; run it before quantize"
            )
            raise PassFailed(f"no layer can lose channels ({reasons})", pass_name=self.name)
        sensitivity: dict[str, float] = {}
        if self.config.sensitivity_max_drop is not None:
            sensitivity = self._scan(model.path, inits, kept, producers)
            kept = {n: k for n, k in kept.items() if sensitivity[n] <= self.config.sensitivity_max_drop}
        out = out_dir / f"{model.stem}-s{round(self.config.fraction * 100)}.onnx"
        self._write(model.path, inits, kept, producers, out)
        layers = {
            p.node: {
                "channels_before": p.channels,
                "channels_after": len(kept[p.node]) if p.node in kept else p.channels,
                **({"sensitivity_drop": sensitivity[p.node]} if p.node in sensitivity else {}),
            }
            for p in producers
        }
        before = sum(int(a.size) for a in inits.values())
        after = sum(int(a.size) for a in _initializers(out).values())
        return PassOutput(
            model=ModelArtifact(out, "onnx"),
            details={"layers": layers, "unprunable": graph.blocked, "parameters": [before, after]},
            notes=f"{len(kept)} of {len(layers)} layers lost channels; parameters {before:,} -> {after:,} "
            f"({after / max(before, 1):.0%}); not fine-tuned",
        )

    def _run_keras(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        from converter.keras_channels import prune_sequential

        if self.config.sensitivity_max_drop is not None:
            raise PassFailed("sensitivity_max_drop applies to ONNX models", pass_name=self.name)
        net = load_keras(model.path)

        def choose(kernel: npt.NDArray[Any], _name: str) -> npt.NDArray[np.int64] | None:
            flat = np.moveaxis(kernel.astype(np.float64), -1, 0).reshape(kernel.shape[-1], -1)
            scores = np.abs(flat).sum(1) if self.config.criterion == "l1" else np.sqrt((flat * flat).sum(1))
            count = kept_count(len(scores), self.config)
            return None if count == len(scores) else np.sort(np.argsort(-scores, kind="stable")[:count])

        pruned, layers, blocked = prune_sequential(net, choose, self.config.exclude)
        if not layers:
            reasons = "; ".join(f"{n}: {r}" for n, r in blocked.items()) or "no Dense/Conv2D layers"
            raise PassFailed(f"no layer can lose channels ({reasons})", pass_name=self.name)
        out = out_dir / f"{model.stem}-s{round(self.config.fraction * 100)}.keras"
        pruned.save(str(out))
        before, after = net.count_params(), pruned.count_params()
        return PassOutput(
            model=ModelArtifact(out, "keras"),
            details={"layers": layers, "unprunable": blocked, "parameters": [before, after]},
            notes=f"{len(layers)} layers lost channels; parameters {before:,} -> {after:,} "
            f"({after / max(before, 1):.0%}); not fine-tuned",
        )

    def _excluded(self, producer: Producer) -> bool:
        names = (producer.node, producer.weight)
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.config.exclude)

    def _keep(self, producer: Producer, inits: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.int64]:
        """Ids of the channels to keep, the most important first removed last, in channel order."""
        scores = producer.importance(inits, self.config.criterion)
        count = kept_count(producer.channels, self.config)
        return np.sort(np.argsort(-scores, kind="stable")[:count]).astype(np.int64)

    def _write(
        self,
        source: Path,
        inits: dict[str, npt.NDArray[Any]],
        kept: dict[str, npt.NDArray[np.int64]],
        producers: list[Producer],
        out: Path,
    ) -> None:
        onnx = extras.require("onnx")
        from onnx import numpy_helper

        new = apply_cuts(inits, kept, producers)
        graph_model = load_onnx(source)
        for init in graph_model.graph.initializer:
            if init.name in new:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new[init.name]), init.name))
        groups = {n: len(kept[p.node]) for p in producers if p.node in kept for n in p.depthwise}
        for node in graph_model.graph.node:
            for attribute in node.attribute:
                if node.name in groups and attribute.name == "group":
                    attribute.i = groups[node.name]
        # Inferred intermediate shapes name the old channel counts; ORT re-infers them.
        del graph_model.graph.value_info[:]
        try:
            onnx.checker.check_model(graph_model)
            onnx.shape_inference.infer_shapes(graph_model, strict_mode=True)
        except Exception as exc:  # onnx raises ValidationError and InferenceError
            raise PassFailed(f"the pruned graph is invalid ({exc})", pass_name=self.name) from exc
        onnx.save(graph_model, str(out))

    def _scan(
        self,
        source: Path,
        inits: dict[str, npt.NDArray[Any]],
        kept: dict[str, npt.NDArray[np.int64]],
        producers: list[Producer],
    ) -> dict[str, float]:
        """Top-1 lost (fraction) when each layer alone loses its channels."""
        evaluator, baseline = self.context.evaluator, self.context.baseline
        if evaluator is None or baseline is None or baseline.accuracy is None:
            raise PassFailed("sensitivity_max_drop needs labelled evaluation data", pass_name=self.name)
        drops: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="structured-scan-") as tmp:
            for node, channels in kept.items():
                path = Path(tmp) / f"{len(drops)}.onnx"
                self._write(source, inits, {node: channels}, producers, path)
                accuracy = evaluator.evaluate(ModelArtifact(path, "onnx")).metrics.accuracy or 0.0
                drops[node] = baseline.accuracy - accuracy
        return drops


def _initializers(path: Path) -> dict[str, npt.NDArray[Any]]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in load_onnx(path).graph.initializer}
