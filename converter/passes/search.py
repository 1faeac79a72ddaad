"""``search``: the accuracy-budget mode of quantization (``--max-drop``).

Tries ONNX Runtime quantization settings — dynamic vs static, per-tensor vs per-channel,
each calibration method — and, when none is within budget, the best setting with the most
sensitive nodes left in float (sensitivity = accuracy regained by excluding that node alone).
Keeps the smallest, then fastest, candidate whose top-1 drop against the pipeline's input
model is within ``max_drop``. If none is, it says so and passes its input on unchanged: it
never ships a model over budget.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from converter.errors import PassFailed, RecipeError
from converter.evaluate import Metrics
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput
from converter.passes.quantize import Calibration, Int8Target, QuantizeConfig, QuantizePass

#: Op types whose weights ORT quantizes and that the sensitivity analysis may exclude.
_WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_EPS = 1e-9
_MODES: tuple[Literal["static", "dynamic"], ...] = ("static", "dynamic")
_CALIBRATIONS: tuple[Calibration, ...] = ("minmax", "entropy", "percentile")


class SearchConfig(PassConfig):
    max_drop: float = Field(
        ge=0.0,
        le=1.0,
        description="Largest accepted top-1 accuracy drop against the pipeline's input model "
        "(fraction: 0.01 = one percentage point).",
    )
    modes: list[Literal["static", "dynamic"]] = Field(
        default_factory=lambda: list(_MODES), description="int8 modes to try."
    )
    per_channel: list[bool] = Field(
        default_factory=lambda: [False, True], description="Weight granularities to try (false = per tensor)."
    )
    calibrations: list[Calibration] = Field(
        default_factory=lambda: list(_CALIBRATIONS),
        description="Static mode: calibration methods to try.",
    )
    target: Int8Target = Field(
        default="portable",
        description="The CPU class the model will run on (see the quantize pass): decides 7-bit or "
        "8-bit int8 weights for every candidate.",
    )
    max_excluded_nodes: int = Field(
        default=2, ge=0, description="At most this many of the most sensitive nodes may stay in float."
    )
    max_sensitivity_nodes: int = Field(
        default=16,
        ge=1,
        description="Measure the sensitivity of at most this many weighted nodes (in graph order).",
    )


@dataclass
class _Candidate:
    config: QuantizeConfig
    path: Path
    metrics: Metrics

    def row(self, baseline: float) -> dict[str, Any]:
        m = self.metrics
        return {
            "mode": self.config.mode,
            "per_channel": self.config.per_channel,
            "calibration": self.config.calibration if self.config.mode == "static" else None,
            "excluded_nodes": list(self.config.nodes_to_exclude),
            "accuracy": m.accuracy,
            "drop": baseline - (m.accuracy or 0.0),
            "size_bytes": m.size_bytes,
            "latency_p50_ms": m.latency_p50_ms,
        }


class SearchPass(Pass[SearchConfig]):
    name = "search"
    config_class = SearchConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx"})

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        ctx = self.context
        if ctx.evaluator is None or ctx.baseline is None or ctx.baseline.accuracy is None:
            raise RecipeError(
                "--max-drop needs labelled classification data (--eval FILE or --dataset digits)"
            )
        baseline = ctx.baseline.accuracy
        has_calib = ctx.data is not None and ctx.data.calib is not None
        notes = []
        if not has_calib and "static" in self.config.modes:
            notes.append("static skipped: no calibration data")
        details: dict[str, Any] = {"baseline_accuracy": baseline, "max_drop": self.config.max_drop}
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".search-") as tmp:
            work = Path(tmp)
            candidates = [self._try(model, work, c) for c in self._grid(has_calib)]
            if not self._within(candidates, baseline) and self.config.max_excluded_nodes and candidates:
                candidates += self._exclude_sensitive(model, work, candidates)
            details["candidates"] = [c.row(baseline) for c in candidates]
            passing = self._within(candidates, baseline)
            if not passing:
                details["chosen"] = None
                notes.append(self._fallback(model, details["candidates"]))
                return PassOutput(model=model, details=details, notes="; ".join(notes))
            best = min(passing, key=lambda c: (c.metrics.size_bytes, c.metrics.latency_p50_ms))
            out = out_dir / f"{model.stem}-{best.config.tag}.onnx"
            shutil.copyfile(best.path, out)
        details.update(chosen=candidates.index(best), config=best.config.model_dump(mode="json"))
        notes.append(self._describe(best, len(candidates), baseline))
        return PassOutput(
            model=ModelArtifact(out, "onnx"), details=details, notes="; ".join(notes), metrics=best.metrics
        )

    def _fallback(self, model: ModelArtifact, rows: list[dict[str, Any]]) -> str:
        """Keep the float model, unless it is itself over budget (an earlier pass cost too much)."""
        evaluator, baseline = self.context.evaluator, self.context.baseline
        if evaluator is None or baseline is None or baseline.accuracy is None:  # checked in run()
            raise PassFailed("no evaluator", pass_name=self.name)
        own = evaluator.evaluate(model).metrics.accuracy or 0.0
        if baseline.accuracy - own > self.config.max_drop + _EPS:
            raise PassFailed(
                f"the model entering the search is already {baseline.accuracy - own:.2%} below the source, "
                f"over the {self.config.max_drop:.2%} budget (an earlier pass, e.g. prune, cost too much)",
                pass_name=self.name,
            )
        if not rows:
            return "no candidate could be built: kept the float model"
        best_drop = min(r["drop"] for r in rows)
        budget = f"{self.config.max_drop:.2%}"
        return f"no candidate within the {budget} budget (best drop {best_drop:.2%}): kept the float model"

    def _describe(self, best: _Candidate, count: int, baseline: float) -> str:
        c = best.config
        text = f"chose {c.mode} {'per-channel' if c.per_channel else 'per-tensor'}"
        if c.mode == "static":
            text += f" {c.calibration}"
        if c.nodes_to_exclude:
            text += f", {len(c.nodes_to_exclude)} nodes in float"
        drop = baseline - (best.metrics.accuracy or 0.0)
        return f"{text} of {count} candidates; drop {drop:.2%} <= {self.config.max_drop:.2%}"

    def _grid(self, has_calib: bool) -> list[QuantizeConfig]:
        grid = []
        for mode in self.config.modes:
            for per_channel in self.config.per_channel:
                if mode == "dynamic":
                    grid.append(
                        QuantizeConfig(mode="dynamic", per_channel=per_channel, target=self.config.target)
                    )
                elif has_calib:
                    grid += [
                        QuantizeConfig(
                            mode="static",
                            per_channel=per_channel,
                            calibration=method,
                            target=self.config.target,
                        )
                        for method in self.config.calibrations
                    ]
        return grid

    def _try(self, model: ModelArtifact, work: Path, config: QuantizeConfig) -> _Candidate:
        folder = work / f"c{len(list(work.iterdir())):03d}"
        folder.mkdir()
        output = QuantizePass(config, self.context).run(model, folder)
        evaluator = self.context.evaluator
        if evaluator is None:  # checked in run(); keeps mypy honest
            raise PassFailed("no evaluator", pass_name=self.name)
        return _Candidate(config, output.model.path, evaluator.evaluate(output.model).metrics)

    def _within(self, candidates: list[_Candidate], baseline: float) -> list[_Candidate]:
        return [
            c for c in candidates if baseline - (c.metrics.accuracy or 0.0) <= self.config.max_drop + _EPS
        ]

    def _exclude_sensitive(
        self, model: ModelArtifact, work: Path, candidates: list[_Candidate]
    ) -> list[_Candidate]:
        """Leave the most sensitive nodes of the most accurate setting in float, 1..max at a time.

        At least one weighted node stays quantized: excluding them all is the float model again.
        """
        best = max(candidates, key=lambda c: c.metrics.accuracy or 0.0)
        nodes = self._weighted_nodes(model, work)
        if len(nodes) < 2:
            return []
        singles = [
            self._try(model, work, best.config.model_copy(update={"nodes_to_exclude": [node]}))
            for node in nodes[: self.config.max_sensitivity_nodes]
        ]
        # Each single-node trial is a candidate too; rank nodes by the accuracy excluding them regains.
        by_gain = sorted(singles, key=lambda c: -(c.metrics.accuracy or 0.0))
        ranked = [c.config.nodes_to_exclude[0] for c in by_gain]
        most = min(self.config.max_excluded_nodes, len(nodes) - 1)
        more = [
            self._try(model, work, best.config.model_copy(update={"nodes_to_exclude": ranked[:count]}))
            for count in range(2, most + 1)
        ]
        return singles + more

    def _weighted_nodes(self, model: ModelArtifact, work: Path) -> list[str]:
        """Names of weighted nodes as the quantizer sees them (after ORT's pre-processing)."""
        prep = QuantizePass(QuantizeConfig(mode="dynamic"), self.context)
        source, _ = prep._prepare(model.path, work)
        graph = load_onnx(source).graph
        return [n.name for n in graph.node if n.op_type in _WEIGHTED_OPS and n.name]
