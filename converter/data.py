"""Evaluation and calibration data: ``.npz`` files or the built-in ``digits`` set.

An evaluation file is an ``.npz`` with the model's inputs and ``y`` (N,) integer class ids
(classification) or (N, ...) float targets (regression). Inputs are one array per input name
(``tokens``, ``mask``; ``input.<name>`` also works, e.g. for an input called ``y``), N rows
each, in the dtype the model declares (token ids as integers) and the form the model takes
after preprocessing; a one-input model's input may be called ``x`` whatever its name. A
calibration file holds the inputs alone (a ``y`` in it is ignored). A training file
(``finetune``, ``distill``: one-input models) holds ``x`` and ``y``; the digits data set
provides its train split.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from converter.errors import DataError
from converter.feeds import ONLY, Feeds, check_rows, single, take
from edgeagent.bundle.manifest import Preprocessing


class DataConfig(BaseModel):
    """Where evaluation and calibration data come from."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["digits"] | None = Field(
        default=None,
        description="Built-in data set: 'digits' (scikit-learn 8x8 digits; test split evaluates, "
        "calibration split calibrates). Exclusive with `eval`.",
    )
    eval: Path | None = Field(
        default=None,
        description="Evaluation .npz: one array per model input name ('x' for a one-input model) "
        "and 'y' (labels or targets).",
    )
    calib: Path | None = Field(
        default=None,
        description="Calibration .npz: one array per model input name ('x' for a one-input model), "
        "representative inputs, no labels needed. Needed for static int8 unless `dataset` provides it.",
    )
    train: Path | None = Field(
        default=None,
        description="Training .npz with arrays 'x' and 'y' for the finetune and distill passes "
        "(they hold out part of it for validation). `dataset` provides its train split.",
    )
    calibration_samples: int = Field(
        default=200, ge=1, description="At most this many calibration samples are used (the first ones)."
    )
    eval_samples: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate on at most this many samples (the first ones); all when unset.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.dataset is not None and self.eval is not None:
            raise ValueError("give either dataset or eval, not both")
        return self


@dataclass(frozen=True)
class Dataset:
    """Loaded data: evaluation inputs/targets, optional calibration inputs, and what they are.

    ``inputs`` and ``calib`` are named (:mod:`converter.feeds`); ``x`` is the only input of a
    one-input model's data, for the passes that train or convert one-input models.
    """

    inputs: Feeds
    y: npt.NDArray[Any]
    calib: Feeds | None
    source: str
    labels: list[str] | None = None
    #: Training inputs and labels (finetune, distill); None when no training data was given.
    train_x: npt.NDArray[np.float32] | None = None
    train_y: npt.NDArray[Any] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    @property
    def x(self) -> npt.NDArray[np.float32]:
        """The evaluation inputs of a one-input model as float32; DataError when there are several."""
        return np.asarray(single(self.inputs, "this step"), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.y)


def load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, npt.NDArray[Any]]:
    """Read the named arrays of an ``.npz`` file, naming precisely what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(
                    f"{path}: needs arrays {list(keys)}, found {sorted(data.files)}", path=str(path)
                )
            return {k: np.asarray(data[k]) for k in keys}
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such data file", path=str(path)) from exc
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})", path=str(path)) from exc


def load_inputs(path: Path) -> tuple[Feeds, npt.NDArray[Any] | None]:
    """(inputs by name, 'y' or None) of a data ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such data file", path=str(path)) from exc
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})", path=str(path)) from exc
    y = arrays.pop("y", None)
    inputs = {k.removeprefix("input."): v for k, v in arrays.items()}
    if not inputs:
        raise DataError(
            f"{path}: needs the model's inputs (one array per input name, or 'x'), found {sorted(arrays)}",
            path=str(path),
        )
    check_rows(inputs, str(path))
    return inputs, y


def _load_eval(path: Path) -> tuple[Feeds, npt.NDArray[Any]]:
    inputs, y = load_inputs(path)
    if y is None:
        raise DataError(
            f"{path}: needs 'y' (labels or targets) beside the inputs {sorted(inputs)}", path=str(path)
        )
    n = len(next(iter(inputs.values())))
    if len(y) != n:
        raise DataError(f"{path}: the inputs have {n} rows and 'y' {len(y)}", path=str(path))
    return inputs, y


def load_data(config: DataConfig) -> Dataset | None:
    """Load what ``config`` names; None when it names no evaluation data."""
    calib = None
    if config.calib is not None:
        calib, _ = load_inputs(config.calib)
    if config.dataset == "digits":
        dataset = _digits(calib)
    elif config.eval is not None:
        inputs, y = _load_eval(config.eval)
        dataset = Dataset(inputs=inputs, y=y, calib=calib, source=str(config.eval))
    else:
        return None
    if config.train is not None:
        arrays = load_npz(config.train, ("x", "y"))
        tx, ty = arrays["x"].astype(np.float32), arrays["y"]
        if len(tx) == 0 or len(tx) != len(ty):
            raise DataError(
                f"{config.train}: 'x' has {len(tx)} rows and 'y' {len(ty)}", path=str(config.train)
            )
        dataset = _replace(dataset, train_x=tx, train_y=ty)
    if dataset.calib is not None:
        dataset = _replace(dataset, calib=take(dataset.calib, slice(0, config.calibration_samples)))
    if config.eval_samples is not None:
        keep = slice(0, config.eval_samples)
        dataset = _replace(dataset, inputs=take(dataset.inputs, keep), y=dataset.y[keep])
    return dataset


def _replace(dataset: Dataset, **changes: Any) -> Dataset:
    from dataclasses import replace

    return replace(dataset, **changes)


def _digits(calib: Feeds | None) -> Dataset:
    from converter.datasets import load_digits_splits

    try:
        splits = load_digits_splits(seed=0)
    except ImportError as exc:
        raise DataError(str(exc)) from exc
    return Dataset(
        inputs={ONLY: splits.x_test},
        y=splits.y_test,
        calib={ONLY: splits.x_calib} if calib is None else calib,
        source="digits (scikit-learn, test split, seed 0)",
        labels=[str(i) for i in range(10)],
        train_x=splits.x_train,
        train_y=splits.y_train,
        preprocessing=Preprocessing(
            scale=1.0 / 16.0,
            layout="NHWC",
            notes="8x8 grayscale digit, raw intensities 0-16 scaled to [0, 1]; MLPs take it flattened to 64",
        ),
    )
