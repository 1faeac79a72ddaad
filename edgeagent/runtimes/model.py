"""A loaded model as callers see it: validated inputs, float in/out for quantized models, batching.

:class:`LoadedModel` wraps any runtime :class:`~edgeagent.runtimes.base.Session` and does,
once for every runtime:

* **validation**: input names, rank, fixed dimensions and dtype kind, each failure an
  :class:`~edgeagent.errors.InputError` with a ``code`` the server maps to a 4xx;
* **quantized I/O**: an int8/uint8 input with quantization parameters takes float values and
  quantizes them with the model's own scale/zero-point, ``q = clip(round(x / s + zp))``; such
  outputs come back dequantized, ``(q - zp) * s``. ``raw=True`` passes the integer tensors
  through unchanged;
* **batching**: a model whose batch dimension is fixed to 1 (typical TFLite) runs a batch of
  N samples as N invocations; a model with a dynamic batch runs it in one. A single sample
  given without its batch dimension is accepted and gets one. A scalar (rank-0) input, such
  as a sample rate, has no batch dimension: it takes one value (or a batch of one, ``[v]``)
  that applies to every sample of the batch. An input whose declared first dimension is a
  fixed integer other than 1, in a model with a batched input beside it (Silero VAD's state,
  (2, batch, 128)), has no batch dimension either (:func:`fed_whole`): it is fed whole, in
  the shape the model declares, to every invocation, and takes no part in the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.bundle.manifest import Quantization, TensorSpec
from edgeagent.errors import InputError
from edgeagent.runtimes.base import Fallback, LoadOptions, Session

Feeds = np.ndarray | Mapping[str, Any]


@dataclass(frozen=True)
class _Affine:
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    @classmethod
    def of(cls, q: Quantization) -> _Affine:
        return cls(np.asarray(q.scale, np.float32), np.asarray(q.zero_point, np.float32), q.axis)

    def _shaped(self, values: np.ndarray, ndim: int) -> np.ndarray:
        if self.axis is None or values.size == 1:
            return values.reshape(())
        shape = [1] * ndim
        shape[self.axis] = values.size
        return values.reshape(shape)

    def quantize(self, x: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
        info = np.iinfo(dtype)
        q = np.rint(x / self._shaped(self.scale, x.ndim)) + self._shaped(self.zero_point, x.ndim)
        clipped: np.ndarray = np.clip(q, info.min, info.max).astype(dtype)
        return clipped

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        zp = self._shaped(self.zero_point, q.ndim)
        scale = self._shaped(self.scale, q.ndim)
        real: np.ndarray = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
        return real


@dataclass(frozen=True)
class _InputPlan:
    spec: TensorSpec
    dtype: np.dtype[Any]  # the model's dtype
    dims: tuple[int | None, ...]  # dimensions after the batch one
    fixed_batch: int | None
    affine: _Affine | None  # set when the model takes quantized integers
    scalar: bool  # rank 0: no batch dimension
    whole: bool = False  # no batch dimension: fed as declared (dims is then the whole shape)

    @property
    def unbatched(self) -> bool:
        return self.scalar or self.whole

    def batch_ok(self, n: int, dynamic: bool) -> bool:
        return n > 0 and (dynamic or self.fixed_batch in (None, 1, n))


class LoadedModel:
    """A model in a runtime session, with the checks and conversions every caller needs.

    ``predict`` is thread-safe when the session is (ONNX Runtime is; the LiteRT session
    serialises with a lock).
    """

    def __init__(self, session: Session, *, path: Path, precision: str) -> None:
        self.session = session
        self.path = path
        self.precision = precision
        # (runtime, options) it was loaded with: lets a stateful model be loaded afresh per session.
        self.origin: tuple[str, LoadOptions] | None = None
        self.inputs: tuple[TensorSpec, ...] = tuple(session.inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(session.outputs)
        self.output_names = tuple(o.name for o in self.outputs)
        whole = fed_whole({s.name: s.shape for s in self.inputs})
        self._plans = tuple(_plan(spec, spec.name in whole) for spec in self.inputs)
        #: Inputs without a batch dimension (scalars, inputs fed whole): never sliced per sample.
        self.unbatched = frozenset(p.spec.name for p in self._plans if p.unbatched)
        self._names = frozenset(s.name for s in self.inputs)
        self._out_affine = tuple(
            _Affine.of(o.quantization) if _is_quantized(o) and o.quantization else None for o in self.outputs
        )
        self._batch_dynamic = session.batch_dynamic
        batched = [p for p in self._plans if not p.unbatched]
        self._fixed_batch = batched[0].fixed_batch if batched else None
        only = self._plans[0] if len(self._plans) == 1 and not self._plans[0].unbatched else None
        # The fast path of predict: single input, fully known sample shape.
        self._fast = only if only is not None and None not in only.dims else None

    @property
    def runtime(self) -> str:
        return self.session.runtime

    @property
    def delegate(self) -> str:
        return self.session.delegate

    @property
    def fallbacks(self) -> Sequence[Fallback]:
        return self.session.fallbacks

    def caller_dtype(self, name: str, *, raw: bool = False) -> np.dtype[Any]:
        """The dtype a caller should send for input ``name`` (float32 for quantized inputs)."""
        for plan in self._plans:
            if plan.spec.name == name:
                return np.dtype(np.float32) if plan.affine is not None and not raw else plan.dtype
        raise InputError(f"the model has no input {name!r}", code="unknown_input", tensor=name)

    def predict(self, feeds: Feeds, *, raw: bool = False) -> list[np.ndarray]:
        """Run the model. ``feeds`` is one array (single-input models) or a mapping name -> array.

        Returns one array per output, in the model's output order, each with a batch dimension.
        Raises InputError for inputs that do not fit, InferenceError when the runtime fails.
        """
        fast = self._fast
        if (  # the common request: one array, already the model's dtype and sample shape
            fast is not None
            and type(feeds) is np.ndarray
            and feeds.dtype == fast.dtype
            and feeds.ndim == len(fast.dims) + 1
            and feeds.shape[1:] == fast.dims
            and fast.batch_ok(feeds.shape[0], self._batch_dynamic)
            and feeds.flags.c_contiguous
            and (raw or fast.affine is None)
        ):
            prepared, batch = {fast.spec.name: feeds}, feeds.shape[0]
        else:
            prepared, batch = self._prepare(feeds, raw)
        if self._batch_dynamic or batch == 1 or batch == self._fixed_batch:
            outputs = self.session.run(prepared)
        else:  # fixed batch of 1 (checked in _prepare): one invocation per sample
            whole = self.unbatched
            runs = [
                self.session.run({k: v if k in whole else v[i : i + 1] for k, v in prepared.items()})
                for i in range(batch)
            ]
            outputs = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
        if raw:
            return outputs
        return [
            a.dequantize(o) if a is not None else o for o, a in zip(outputs, self._out_affine, strict=True)
        ]

    def _prepare(self, feeds: Feeds, raw: bool) -> tuple[dict[str, np.ndarray], int]:
        if not isinstance(feeds, Mapping):
            if len(self._plans) != 1:
                names = ", ".join(sorted(self._names))
                raise InputError(
                    f"the model has {len(self._plans)} inputs ({names}); send them by name",
                    code="missing_input",
                )
            feeds = {self._plans[0].spec.name: feeds}
        elif feeds.keys() != self._names:
            unknown = sorted(set(feeds) - self._names)
            if unknown:
                raise InputError(
                    f"unknown input {unknown[0]!r}; the model takes {sorted(self._names)}",
                    code="unknown_input",
                    tensor=unknown[0],
                )
            missing = sorted(self._names - set(feeds))
            raise InputError(f"missing input {missing[0]!r}", code="missing_input", tensor=missing[0])
        prepared: dict[str, np.ndarray] = {}
        batch: int | None = None
        for plan in self._plans:
            array = _convert(plan, feeds[plan.spec.name], raw)
            prepared[plan.spec.name] = array
            if plan.unbatched:  # applies to the whole batch; does not decide its size
                continue
            n = int(array.shape[0])
            if batch is not None and n != batch:
                raise InputError(
                    f"inputs disagree on the batch size ({batch} vs {n} for {plan.spec.name!r})",
                    code="bad_shape",
                    tensor=plan.spec.name,
                )
            batch = n
            if n and not plan.batch_ok(n, self._batch_dynamic):
                raise InputError(
                    f"input {plan.spec.name!r} takes a batch of exactly {plan.fixed_batch}, not {n}",
                    code="bad_shape",
                    tensor=plan.spec.name,
                )
        if batch is None:  # every input is a scalar: one sample
            return prepared, 1
        if not batch:
            raise InputError("the batch is empty", code="bad_shape")
        return prepared, batch

    def close(self) -> None:
        self.session.close()

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: runtime, delegate, precision, fallbacks and io specs."""
        return {
            "path": self.path.name,
            "runtime": self.runtime,
            "delegate": self.delegate,
            "precision": self.precision,
            "fallbacks": [
                {"requested": f.requested, "used": f.used, "reason": f.reason} for f in self.fallbacks
            ],
            "inputs": [s.model_dump(mode="json") for s in self.inputs],
            "outputs": [s.model_dump(mode="json") for s in self.outputs],
        }


def _is_quantized(spec: TensorSpec) -> bool:
    return spec.quantization is not None and spec.dtype in ("int8", "uint8", "int16")


def fed_whole(shapes: Mapping[str, Sequence[int | None] | None]) -> frozenset[str]:
    """The inputs of ``shapes`` (name -> declared shape, None for a dynamic dimension) that have
    no batch dimension: a fixed first dimension other than 1 while another input's first
    dimension is dynamic or 1 (Silero's state (2, batch, 128) beside its audio (batch, 576)).

    Such an input is fed whole, as declared. A model whose every input has one fixed batch
    (e.g. 8) keeps it as its batch: nothing there says axis 0 is anything else.
    """
    firsts = {name: shape[0] for name, shape in shapes.items() if shape}
    if not any(d is None or d == 1 for d in firsts.values()):
        return frozenset()
    return frozenset(name for name, d in firsts.items() if d is not None and d != 1)


def _plan(spec: TensorSpec, whole: bool = False) -> _InputPlan:
    dims = tuple(spec.shape if whole else spec.shape[1:]) if spec.shape else ()
    fixed = spec.shape[0] if spec.shape and not whole else None
    affine = _Affine.of(spec.quantization) if _is_quantized(spec) and spec.quantization else None
    return _InputPlan(spec, np.dtype(spec.dtype), dims, fixed, affine, scalar=not spec.shape, whole=whole)


def _convert(plan: _InputPlan, value: Any, raw: bool) -> np.ndarray:
    """Check one input against its plan and return it in the model's dtype, C-contiguous."""
    name = plan.spec.name
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(
            f"input {name!r} is not a rectangular array ({exc})", code="bad_shape", tensor=name
        ) from exc
    if plan.scalar:
        if array.shape == (1,):  # a batch of one value
            array = array.reshape(())
        if array.ndim:
            raise InputError(
                f"input {name!r} is a scalar; send one value, not shape {list(array.shape)}",
                code="bad_shape",
                tensor=name,
            )
    elif array.ndim == len(plan.dims) and not plan.whole:  # one sample without its batch dimension
        array = array[np.newaxis]
    lead = 0 if plan.whole else 1  # the batch dimension, checked in _prepare
    if not plan.scalar and (
        array.ndim != len(plan.dims) + lead
        or any(
            want is not None and want != got for want, got in zip(plan.dims, array.shape[lead:], strict=True)
        )
    ):
        expected = [*(["N"] if lead else []), *("?" if d is None else d for d in plan.dims)]
        raise InputError(
            f"input {name!r} has shape {list(array.shape)}; the model takes {expected}",
            code="bad_shape",
            tensor=name,
        )
    quantize = plan.affine is not None and not raw
    caller = np.dtype(np.float32) if quantize else plan.dtype
    if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, caller, casting="same_kind"):
        raise InputError(
            f"input {name!r} has dtype {array.dtype}; the model takes {caller}"
            + (" (or raw integers with raw=true)" if quantize else ""),
            code="bad_dtype",
            tensor=name,
        )
    if quantize and plan.affine is not None:
        return np.ascontiguousarray(plan.affine.quantize(array.astype(np.float32, copy=False), plan.dtype))
    if caller.kind in "iu" and array.dtype != caller and array.size:
        info = np.iinfo(caller.type)  # kind "iu" checked above
        if array.min() < info.min or array.max() > info.max:
            raise InputError(
                f"input {name!r} has values outside {caller} [{info.min}, {info.max}]",
                code="bad_value",
                tensor=name,
            )
    return np.ascontiguousarray(array, dtype=caller)
