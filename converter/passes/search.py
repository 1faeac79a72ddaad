"""``search``: the accuracy-budget mode of quantization (``--max-drop``).

Tries ONNX Runtime quantization settings — dynamic vs static, per-tensor vs per-channel,
each calibration method — and, when none is within budget, the best setting with the most
sensitive nodes left in float (sensitivity = accuracy regained by excluding that node alone).

A candidate is accepted when its top-1 drop against the pipeline's source model is within
``max_drop`` and it is neither larger on disk nor slower (host p50, on the evaluation data's
shapes) than the float model entering the search, measured in the same run. Among the
accepted, the ``objective`` picks: ``size`` the smallest, ``latency`` the fastest,
``balanced`` the lowest product of the two ratios to the float model (size x p50). If none is
accepted it says why and passes its input on unchanged: it never ships a model over budget,
nor one larger or slower than the float model. Every candidate, with its verdict, is in the
report.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from converter.errors import PassFailed, RecipeError
from converter.evaluate import Metrics, regressions
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput
from converter.passes.quantize import Calibration, Int8Target, QuantizeConfig, QuantizePass

#: Op types whose weights ORT quantizes and that the sensitivity analysis may exclude.
_WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_EPS = 1e-9
_MODES: tuple[Literal["static", "dynamic"], ...] = ("static", "dynamic")
_CALIBRATIONS: tuple[Calibration, ...] = ("minmax", "entropy", "percentile")
Objective = Literal["size", "latency", "balanced"]


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
    objective: Objective = Field(
        default="balanced",
        description="Which accepted candidate wins: 'size' (fewest bytes, then lowest p50), 'latency' "
        "(lowest host p50, then fewest bytes) or 'balanced' (lowest size ratio x p50 ratio to the float "
        "model). No objective accepts a candidate larger or slower than the float model.",
    )
    max_sensitivity_nodes: int = Field(
        default=16,
        ge=1,
        description="Measure the sensitivity of at most this many weighted nodes (in graph order).",
    )


def rank(objective: Objective, m: Metrics, reference: Metrics) -> tuple[float, float]:
    """Sort key of an accepted candidate under ``objective`` (lowest wins)."""
    if objective == "size":
        return (m.size_bytes, m.latency_p50_ms)
    if objective == "latency":
        return (m.latency_p50_ms, m.size_bytes)
    size = m.size_bytes / max(reference.size_bytes, 1)
    latency = m.latency_p50_ms / max(reference.latency_p50_ms, 1e-9)
    return (size * latency, m.size_bytes)


@dataclass
class _Candidate:
    config: QuantizeConfig
    path: Path
    metrics: Metrics
    #: Why the candidate cannot ship (over budget, larger, slower); empty = accepted.
    refused: list[str]

    def row(self, baseline: float, chosen: bool) -> dict[str, Any]:
        m = self.metrics
        return {
            "mode": self.config.mode,
            "per_channel": self.config.per_channel,
            "calibration": self.config.calibration if self.config.mode == "static" else None,
            "excluded_nodes": list(self.config.nodes_to_exclude),
            "accuracy": m.accuracy,
            "drop": baseline - (m.accuracy or 0.0),
            "size_bytes": m.size_bytes,
            "transfer_bytes": m.transfer_bytes,
            "latency_p50_ms": m.latency_p50_ms,
            "verdict": "chosen" if chosen else ("refused" if self.refused else "accepted"),
            "reason": "; ".join(self.refused),
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
        # The float model entering the search, measured now: candidates are timed in the same run.
        reference = ctx.evaluator.evaluate(model).metrics
        has_calib = ctx.data is not None and ctx.data.calib is not None
        notes = []
        if not has_calib and "static" in self.config.modes:
            notes.append("static skipped: no calibration data")
        details: dict[str, Any] = {
            "baseline_accuracy": baseline,
            "max_drop": self.config.max_drop,
            "objective": self.config.objective,
            "reference": {
                "artifact": model.path.name,
                **reference.model_dump(
                    mode="json", include={"accuracy", "size_bytes", "transfer_bytes", "latency_p50_ms"}
                ),
            },
        }
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".search-") as tmp:
            work = Path(tmp)
            candidates = [self._try(model, work, c, reference) for c in self._grid(has_calib)]
            if not self._within(candidates, baseline) and self.config.max_excluded_nodes and candidates:
                candidates += self._exclude_sensitive(model, work, candidates, reference)
            accepted = [c for c in candidates if not c.refused]
            objective = self.config.objective
            best = min(accepted, key=lambda c: rank(objective, c.metrics, reference), default=None)
            details["candidates"] = [c.row(baseline, c is best) for c in candidates]
            if best is None:
                details["chosen"] = None
                notes.append(self._fallback(reference, candidates, baseline))
                return PassOutput(model=model, details=details, notes="; ".join(notes))
            out = out_dir / f"{model.stem}-{best.config.tag}.onnx"
            shutil.copyfile(best.path, out)
        details.update(chosen=candidates.index(best), config=best.config.model_dump(mode="json"))
        notes.append(self._describe(best, len(candidates), baseline, reference))
        return PassOutput(
            model=ModelArtifact(out, "onnx"), details=details, notes="; ".join(notes), metrics=best.metrics
        )

    def _fallback(self, reference: Metrics, candidates: list[_Candidate], baseline: float) -> str:
        """Keep the float model, unless it is itself over budget (an earlier pass cost too much)."""
        own = reference.accuracy or 0.0
        if baseline - own > self.config.max_drop + _EPS:
            raise PassFailed(
                f"the model entering the search is already {baseline - own:.2%} below the source, "
                f"over the {self.config.max_drop:.2%} budget (an earlier pass, e.g. prune, cost too much)",
                pass_name=self.name,
            )
        if not candidates:
            return "no candidate could be built: kept the float model"
        budget = f"{self.config.max_drop:.2%}"
        within = self._within(candidates, baseline)
        if within:
            return (
                f"{len(within)} candidates within the {budget} budget, all larger or slower than the "
                "float model (see the candidates): kept the float model"
            )
        best_drop = min(baseline - (c.metrics.accuracy or 0.0) for c in candidates)
        return f"no candidate within the {budget} budget (best drop {best_drop:.2%}): kept the float model"

    def _describe(self, best: _Candidate, count: int, baseline: float, reference: Metrics) -> str:
        c, m = best.config, best.metrics
        text = f"chose {c.mode} {'per-channel' if c.per_channel else 'per-tensor'}"
        if c.mode == "static":
            text += f" {c.calibration}"
        if c.nodes_to_exclude:
            text += f", {len(c.nodes_to_exclude)} nodes in float"
        drop = baseline - (m.accuracy or 0.0)
        size = m.size_bytes / max(reference.size_bytes, 1)
        latency = m.latency_p50_ms / max(reference.latency_p50_ms, 1e-9)
        return (
            f"{text} of {count} candidates (objective {self.config.objective}); "
            f"drop {drop:.2%} <= {self.config.max_drop:.2%}; "
            f"size {size:.2f}x, p50 {latency:.2f}x the float model's"
        )

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

    def _try(
        self, model: ModelArtifact, work: Path, config: QuantizeConfig, reference: Metrics
    ) -> _Candidate:
        folder = work / f"c{len(list(work.iterdir())):03d}"
        folder.mkdir()
        output = QuantizePass(config, self.context).run(model, folder)
        evaluator = self.context.evaluator
        if evaluator is None:  # checked in run(); keeps mypy honest
            raise PassFailed("no evaluator", pass_name=self.name)
        metrics = evaluator.evaluate(output.model).metrics
        baseline = self.context.baseline.accuracy if self.context.baseline is not None else None
        drop = (baseline or 0.0) - (metrics.accuracy or 0.0)
        refused = [f"drop {drop:.2%} over the {self.config.max_drop:.2%} budget"] if self._over(drop) else []
        refused += regressions(metrics, reference, "the float model")
        return _Candidate(config, output.model.path, metrics, refused)

    def _over(self, drop: float) -> bool:
        return drop > self.config.max_drop + _EPS

    def _within(self, candidates: list[_Candidate], baseline: float) -> list[_Candidate]:
        return [c for c in candidates if not self._over(baseline - (c.metrics.accuracy or 0.0))]

    def _exclude_sensitive(
        self, model: ModelArtifact, work: Path, candidates: list[_Candidate], reference: Metrics
    ) -> list[_Candidate]:
        """Leave the most sensitive nodes of the most accurate setting in float, 1..max at a time.

        At least one weighted node stays quantized: excluding them all is the float model again.
        """
        best = max(candidates, key=lambda c: c.metrics.accuracy or 0.0)
        nodes = self._weighted_nodes(model, work)
        if len(nodes) < 2:
            return []
        singles = [
            self._try(model, work, best.config.model_copy(update={"nodes_to_exclude": [node]}), reference)
            for node in nodes[: self.config.max_sensitivity_nodes]
        ]
        # Each single-node trial is a candidate too; rank nodes by the accuracy excluding them regains.
        by_gain = sorted(singles, key=lambda c: -(c.metrics.accuracy or 0.0))
        ranked = [c.config.nodes_to_exclude[0] for c in by_gain]
        most = min(self.config.max_excluded_nodes, len(nodes) - 1)
        more = [
            self._try(
                model, work, best.config.model_copy(update={"nodes_to_exclude": ranked[:count]}), reference
            )
            for count in range(2, most + 1)
        ]
        return singles + more

    def _weighted_nodes(self, model: ModelArtifact, work: Path) -> list[str]:
        """Names of weighted nodes as the quantizer sees them (after ORT's pre-processing)."""
        prep = QuantizePass(QuantizeConfig(mode="dynamic"), self.context)
        source, _ = prep._prepare(model.path, work)
        graph = load_onnx(source).graph
        return [n.name for n in graph.node if n.op_type in _WEIGHTED_OPS and n.name]
