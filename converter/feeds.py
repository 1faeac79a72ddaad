"""Named model inputs on the host: data arrays matched to a model's inputs by name and dtype.

Evaluation, calibration and golden data are :data:`Feeds`, one array per model input name
with one row per sample (a scalar input: one value per sample, shape (N,)). Data for a
one-input model may use any name (``x`` in the files); :func:`fit_feeds` gives it to the
only input. An input fed whole (:func:`edgeagent.runtimes.model.fed_whole`: no batch
dimension, such as Silero's state (2, batch, 128)) holds one whole value per row, shape
(N, *declared), never reshaped. Arrays keep their dtype up to the model: integer token ids
stay integers, and a float array is never cast to an integer input (that would silently
truncate ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from converter.errors import DataError

Feeds = dict[str, npt.NDArray[Any]]
#: The key of the only input in data files written for one-input models.
ONLY = "x"


@dataclass(frozen=True)
class InputSpec:
    """One model input as a runner takes it."""

    name: str
    dtype: np.dtype[Any]  # what the runner takes: float32 for a quantized TFLite input it quantizes
    shape: tuple[int | None, ...]  # per sample, without the batch dimension; None = dynamic
    scalar: bool = False  # rank 0: no batch dimension, one value per invocation
    whole: bool = False  # no batch dimension: ``shape`` is the declared one, one value per invocation

    @property
    def unbatched(self) -> bool:
        """No batch dimension: each invocation takes one row as it is (never several rows at once)."""
        return self.scalar or self.whole


def rows(feeds: Mapping[str, npt.NDArray[Any]]) -> int:
    """Number of samples (every array has as many rows)."""
    return len(next(iter(feeds.values())))


def take(feeds: Mapping[str, npt.NDArray[Any]], index: Any) -> Feeds:
    """The rows ``index`` (a slice or an index array) of every array."""
    return {name: array[index] for name, array in feeds.items()}


def single(feeds: Mapping[str, npt.NDArray[Any]], what: str) -> npt.NDArray[Any]:
    """The only array of ``feeds``; DataError naming ``what`` needs one input when there are several."""
    if len(feeds) != 1:
        raise DataError(
            f"{what} handles models with one input; the data has {len(feeds)} ({', '.join(feeds)})"
        )
    return next(iter(feeds.values()))


def check_rows(feeds: Mapping[str, npt.NDArray[Any]], where: str) -> None:
    """DataError unless every array has the same, non-zero number of rows."""
    counts = {name: (len(a) if np.ndim(a) else 0) for name, a in feeds.items()}
    if not counts or not min(counts.values()) or len(set(counts.values())) != 1:
        raise DataError(
            f"{where}: inputs need the same number of rows, at least one; got {counts}", path=where
        )


def fit_shape(x: npt.NDArray[Any], sample_shape: tuple[int | None, ...], name: str = "") -> npt.NDArray[Any]:
    """Reshape data rows to the model's per-sample shape when only the layout differs.

    Digits images (N, 8, 8, 1) feed an MLP that takes (N, 64): same elements per sample, so
    the rows are reshaped (row-major). Anything else that does not fit is a :class:`DataError`.
    """
    if x.shape[1:] == sample_shape or (None in sample_shape and len(sample_shape) == x.ndim - 1):
        return x
    want = int(np.prod([d for d in sample_shape if d is not None]))
    have = int(np.prod(x.shape[1:]))
    if None not in sample_shape and want == have:
        return x.reshape((len(x), *[int(d) for d in sample_shape if d is not None]))
    which = f"input {name!r}: " if name else ""
    raise DataError(
        f"{which}data samples have shape {list(x.shape[1:])} "
        f"but the model takes {list(sample_shape)} per sample"
    )


def fit_feeds(specs: Sequence[InputSpec], feeds: Mapping[str, npt.NDArray[Any]]) -> Feeds:
    """``feeds`` keyed, shaped and typed as the model's inputs ``specs``; DataError when they do not fit."""
    names = [s.name for s in specs]
    if set(feeds) == set(names):
        named = dict(feeds)
    elif len(feeds) == 1 and len(specs) == 1:
        named = {names[0]: next(iter(feeds.values()))}
    else:
        raise DataError(f"the data has inputs {sorted(feeds)} but the model takes {names}")
    out: Feeds = {}
    for spec in specs:
        array = np.asarray(named[spec.name])
        if spec.scalar:
            if array.ndim != 1:
                raise DataError(
                    f"input {spec.name!r} is a scalar: the data needs one value per sample, shape (N,), "
                    f"not {list(array.shape)}"
                )
        elif spec.whole:
            _check_whole(array, spec)
        else:
            array = fit_shape(array, spec.shape, spec.name)
        if array.dtype != spec.dtype:
            if array.dtype.kind not in "biuf" or not np.can_cast(
                array.dtype, spec.dtype, casting="same_kind"
            ):
                raise DataError(
                    f"input {spec.name!r}: the data holds {array.dtype} but the model takes {spec.dtype}; "
                    f"store it as {spec.dtype}"
                )
            array = array.astype(spec.dtype)
        out[spec.name] = np.ascontiguousarray(array)
    return out


def _check_whole(array: npt.NDArray[Any], spec: InputSpec) -> None:
    """DataError unless every row of ``array`` is exactly the declared shape of whole input ``spec``."""
    got = array.shape[1:]
    if len(got) != len(spec.shape) or any(
        w is not None and w != g for w, g in zip(spec.shape, got, strict=False)
    ):
        want = ", ".join("?" if d is None else str(d) for d in spec.shape)
        raise DataError(
            f"input {spec.name!r} has no batch dimension: the data needs one value of shape ({want}) "
            f"per sample, shape (N, {want}), not {list(array.shape)}"
        )


def sample(specs: Sequence[InputSpec], feeds: Mapping[str, npt.NDArray[Any]], i: int) -> Feeds:
    """Sample ``i`` of fitted ``feeds`` as one invocation takes it (batch of one; unbatched: its row)."""
    # np.asarray: a scalar's row is a numpy scalar, which ONNX Runtime refuses (it takes arrays).
    return {
        s.name: (np.asarray(feeds[s.name][i]) if s.unbatched else feeds[s.name][i : i + 1]) for s in specs
    }


def stack_rows(parts: Sequence[Sequence[npt.NDArray[Any]]]) -> list[npt.NDArray[Any]]:
    """Per-invocation outputs joined per output into (N, ...) arrays (a scalar output: (N,))."""
    return [np.stack(p) if p[0].ndim == 0 else np.concatenate(p) for p in zip(*parts, strict=True)]
