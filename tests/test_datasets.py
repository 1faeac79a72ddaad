"""converter.datasets: deterministic, stratified digits splits in the documented shapes and units."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from converter.datasets import DigitsSplits, flat, load_digits_splits


@pytest.fixture(scope="module")
def splits() -> DigitsSplits:
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install 'edgeagent[host]'")
    return load_digits_splits(seed=0)


def test_shapes_dtypes_and_units(splits: DigitsSplits) -> None:
    sizes = {}
    for part in ("train", "calib", "test"):
        x = getattr(splits, f"x_{part}")
        y = getattr(splits, f"y_{part}")
        assert x.dtype == np.float32
        assert x.shape[1:] == (8, 8, 1)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.dtype == np.int64
        assert y.shape == (len(x),)
        assert set(np.unique(y)) == set(range(10))
        sizes[part] = len(x)
    total = sum(sizes.values())
    assert total == 1797
    assert sizes == {"train": 1257, "calib": 180, "test": 360}
    assert abs(sizes["train"] / total - 0.7) < 0.01
    assert abs(sizes["calib"] / total - 0.1) < 0.01
    assert abs(sizes["test"] / total - 0.2) < 0.01


def test_pixels_are_raw_over_16(splits: DigitsSplits) -> None:
    raw = splits.x_train * 16
    np.testing.assert_array_equal(raw, np.round(raw))


def test_stratified(splits: DigitsSplits) -> None:
    for y in (splits.y_train, splits.y_calib, splits.y_test):
        share = np.bincount(y, minlength=10) / len(y)
        assert np.all(np.abs(share - 0.1) < 0.02)


def test_splits_are_disjoint(splits: DigitsSplits) -> None:
    def rows(x: np.ndarray) -> set[bytes]:
        return {r.tobytes() for r in flat(x)}

    # Digits has a few duplicate images, so compare with a small tolerance on the overlap count.
    assert len(rows(splits.x_train) & rows(splits.x_test)) <= 5
    assert len(rows(splits.x_calib) & rows(splits.x_test)) <= 5


def test_deterministic_and_seeded(splits: DigitsSplits) -> None:
    again = load_digits_splits(seed=0)
    for name in ("x_train", "y_train", "x_calib", "y_calib", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(splits, name), getattr(again, name))
    other = load_digits_splits(seed=1)
    assert not np.array_equal(splits.y_test, other.y_test)


def test_frozen(splits: DigitsSplits) -> None:
    with pytest.raises(AttributeError):
        splits.x_train = splits.x_test  # type: ignore[misc]


def test_flat(splits: DigitsSplits) -> None:
    f = flat(splits.x_test)
    assert f.shape == (len(splits.x_test), 64)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f[3].reshape(8, 8), splits.x_test[3, :, :, 0])


def test_missing_sklearn_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setitem(sys.modules, "sklearn.model_selection", None)
    with pytest.raises(ImportError, match=r"pip install 'edgeagent\[host\]'"):
        load_digits_splits()
