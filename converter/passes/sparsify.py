"""``sparsify`` (ONNX): store mostly-zero weight tensors as ONNX sparse initializers (COO).

Pruning leaves the zeros in dense tensors, so the file on disk does not shrink (the transfer
codec does squeeze them). Stored sparsely, a tensor costs 4 bytes per non-zero value plus 8 per
index (ONNX indices are int64) instead of 4 bytes per element: smaller on disk from about 2/3
sparsity on. ONNX Runtime densifies sparse initializers when it loads the model, so memory and
speed on the device are those of the dense model. Passes that rewrite weights (``quantize``)
read dense initializers, so this pass must come last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from converter import extras
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput


class SparsifyConfig(PassConfig):
    min_sparsity: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Store a float weight tensor (2+ dims) sparsely when at least this fraction of it "
        "is zero (below ~0.67 COO storage is larger than dense).",
    )


class SparsifyPass(Pass[SparsifyConfig]):
    name = "sparsify"
    config_class = SparsifyConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx"})
    terminal: ClassVar[bool] = True

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        extras.require("onnx")
        from onnx import helper, numpy_helper

        graph_model = load_onnx(model.path)
        graph = graph_model.graph
        dense, stored = [], {}
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            zeros = float(np.mean(array == 0)) if array.size else 0.0
            if array.dtype.kind == "f" and array.ndim >= 2 and zeros >= self.config.min_sparsity:
                flat = array.reshape(-1)
                index = np.flatnonzero(flat).astype(np.int64)
                values = numpy_helper.from_array(flat[index], init.name)
                indices = numpy_helper.from_array(index, f"{init.name}__indices")
                graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
                stored[init.name] = {
                    "shape": list(array.shape),
                    "nonzeros": int(index.size),
                    "sparsity": zeros,
                }
            else:
                dense.append(init)
        del graph.initializer[:]
        graph.initializer.extend(dense)
        out = out_dir / f"{model.stem}-sparse.onnx"
        extras.require("onnx").save(graph_model, str(out))
        details: dict[str, Any] = {"sparse_tensors": stored}
        return PassOutput(
            model=ModelArtifact(out, "onnx"),
            details=details,
            notes=f"{len(stored)} tensors stored as sparse initializers (COO)",
        )
