"""``cluster`` (ONNX): weight clustering (palettisation): k shared values per weight tensor.

Each float weight tensor (2+ dims, at least ``min_elements``) is replaced by k-means centroids
(1-D Lloyd iterations from a linear initialisation over [min, max], as TF-MOT's default): the
file stores a ``uint8`` index per weight and a float codebook of ``clusters`` values, and the
graph computes ``W = Gather(codebook, Cast(indices))``. ONNX Runtime folds that subgraph into a
dense constant when the session loads (graph optimisation level basic and above), so the device
runs the same dense kernels at the same speed and needs nothing new; what shrinks is the file,
and far more its transfer size: an index takes log2(k) bits of entropy, which xz gets close to.

Pruned tensors keep their zeros: with ``preserve_zeros`` exact zeros form their own centroid
fixed at 0.0. A following ``finetune`` trains the codebooks with the assignments fixed (the
codebook is the parameter; the zero centroid, being exactly zero, is held there like any
pruned weight), which is TF-MOT's "fine-tuned with the clusters fixed".
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from converter import extras
from converter.errors import PassFailed
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput

_ITERATIONS = 30


class ClusterConfig(PassConfig):
    clusters: int = Field(ge=2, le=256, description="Shared values per tensor (2-256; uint8 indices).")
    min_elements: int = Field(
        default=256, ge=1, description="Leave tensors with fewer elements than this as they are."
    )
    include_1d: bool = Field(
        default=False, description="Also cluster 1-D tensors (biases, normalization parameters)."
    )
    preserve_zeros: bool = Field(
        default=True, description="Exact zeros (pruned weights) stay exactly zero: their own fixed centroid."
    )
    exclude: list[str] = Field(
        default_factory=list, description="Shell-style patterns (fnmatch) of initializer names left alone."
    )


def kmeans_1d(
    values: npt.NDArray[np.float32], clusters: int, preserve_zeros: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """(codebook, index of each value): 1-D k-means, linear start, ``_ITERATIONS`` Lloyd steps.

    With ``preserve_zeros`` and some exact zeros, codebook[0] is 0.0 and only zeros map to it.
    """
    flat = values.reshape(-1).astype(np.float64)
    zeros = flat == 0 if preserve_zeros else np.zeros(flat.shape, bool)
    fixed = 1 if zeros.any() else 0
    rest = flat[~zeros]
    k = max(1, min(clusters - fixed, len(np.unique(rest)) if rest.size else 1))
    centroids = np.linspace(rest.min(), rest.max(), k) if rest.size else np.zeros(1)
    for _ in range(_ITERATIONS):
        # Nearest centroid by binary search on the midpoints of the sorted centroids.
        centroids = np.sort(centroids)
        assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, rest)
        sums = np.bincount(assign, weights=rest, minlength=k)
        counts = np.bincount(assign, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(moved, centroids):
            break
        centroids = moved
    centroids = np.sort(centroids)
    assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, rest)
    index = np.zeros(flat.shape, np.uint8)
    index[~zeros] = (assign + fixed).astype(np.uint8)
    codebook = np.concatenate([np.zeros(fixed), centroids]).astype(np.float32)
    return codebook, index.reshape(values.shape)


class ClusterPass(Pass[ClusterConfig]):
    name = "cluster"
    config_class = ClusterConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx"})
    #: Other passes read weights as initializers; the codebook graph is for fine-tuning and shipping.
    followers: ClassVar[frozenset[str] | None] = frozenset({"finetune"})

    def _eligible(self, name: str, array: npt.NDArray[Any]) -> bool:
        if array.dtype != np.float32 or array.size < self.config.min_elements:
            return False
        if array.ndim < 2 and not self.config.include_1d:
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.config.exclude)

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        onnx = extras.require("onnx")
        from onnx import TensorProto, helper, numpy_helper

        graph_model = load_onnx(model.path)
        graph = graph_model.graph
        kept, nodes, report = [], [], {}
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            if not self._eligible(init.name, array):
                kept.append(init)
                continue
            codebook, index = kmeans_1d(array, self.config.clusters, self.config.preserve_zeros)
            kept += [
                numpy_helper.from_array(codebook, f"{init.name}__codebook"),
                numpy_helper.from_array(index, f"{init.name}__indices"),
            ]
            cast = f"{init.name}__indices_i32"
            nodes += [
                helper.make_node("Cast", [f"{init.name}__indices"], [cast], f"{init.name}/cluster_cast",
                                 to=TensorProto.INT32),
                helper.make_node("Gather", [f"{init.name}__codebook", cast], [init.name],
                                 f"{init.name}/cluster_gather", axis=0),
            ]  # fmt: skip
            error = float(np.sqrt(np.mean((codebook[index] - array) ** 2)))
            report[init.name] = {
                "shape": list(array.shape),
                "clusters": int(codebook.size),
                "rms_error": error,
            }
        if not report:
            raise PassFailed(
                "no weight tensor to cluster (check min_elements and exclude)", pass_name=self.name
            )
        del graph.initializer[:]
        graph.initializer.extend(kept)
        # The expanding nodes go first: every consumer of a weight comes after its producer.
        rest = list(graph.node)
        del graph.node[:]
        graph.node.extend([*nodes, *rest])
        out = out_dir / f"{model.stem}-c{self.config.clusters}.onnx"
        onnx.save(graph_model, str(out))
        return PassOutput(
            model=ModelArtifact(out, "onnx"),
            details={"clustered": report},
            notes=f"{len(report)} tensors share at most {self.config.clusters} values each "
            "(uint8 indices + codebook; ONNX Runtime expands them at load); not fine-tuned",
        )
