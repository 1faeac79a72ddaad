"""Small, offline data sets for examples, fixtures and tests.

The only data set so far is scikit-learn's bundled 8x8 handwritten digits (1797 images, classes 0-9),
which ships inside the scikit-learn wheel, so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["DigitsSplits", "flat", "load_digits_splits"]

_HOST_HINT = "scikit-learn is needed for the digits data set: pip install 'edgeagent[host]'"

#: Side of a digits image in pixels.
DIGITS_SIDE = 8
#: Number of digit classes.
DIGITS_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplits:
    """Deterministic stratified train/calibration/test splits of the sklearn digits data set.

    Every ``x_*`` array is float32, shape ``(N, 8, 8, 1)`` (NHWC, one channel), pixel intensity
    scaled from the raw 0..16 range to [0, 1]. Every ``y_*`` array is int64, shape ``(N,)``,
    holding the class 0-9. About 70% of samples are in train, 10% in calibration (for int8
    quantization) and 20% in test.
    """

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_calib: npt.NDArray[np.float32]
    y_calib: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def load_digits_splits(seed: int = 0) -> DigitsSplits:
    """Load the digits data set and split it, stratified by class, with a fixed ``seed``.

    Returns float32 images of shape ``(N, 8, 8, 1)`` in [0, 1] and int64 labels of shape ``(N,)``.
    The same ``seed`` always gives the same splits (1257 train / 180 calibration / 360 test).

    Raises ImportError, with the ``pip install`` line to run, if scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(_HOST_HINT) from exc

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0)).reshape(
        -1, DIGITS_SIDE, DIGITS_SIDE, 1
    )
    y = np.asarray(digits.target, dtype=np.int64)

    # 20% test first, then 1/8 of the remaining 80% (= 10% of all) for calibration.
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=0.125, random_state=seed, stratify=y_rest
    )

    def _x(a: object) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(a, dtype=np.float32)

    def _y(a: object) -> npt.NDArray[np.int64]:
        return np.ascontiguousarray(a, dtype=np.int64)

    return DigitsSplits(
        x_train=_x(x_train),
        y_train=_y(y_train),
        x_calib=_x(x_calib),
        y_calib=_y(y_calib),
        x_test=_x(x_test),
        y_test=_y(y_test),
    )


def flat(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Flatten digits images ``(N, 8, 8, 1)`` to MLP input rows ``(N, 64)`` (row-major pixel order)."""
    return x.reshape(len(x), DIGITS_SIDE * DIGITS_SIDE)
