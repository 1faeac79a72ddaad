"""``prune``: magnitude pruning of weights, w' = w if |w| > θ else 0.

θ comes from a target sparsity: the k-th smallest |w| with k = round(sparsity · n), either
over all prunable tensors together (``global``) or per tensor (``per_layer``). Prunable by
default are float weight tensors with two or more dimensions (dense/conv kernels,
embeddings); biases and normalization parameters are 1-D and left alone unless asked.
Works on ONNX initializers and on Keras weights; the report gives the sparsity per tensor.
No fine-tuning here: accuracy lost by pruning is recovered by the ``finetune`` pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from converter import extras
from converter.errors import PassFailed
from converter.model import ModelArtifact, ModelKind, load_keras, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput


class PruneConfig(PassConfig):
    sparsity: float = Field(
        ge=0.0, lt=1.0, description="Target fraction of prunable weights set to zero (0-1, e.g. 0.9)."
    )
    scope: Literal["global", "per_layer"] = Field(
        default="global",
        description="'global': one threshold over all prunable tensors (layers end up with different "
        "sparsity); 'per_layer': each tensor pruned to the target on its own.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Shell-style patterns (fnmatch) of tensor names, or of ONNX node names using them, "
        "never pruned, e.g. ['fc1.*', '*/logits/*'].",
    )
    prune_biases_and_norms: bool = Field(
        default=False, description="Also prune 1-D tensors (biases, normalization scales and shifts)."
    )
    min_elements: int = Field(
        default=0, ge=0, description="Leave tensors with fewer elements than this alone."
    )


def magnitude_threshold(magnitudes: npt.NDArray[Any], sparsity: float) -> float:
    """θ such that zeroing |w| <= θ zeroes round(sparsity · n) of ``magnitudes`` (ties zero more)."""
    k = round(sparsity * magnitudes.size)
    if k <= 0:
        return -1.0
    return float(np.partition(magnitudes.reshape(-1), k - 1)[k - 1])


def prune_arrays(
    tensors: dict[str, npt.NDArray[Any]], config: PruneConfig
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, dict[str, Any]]]:
    """Pruned copies of ``tensors`` and, per tensor, elements, zeros, sparsity and threshold."""
    if config.scope == "global" and tensors:
        everything = np.concatenate([np.abs(t).reshape(-1) for t in tensors.values()])
        theta = magnitude_threshold(everything, config.sparsity)
        thetas = dict.fromkeys(tensors, theta)
    else:
        thetas = {name: magnitude_threshold(np.abs(t), config.sparsity) for name, t in tensors.items()}
    pruned, report = {}, {}
    for name, tensor in tensors.items():
        new = np.where(np.abs(tensor) > thetas[name], tensor, np.zeros_like(tensor)).astype(tensor.dtype)
        zeros = int(np.count_nonzero(new == 0))
        pruned[name] = new
        report[name] = {
            "shape": list(tensor.shape),
            "elements": int(tensor.size),
            "zeros": zeros,
            "sparsity": zeros / tensor.size if tensor.size else 0.0,
            "threshold": thetas[name],
        }
    return pruned, report


def _overall(report: dict[str, dict[str, Any]]) -> float:
    elements = sum(r["elements"] for r in report.values())
    return sum(r["zeros"] for r in report.values()) / elements if elements else 0.0


class PrunePass(Pass[PruneConfig]):
    name = "prune"
    config_class = PruneConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx", "keras"})

    def _eligible(self, name: str, array_shape: tuple[int, ...], users: Iterable[str] = ()) -> bool:
        size = int(np.prod(array_shape)) if array_shape else 1
        if len(array_shape) < 2 and not (self.config.prune_biases_and_norms and size > 1):
            return False
        if size < self.config.min_elements:
            return False
        names = [name, *users]
        return not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.config.exclude)

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        tag = f"p{round(self.config.sparsity * 100)}"
        if model.kind == "onnx":
            out = out_dir / f"{model.stem}-{tag}.onnx"
            report = self._prune_onnx(model.path, out)
            result = ModelArtifact(out, "onnx")
        else:
            out = out_dir / f"{model.stem}-{tag}.keras"
            report = self._prune_keras(model.path, out)
            result = ModelArtifact(out, "keras")
        if not report:
            raise PassFailed(
                "no prunable weight tensors (check 'exclude' and 'min_elements')", pass_name=self.name
            )
        overall = _overall(report)
        return PassOutput(
            model=result,
            details={"tensors": report},
            sparsity=overall,
            notes=f"{len(report)} tensors, {overall:.1%} of their weights zero; not fine-tuned",
        )

    def _prune_onnx(self, source: Path, out: Path) -> dict[str, dict[str, Any]]:
        onnx = extras.require("onnx")
        from onnx import numpy_helper

        graph_model = load_onnx(source)
        users: dict[str, list[str]] = {}
        for node in graph_model.graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node.name)
        tensors = {}
        for init in graph_model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype.kind == "f" and self._eligible(init.name, array.shape, users.get(init.name, ())):
                tensors[init.name] = array
        pruned, report = prune_arrays(tensors, self.config)
        for init in graph_model.graph.initializer:
            if init.name in pruned:
                init.CopyFrom(numpy_helper.from_array(pruned[init.name], init.name))
        onnx.save(graph_model, str(out))
        return report

    def _prune_keras(self, source: Path, out: Path) -> dict[str, dict[str, Any]]:
        net = load_keras(source)
        variables = {v.path: v for v in net.weights if "float" in str(v.dtype)}
        tensors = {
            path: np.asarray(v.numpy())
            for path, v in variables.items()
            if self._eligible(path, tuple(v.shape))
        }
        pruned, report = prune_arrays(tensors, self.config)
        for path, value in pruned.items():
            variables[path].assign(value)
        net.save(str(out))
        return report
