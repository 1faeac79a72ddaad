"""``mixed`` (ONNX): mixed precision by sensitivity: int8 everywhere but the layers that cannot take it.

A per-layer scan quantizes each weighted node (Conv, Gemm, MatMul) *alone*, every other node left
in float, and measures the top-1 drop against the pipeline's source model: that node's
sensitivity. The pass then quantizes every node; while the drop is over ``max_drop`` it moves the
next most sensitive node back to fp32 (at least one node stays int8). The first model within
budget ships; when none is, the input passes on unchanged with a note saying why, like the
``search`` pass. The scan table (sensitivity per node) and every tried model are in the report.

(Weight-only int4 — ORT's MatMulNBits — applies to MatMul nodes with large inner dimensions only;
the models this pass targets use Gemm and Conv, so it is not offered here.)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from converter.errors import RecipeError
from converter.evaluate import Metrics
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput
from converter.passes.quantize import Calibration, Int8Target, QuantizeConfig, QuantizePass

_WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_EPS = 1e-9


class MixedConfig(PassConfig):
    max_drop: float = Field(
        ge=0.0,
        le=1.0,
        description="Largest accepted top-1 drop against the pipeline's source (fraction 0-1).",
    )
    per_channel: bool = Field(default=False, description="int8 weights with one scale per output channel.")
    calibration: Calibration = Field(default="minmax", description="Activation range calibration.")
    target: Int8Target = Field(
        default="portable", description="The CPU class the model will run on (see the quantize pass)."
    )
    quantize_bias: bool = Field(
        default=True, description="int32 biases (false: float biases, smaller files)."
    )


class MixedPass(Pass[MixedConfig]):
    name = "mixed"
    config_class = MixedConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx"})

    def _quantize(self, exclude: list[str]) -> QuantizeConfig:
        c = self.config
        return QuantizeConfig(
            mode="static", per_channel=c.per_channel, calibration=c.calibration, target=c.target,
            quantize_bias=c.quantize_bias, nodes_to_exclude=exclude,
        )  # fmt: skip

    def _measure(self, model: ModelArtifact, work: Path, exclude: list[str]) -> tuple[Path, Metrics]:
        folder = Path(tempfile.mkdtemp(dir=work))
        output = QuantizePass(self._quantize(exclude), self.context).run(model, folder)
        if self.context.evaluator is None:  # checked in run()
            raise RecipeError("mixed precision needs evaluation data")
        return output.model.path, self.context.evaluator.evaluate(output.model).metrics

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        ctx = self.context
        if ctx.evaluator is None or ctx.baseline is None or ctx.baseline.accuracy is None:
            raise RecipeError("mixed precision needs labelled classification data (--eval or --dataset)")
        if ctx.data is None or ctx.data.calib is None:
            raise RecipeError("mixed precision (static int8) needs calibration data (--calib)")
        baseline = ctx.baseline.accuracy
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mixed-") as tmp:
            work = Path(tmp)
            nodes = self._weighted_nodes(model, work)
            scan = {}
            for node in nodes:
                _, metrics = self._measure(model, work, [n for n in nodes if n != node])
                scan[node] = baseline - (metrics.accuracy or 0.0)
            ranked = sorted(nodes, key=lambda n: -scan[n])
            tried: list[dict[str, Any]] = []
            for count in range(len(nodes)):
                path, metrics = self._measure(model, work, ranked[:count])
                drop = baseline - (metrics.accuracy or 0.0)
                tried.append(
                    {"fp32_nodes": ranked[:count], "accuracy": metrics.accuracy, "drop": drop,
                     "size_bytes": metrics.size_bytes, "latency_p50_ms": metrics.latency_p50_ms}
                )  # fmt: skip
                if drop <= self.config.max_drop + _EPS:
                    out = out_dir / f"{model.stem}-mixed.onnx"
                    shutil.copyfile(path, out)
                    return PassOutput(
                        model=ModelArtifact(out, "onnx"),
                        details={"sensitivity": scan, "tried": tried, "fp32_nodes": ranked[:count]},
                        notes=f"{len(nodes) - count} of {len(nodes)} weighted nodes int8, {count} fp32 "
                        f"(most sensitive first); drop {drop:.2%} <= {self.config.max_drop:.2%}",
                        metrics=metrics,
                    )
        return PassOutput(
            model=model,
            details={"sensitivity": scan, "tried": tried, "fp32_nodes": None},
            notes=f"no mix of int8 and fp32 nodes within the {self.config.max_drop:.2%} budget: "
            "kept the float model",
        )

    def _weighted_nodes(self, model: ModelArtifact, work: Path) -> list[str]:
        """Names of weighted nodes as the quantizer sees them (after ORT's pre-processing)."""
        source, _ = QuantizePass(QuantizeConfig(mode="dynamic"), self.context)._prepare(model.path, work)
        graph = load_onnx(source).graph
        return [n.name for n in graph.node if n.op_type in _WEIGHTED_OPS and n.name]
