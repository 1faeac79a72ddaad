"""What every runtime adapter provides: the :class:`Adapter` and :class:`Session` protocols,
typed load options, and the record of a fallback.

An adapter loads a model file with :class:`LoadOptions` and returns a :class:`Session`
that runs raw tensors (the model's own dtypes and shapes). Everything a caller sees
beyond that (float in/out for quantized models, batching, validation) lives once in
:class:`edgeagent.runtimes.model.LoadedModel`, not in each adapter.

A delegate or execution provider that was asked for but could not be used never crashes
a load: the adapter loads on its CPU path and records a :class:`Fallback` saying what was
asked, what is used, and why. Selection decides whether a fallback is acceptable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from edgeagent.bundle.manifest import TensorSpec

GraphOptimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; each adapter maps these typed fields onto its library in one place.

    ``delegate`` is a LiteRT delegate (``xnnpack``, ``gpu``, ``edgetpu``, ``external``) or an
    ONNX Runtime execution provider name (``CUDAExecutionProvider``...). ``precision`` is the
    precision to compute in (TensorRT builds an fp16/int8 engine from it).
    """

    delegate: str
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    threads: int | None = None  # CPU threads for the runtime's CPU kernels; None = runtime default
    graph_optimization: GraphOptimization = "all"  # ONNX Runtime graph optimisation level
    delegate_library: Path | None = None  # LiteRT 'external' delegate: the shared library to load
    # Options of an external LiteRT delegate, passed as-is to its tflite_plugin_create_delegate:
    # their keys are defined by that library, not by us.
    delegate_options: Mapping[str, str] = field(default_factory=dict)
    cache_dir: Path | None = None  # where an accelerator may cache compiled engines (TensorRT)


@dataclass(frozen=True)
class Fallback:
    """A delegate/provider that was requested but is not in use, and why."""

    requested: str
    used: str
    reason: str

    def __str__(self) -> str:
        return f"{self.requested} -> {self.used}: {self.reason}"


class SessionInfo:
    """What every adapter's session reports the same way; subclasses set the attributes in __init__."""

    _delegate: str
    _fallbacks: tuple[Fallback, ...]
    _inputs: tuple[TensorSpec, ...]
    _outputs: tuple[TensorSpec, ...]

    @property
    def delegate(self) -> str:
        return self._delegate

    @property
    def fallbacks(self) -> Sequence[Fallback]:
        return self._fallbacks

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    @property
    def batch_dynamic(self) -> bool:
        return all(not spec.shape or spec.shape[0] is None for spec in self._inputs)


class Session(Protocol):
    """A loaded model in one runtime. ``run`` takes and returns the model's raw tensors."""

    @property
    def runtime(self) -> str:
        """Adapter name: 'litert' or 'onnxruntime'."""
        ...

    @property
    def delegate(self) -> str:
        """The delegate/provider really in use (after any fallback)."""
        ...

    @property
    def fallbacks(self) -> Sequence[Fallback]:
        """Delegates/providers that were asked for and are not in use."""
        ...

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    @property
    def batch_dynamic(self) -> bool:
        """True when one ``run`` may carry several samples along dimension 0."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once. ``feeds`` maps every input name to an array of the input's dtype."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; ``run`` afterwards raises."""
        ...


class Adapter(Protocol):
    """A runtime: can say whether it is installed and load model files."""

    name: str
    formats: tuple[str, ...]  # model formats it loads: 'onnx', 'tflite'

    def unavailable_reason(self) -> str | None:
        """None when the runtime imports; else one line saying what to install."""
        ...

    def load(self, path: Path, options: LoadOptions) -> Session:
        """Load ``path``. Raises ModelLoadError; a delegate that fails becomes a Fallback."""
        ...


def one_line(exc: BaseException) -> str:
    """An exception's message folded onto one line (runtimes write multi-line errors)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__
