"""The pass registry: name -> class, imported lazily by module path.

Heavy backends (TensorFlow, onnxruntime.quantization) are imported inside each pass's
``run``, so resolving a name only imports the small pass module.
"""

from __future__ import annotations

import importlib
from typing import Any

from converter.errors import RecipeError
from converter.passes.base import EpochLog, Pass, PassConfig, PassContext, PassOutput

#: Every pass, by the name recipes use. Values are "module:Class".
REGISTRY: dict[str, str] = {
    "cluster": "converter.passes.cluster:ClusterPass",
    "distill": "converter.passes.distill:DistillPass",
    "finetune": "converter.passes.finetune:FinetunePass",
    "mixed": "converter.passes.mixed:MixedPass",
    "prune": "converter.passes.prune:PrunePass",
    "quantize": "converter.passes.quantize:QuantizePass",
    "search": "converter.passes.search:SearchPass",
    "sparsify": "converter.passes.sparsify:SparsifyPass",
    "structured": "converter.passes.structured:StructuredPass",
    "tflite": "converter.passes.tflite:TflitePass",
}


def pass_class(name: str) -> type[Pass[Any]]:
    """The pass class registered as ``name``."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module_name, _, attr = target.partition(":")
    cls: type[Pass[Any]] = getattr(importlib.import_module(module_name), attr)
    return cls


__all__ = ["REGISTRY", "EpochLog", "Pass", "PassConfig", "PassContext", "PassOutput", "pass_class"]
