"""The golden set: the samples a device runs before it commits to a bundle.

An ``.npz`` with ``inputs`` (N, ...), optionally ``labels`` (N,) integer classes and
``reference`` (N, ...) outputs of the original float model. :func:`save_golden` writes it
byte-for-byte reproducibly (``numpy.savez`` stamps the current time into the zip), so a
bundle built from the same data has the same sha256.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeagent.errors import UsageError
from edgeagent.storage import atomic_writer

GOLDEN_KEYS = ("inputs", "labels", "reference")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry


@dataclass(frozen=True)
class GoldenSet:
    inputs: np.ndarray
    labels: np.ndarray | None = None
    reference: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def save_golden(path: Path, golden: GoldenSet) -> None:
    """Write ``golden`` to ``path`` atomically and deterministically (uncompressed npz)."""
    arrays = {k: getattr(golden, k) for k in GOLDEN_KEYS if getattr(golden, k) is not None}
    _check(arrays, str(path))
    with atomic_writer(path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, array in arrays.items():
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
    _check(arrays, str(path))
    return GoldenSet(arrays["inputs"], arrays.get("labels"), arrays.get("reference"))


def _check(arrays: dict[str, np.ndarray], where: str) -> None:
    if "inputs" not in arrays:
        raise UsageError(f"{where}: the golden set has no 'inputs' (found {sorted(arrays)})")
    unknown = set(arrays) - set(GOLDEN_KEYS)
    if unknown:
        raise UsageError(
            f"{where}: a golden set holds 'inputs' and optionally 'labels', 'reference'; "
            f"found {sorted(arrays)}"
        )
    inputs = arrays["inputs"]
    n = int(inputs.shape[0]) if inputs.ndim else 0
    if n == 0:
        raise UsageError(f"{where}: the golden set has no 'inputs' (the array is empty)")
    for key in ("labels", "reference"):
        if key in arrays and len(arrays[key]) != n:
            raise UsageError(f"{where}: '{key}' has {len(arrays[key])} rows but 'inputs' has {n}")
    if "labels" in arrays and not np.issubdtype(arrays["labels"].dtype, np.integer):
        raise UsageError(f"{where}: 'labels' must be integer class ids, not {arrays['labels'].dtype}")
