"""Lazy imports of the heavy optional dependencies, with a one-line install hint when missing.

TensorFlow, torch, onnx and onnxruntime are imported only inside the functions that need
them, so ``edgectl --help`` and the ONNX-only paths never pay for (or need) the others.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from converter.errors import MissingExtra

#: Module -> the extra of this package that installs it.
EXTRAS: dict[str, str] = {
    "onnx": "host",
    "onnxruntime": "host",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
    "torch": "torch",
    "sklearn": "host",
    "rich": "host",
    "matplotlib": "dev",
    "ai_edge_litert": "litert",
}

#: Threads each heavy library may use: the host may be shared, and small models gain nothing more.
THREADS = int(os.environ.get("EDGE_CONVERTER_THREADS", "2"))


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming the ``pip install`` line."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, "host")
        raise MissingExtra(
            f"{module} is not installed: pip install 'edgeagent[{extra}]'", module=module, extra=extra
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` imports (without raising)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


_tf_configured = False


def tensorflow() -> ModuleType:
    """TensorFlow, quiet and limited to :data:`THREADS` threads."""
    global _tf_configured
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = require("tensorflow")
    if not _tf_configured:
        _tf_configured = True
        try:
            tf.config.threading.set_intra_op_parallelism_threads(THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(THREADS)
        except RuntimeError:  # already initialised by someone else: keep their setting
            pass
    return tf


def torch() -> ModuleType:
    """torch, limited to :data:`THREADS` threads."""
    module = require("torch")
    module.set_num_threads(THREADS)
    return module
