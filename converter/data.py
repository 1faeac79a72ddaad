"""Evaluation and calibration data: ``.npz`` files or the built-in ``digits`` set.

An evaluation file is an ``.npz`` with ``x`` (N, ...) float inputs and ``y`` (N,) integer
class ids (classification) or (N, ...) float targets (regression). A calibration file needs
only ``x``. A training file (``finetune``, ``distill``) is shaped like an evaluation file;
the digits data set provides its train split. Inputs are float32 in the form the model takes
after preprocessing.
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
        default=None, description="Evaluation .npz with arrays 'x' (inputs) and 'y' (labels or targets)."
    )
    calib: Path | None = Field(
        default=None,
        description="Calibration .npz with array 'x' (representative inputs, no labels needed). "
        "Needed for static int8 unless `dataset` provides it.",
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
    """Loaded data: evaluation inputs/targets, optional calibration inputs, and what they are."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[Any]
    calib: npt.NDArray[np.float32] | None
    source: str
    labels: list[str] | None = None
    #: Training inputs and labels (finetune, distill); None when no training data was given.
    train_x: npt.NDArray[np.float32] | None = None
    train_y: npt.NDArray[Any] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


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


def load_data(config: DataConfig) -> Dataset | None:
    """Load what ``config`` names; None when it names no evaluation data."""
    calib = None
    if config.calib is not None:
        calib = load_npz(config.calib, ("x",))["x"].astype(np.float32)
    if config.dataset == "digits":
        dataset = _digits(calib)
    elif config.eval is not None:
        arrays = load_npz(config.eval, ("x", "y"))
        x, y = arrays["x"].astype(np.float32), arrays["y"]
        if len(x) == 0 or len(x) != len(y):
            raise DataError(f"{config.eval}: 'x' has {len(x)} rows and 'y' {len(y)}", path=str(config.eval))
        dataset = Dataset(x=x, y=y, calib=calib, source=str(config.eval))
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
        dataset = _replace(dataset, calib=dataset.calib[: config.calibration_samples])
    if config.eval_samples is not None:
        dataset = _replace(dataset, x=dataset.x[: config.eval_samples], y=dataset.y[: config.eval_samples])
    return dataset


def _replace(dataset: Dataset, **changes: Any) -> Dataset:
    from dataclasses import replace

    return replace(dataset, **changes)


def _digits(calib: npt.NDArray[np.float32] | None) -> Dataset:
    from converter.datasets import load_digits_splits

    try:
        splits = load_digits_splits(seed=0)
    except ImportError as exc:
        raise DataError(str(exc)) from exc
    return Dataset(
        x=splits.x_test,
        y=splits.y_test,
        calib=splits.x_calib if calib is None else calib,
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
