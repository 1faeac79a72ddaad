"""The golden set: the samples a device runs before it commits to a bundle.

An ``.npz`` with one array per model input and per reference output, N rows each::

    input.<name>    (N, ...)  the model's input <name>, in the dtype the model declares
                              (a scalar input: (N,), one value per sample)
    output.<name>   (N, ...)  the original float model's output <name> (optional)
    labels          (N,)      integer classes (optional)
    sequence        (N,)      integer sequence id of each row (optional; stateful models)

For a stateful model (manifest ``models[].state``) the rows are the steps of golden
*sequences*, in order: rows with the same ``sequence`` id in a run form one sequence, and
acceptance starts each sequence from the initial state and carries the state from step to
step. Without ``sequence`` all N rows are one sequence. A state input has no ``input.<name>``
array (acceptance feeds it); a state output may have an ``output.<name>`` reference.

Files written before inputs were named hold ``inputs`` (the only input) and ``reference``
(the first output); they read as an input and an output named ``""``, which
:func:`match_inputs` and :func:`match_outputs` map to the only input and the first output.
:func:`save_golden` writes byte-for-byte reproducibly (``numpy.savez`` stamps the current
time into the zip), so a bundle built from the same data has the same sha256.
"""

from __future__ import annotations

import io
import itertools
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeagent.errors import UsageError
from edgeagent.storage import atomic_writer

INPUT_PREFIX = "input."
OUTPUT_PREFIX = "output."
LABELS = "labels"
SEQUENCE = "sequence"
UNNAMED = ""  # legacy 'inputs' / 'reference': the model's only input / its first output
_LEGACY = {"inputs": INPUT_PREFIX, "reference": OUTPUT_PREFIX}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry
_LAYOUT = (
    "'input.<name>' per input (or 'inputs' for a one-input model), "
    "optional 'output.<name>' per output, 'labels' and 'sequence'"
)


@dataclass(frozen=True)
class GoldenSet:
    """Golden arrays by name; every array has the same number of rows (samples)."""

    inputs: Mapping[str, np.ndarray]  # input name -> (N, ...); "" = the only input
    labels: np.ndarray | None = None
    reference: Mapping[str, np.ndarray] = field(default_factory=dict)  # output name -> (N, ...)
    sequence: np.ndarray | None = None  # (N,) sequence id per row: stateful models' step runs

    def sequences(self) -> list[range]:
        """The row ranges of the golden sequences (consecutive rows with one id; all rows without ids)."""
        if self.sequence is None:
            return [range(len(self))]
        ids = self.sequence.reshape(-1)
        starts = [0, *(int(i) for i in np.flatnonzero(ids[1:] != ids[:-1]) + 1), len(ids)]
        return [range(a, b) for a, b in itertools.pairwise(starts)]

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def only_input(self) -> np.ndarray:
        """The input array of a one-input golden set (UsageError when it has several)."""
        if len(self.inputs) != 1:
            raise UsageError(
                f"the golden set has {len(self.inputs)} inputs ({', '.join(self.inputs)}), not one"
            )
        return next(iter(self.inputs.values()))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], where: str = "the golden set") -> GoldenSet:
        """A validated set from ``.npz`` arrays keyed as in the file (legacy keys included)."""
        inputs: dict[str, np.ndarray] = {}
        reference: dict[str, np.ndarray] = {}
        for key, array in arrays.items():
            if key in _LEGACY:
                kind, name = _LEGACY[key], UNNAMED
            elif key.startswith((INPUT_PREFIX, OUTPUT_PREFIX)) and key.partition(".")[2]:
                prefix, _, name = key.partition(".")
                kind = prefix + "."
            elif key in (LABELS, SEQUENCE):
                continue
            else:
                raise UsageError(f"{where}: unknown array {key!r}; a golden set holds {_LAYOUT}")
            target = inputs if kind == INPUT_PREFIX else reference
            if name in target:
                raise UsageError(f"{where}: {key!r} names the same tensor as another array")
            target[name] = np.asarray(array)
        golden = cls(inputs, arrays.get(LABELS), reference, arrays.get(SEQUENCE))
        golden.check(where)
        return golden

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``.npz`` layout, in file order: inputs, labels, outputs (unnamed ones as legacy keys)."""
        out = {(f"{INPUT_PREFIX}{k}" if k else "inputs"): v for k, v in self.inputs.items()}
        if self.labels is not None:
            out[LABELS] = self.labels
        if self.sequence is not None:
            out[SEQUENCE] = self.sequence
        out.update({(f"{OUTPUT_PREFIX}{k}" if k else "reference"): v for k, v in self.reference.items()})
        return out

    def check(self, where: str) -> None:
        """UsageError naming the first thing wrong: no inputs, a scalar, rows that differ, bad dtypes."""
        if not self.inputs:
            raise UsageError(f"{where}: the golden set has no inputs ({_LAYOUT})")
        if UNNAMED in self.inputs and len(self.inputs) > 1:
            raise UsageError(f"{where}: 'inputs' is for one-input models; name each input 'input.<name>'")
        arrays = self.arrays()
        for key, array in arrays.items():
            if array.ndim == 0:
                raise UsageError(f"{where}: {key!r} is a single value; give one row per sample, (N, ...)")
            if array.dtype.kind not in "biuf":
                raise UsageError(f"{where}: {key!r} holds {array.dtype}, not numbers")
        first_key, n = next(iter(arrays)), len(next(iter(arrays.values())))
        if not n:
            raise UsageError(f"{where}: {first_key!r} is empty (a golden set needs at least one sample)")
        for key, array in arrays.items():
            if len(array) != n:
                raise UsageError(f"{where}: {key!r} has {len(array)} rows but {first_key!r} has {n}")
        if self.labels is not None and not np.issubdtype(self.labels.dtype, np.integer):
            raise UsageError(f"{where}: 'labels' must be integer class ids, not {self.labels.dtype}")
        if self.sequence is not None and (
            self.sequence.ndim != 1 or not np.issubdtype(self.sequence.dtype, np.integer)
        ):
            raise UsageError(f"{where}: 'sequence' must be one integer id per row, shape (N,)")


def save_golden(path: Path, golden: GoldenSet) -> None:
    """Write ``golden`` to ``path`` atomically and deterministically (uncompressed npz)."""
    golden.check(str(path))
    with atomic_writer(path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, array in golden.arrays().items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_golden(path: Path) -> GoldenSet:
    """Read and validate a golden ``.npz`` (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: no such golden file") from exc
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: not a readable golden .npz ({exc})") from exc
    return GoldenSet.from_arrays(arrays, str(path))


def match_inputs(golden: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Golden inputs keyed by the model's input ``names``: by name, or the only one for the only one.

    A one-input model takes a one-input golden set whatever its name (a converted artifact
    may rename its input, e.g. TFLite's ``serving_default_x:0``). UsageError otherwise.
    """
    if set(golden) == set(names):
        return {name: golden[name] for name in names}
    if len(golden) == 1 and len(names) == 1:
        return {names[0]: next(iter(golden.values()))}
    have = sorted(k or "(unnamed)" for k in golden)
    raise UsageError(f"the golden set has inputs {have} but the model takes {list(names)}")


def match_outputs(reference: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Reference outputs keyed by the model's output ``names`` they are compared with.

    By name when every reference names an output of the model; by position when none does
    (a legacy unnamed ``reference``, or an artifact that renamed its outputs). UsageError
    when some match and some do not, or there are more references than outputs.
    """
    known = [k for k in reference if k in names]
    if len(known) == len(reference):
        return {k: reference[k] for k in names if k in reference}
    if not known and len(reference) <= len(names):
        return dict(zip(names, reference.values(), strict=False))
    extra = sorted(k or "(unnamed)" for k in reference if k not in names)
    raise UsageError(
        f"the golden set has references for {extra}, which the model's outputs {list(names)} lack"
    )
