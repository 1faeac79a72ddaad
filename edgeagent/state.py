"""Stateful models: the state a model carries from one request (step) to the next.

A model entry's ``state`` (manifest schema 3) declares it in one of two ways:

* **state pairs** (``output -> input``): the model takes its state as an input and returns
  the new state as an output (``state`` -> ``stateN``). A :class:`StateCarrier` fills the
  state inputs a caller leaves out (from a session, or the initial state) and takes the next
  state from the outputs. Callers send only the other inputs; one that sends a state input
  itself overrides the carried state for that step.
* **variables**: the model keeps its state inside the runtime (TFLite resource variables:
  VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE). LiteRT's ``reset_all_variables()`` does not
  restore resource variables, so a fresh state means a fresh interpreter: every session gets
  its own (:meth:`StateCarrier.fresh_model`), and so does every call without a session.

A LiteRT model whose file uses resource-variable ops (:mod:`edgeagent.runtimes.tflite_ops`)
is treated as stateful even when its manifest says nothing (bundles built before state was
declared).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.bundle.manifest import ModelEntry, ModelState
from edgeagent.errors import InputError, UsageError
from edgeagent.runtimes import load_model
from edgeagent.runtimes.model import Feeds, LoadedModel

State = dict[str, np.ndarray]  # state input name -> its value for the next step


def keeps_variables(model: LoadedModel) -> bool:
    """True when the runtime reports state held inside the model (TFLite resource variables)."""
    return bool(getattr(model.session, "keeps_variables", False))


class StateCarrier:
    """How one loaded stateful model carries its state; shared by acceptance and serving."""

    def __init__(self, spec: ModelState, model: LoadedModel, initial: State) -> None:
        self.spec = spec
        self.variables = spec.variables
        self.state_inputs = frozenset(p.input for p in spec.pairs)
        self._initial = initial
        for array in initial.values():
            array.flags.writeable = False  # shared by every session that has not stepped yet
        outputs = list(model.output_names)
        self._carry = tuple((p.input, outputs.index(p.output)) for p in spec.pairs)
        self._others = tuple(s.name for s in model.inputs if s.name not in self.state_inputs)

    @classmethod
    def for_model(
        cls, entry: ModelEntry | None, model: LoadedModel, bundle_dir: Path | None = None
    ) -> StateCarrier | None:
        """The carrier of ``model`` (loaded from ``entry``), or None for a stateless model."""
        spec = entry.state if entry is not None else None
        if spec is None and keeps_variables(model):
            spec = ModelState(variables=True)
        if spec is None:
            return None
        initial: State = {}
        for pair in spec.pairs:
            want = model.caller_dtype(pair.input)
            shape = next(s.shape for s in model.inputs if s.name == pair.input)
            if pair.initial is None:
                initial[pair.input] = np.zeros([1 if d is None else d for d in shape], want)
                continue
            where = (bundle_dir or Path()) / pair.initial
            try:
                array = np.load(where, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise UsageError(f"{pair.initial}: not a readable initial state .npy ({exc})") from exc
            if array.ndim != len(shape) or not np.can_cast(array.dtype, want, casting="same_kind"):
                raise UsageError(
                    f"{pair.initial}: initial state of {pair.input!r} is {array.dtype} "
                    f"{list(array.shape)}; the input takes {want} {shape}"
                )
            initial[pair.input] = np.ascontiguousarray(array, dtype=want)
        return cls(spec, model, initial)

    def describe(self) -> dict[str, Any]:
        """What ``/v1/models`` says about the model's state."""
        return {
            "pairs": [{"output": p.output, "input": p.input} for p in self.spec.pairs],
            "variables": self.variables,
        }

    def initial_state(self) -> State:
        """A session's state before its first step (read-only arrays, shared)."""
        return dict(self._initial)

    def step(
        self, model: LoadedModel, feeds: Feeds, state: State, *, raw: bool = False
    ) -> tuple[list[np.ndarray], State]:
        """One step: ``feeds`` + ``state`` for the state inputs they leave out -> (outputs, next state)."""
        if raw and self._carry:
            raise InputError("raw=true cannot carry a model's state; send float values", code="raw_state")
        merged = dict(state)
        merged.update(self._named(feeds))
        outputs = model.predict(merged, raw=raw)
        return outputs, {name: outputs[index] for name, index in self._carry}

    def fresh_model(self, model: LoadedModel) -> LoadedModel:
        """A new instance of ``model`` with its initial state (its own interpreter / session)."""
        if model.origin is None:
            raise UsageError(f"{model.path.name} keeps state in variables but cannot be reloaded")
        runtime, options = model.origin
        fresh = load_model(model.path, runtime, options, precision=model.precision)
        return fresh

    def _named(self, feeds: Feeds) -> Mapping[str, Any]:
        if isinstance(feeds, Mapping):
            return feeds
        if len(self._others) != 1:
            raise InputError(
                f"the model takes {len(self._others)} inputs besides its state "
                f"({', '.join(self._others)}); send them by name",
                code="missing_input",
            )
        return {self._others[0]: feeds}
