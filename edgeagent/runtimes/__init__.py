"""Runtime adapters (LiteRT, ONNX Runtime) behind one small protocol, and their registry.

Adapters are registered by module path and imported on first use, so a device with only
one runtime installed never imports the other. See ``docs/runtimes.md``.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from edgeagent.errors import RuntimeUnavailable, UsageError
from edgeagent.runtimes.base import Adapter, Fallback, LoadOptions, Session
from edgeagent.runtimes.model import LoadedModel

# Runtime name (as device profiles and manifests spell it) -> "module:class" of its adapter.
ADAPTERS: dict[str, str] = {
    "litert": "edgeagent.runtimes.litert:LiteRTAdapter",
    "onnxruntime": "edgeagent.runtimes.ort:OrtAdapter",
}


@functools.cache
def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name`` (imports its module, not its runtime)."""
    target = ADAPTERS.get(name)
    if target is None:
        raise UsageError(f"unknown runtime {name!r} (known: {', '.join(sorted(ADAPTERS))})")
    module_name, _, class_name = target.partition(":")
    adapter: Adapter = getattr(importlib.import_module(module_name), class_name)()
    return adapter


def load_model(path: Path, runtime: str, options: LoadOptions, *, precision: str = "fp32") -> LoadedModel:
    """Load ``path`` in ``runtime``; raises RuntimeUnavailable or ModelLoadError."""
    adapter = get_adapter(runtime)
    reason = adapter.unavailable_reason()
    if reason is not None:
        raise RuntimeUnavailable(reason, runtime=runtime)
    model = LoadedModel(adapter.load(path, options), path=path, precision=precision)
    model.origin = (runtime, options)
    return model


__all__ = [
    "ADAPTERS",
    "Adapter",
    "Fallback",
    "LoadOptions",
    "LoadedModel",
    "Session",
    "get_adapter",
    "load_model",
]
