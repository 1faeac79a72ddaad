"""Heavy optional frameworks imported on first use, so that collecting the suite stays fast.

``import torch`` or ``import tensorflow`` at a test module's top costs 5-15 s of collection for
every run, also ``-k bundle`` ones that select none of its tests. A module instead writes
``torch = lazy("torch")`` and ``pytestmark = [pytest.mark.torch, needs("torch", ...)]``: the
framework loads when a selected test first touches it, and its absence skips the module.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import pytest


class LazyModule:
    """Stands for a module; the first attribute read imports it."""

    def __init__(self, name: str) -> None:
        self._name = name

    def module(self) -> ModuleType:
        return importlib.import_module(self._name)  # cached in sys.modules after the first call

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.module(), attr)


def lazy(name: str) -> Any:
    return LazyModule(name)


def needs(name: str, reason: str) -> pytest.MarkDecorator:
    """Skip when ``name`` is not installed, found without importing it."""
    try:
        missing = importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a parent package is missing
        missing = True
    return pytest.mark.skipif(missing, reason=reason)
