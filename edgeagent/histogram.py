"""A log-bucketed, mergeable latency histogram with bounded memory and known relative error.

Bucket ``i`` holds values in ``(gamma**(i-1), gamma**i]`` (in the histogram's unit, e.g.
seconds) with ``gamma = (1 + alpha) / (1 - alpha)``. A quantile is answered with the
bucket's midpoint ``2 * gamma**i / (gamma + 1)``, which is within a relative error of
``alpha`` of every value in that bucket (the scheme of DDSketch, Masson et al., VLDB 2019).
So with the default ``alpha = 0.01`` a reported p99 of 2.00 ms means the true p99 lies
in [1.98, 2.02] ms.

Memory is bounded by the range: values below ``lowest`` count in the lowest bucket and
values above ``highest`` in the highest (``min``/``max`` stay exact), so the default
range 1 µs .. 1000 s at 1 % needs 1037 buckets, a few KiB, however many values are
recorded. Counts are kept in a dict of the buckets actually used, which is what a
latency distribution touches (tens of buckets), and what :meth:`to_dict` serializes.

Two histograms with the same ``alpha``/range merge exactly (bucket counts add), so a
per-request histogram can be merged into a per-interval one and intervals into a day.
Not thread-safe: callers that record from several threads hold a lock (recording is a
``log`` and a dict update, well under a microsecond).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

DEFAULT_ALPHA = 0.01
DEFAULT_LOWEST = 1e-6  # 1 µs, in seconds
DEFAULT_HIGHEST = 1e3  # 1000 s


class Histogram:
    """Counts of positive values in log-spaced buckets; quantiles within ``alpha`` relative error."""

    __slots__ = (
        "_counts",
        "_inv_log_gamma",
        "_max_index",
        "_min_index",
        "alpha",
        "count",
        "gamma",
        "highest",
        "lowest",
        "max",
        "min",
        "sum",
    )

    def __init__(
        self, alpha: float = DEFAULT_ALPHA, lowest: float = DEFAULT_LOWEST, highest: float = DEFAULT_HIGHEST
    ) -> None:
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), not {alpha}")
        if not 0.0 < lowest < highest:
            raise ValueError(f"need 0 < lowest < highest, not {lowest}, {highest}")
        self.alpha = alpha
        self.lowest = lowest
        self.highest = highest
        self.gamma = (1.0 + alpha) / (1.0 - alpha)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self._min_index = self._raw_index(lowest)
        self._max_index = self._raw_index(highest)
        self._counts: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def bucket_limit(self) -> int:
        """The most buckets this histogram can ever hold (its memory bound)."""
        return self._max_index - self._min_index + 1

    def _raw_index(self, value: float) -> int:
        return math.ceil(math.log(value) * self._inv_log_gamma)

    def record(self, value: float, count: int = 1) -> None:
        """Add ``count`` observations of ``value`` (same unit as ``lowest``/``highest``)."""
        if value != value or count < 1:  # NaN, or nothing to add
            return
        if value <= self.lowest:
            index = self._min_index
        elif value >= self.highest:
            index = self._max_index
        else:
            index = self._raw_index(value)
        self._counts[index] = self._counts.get(index, 0) + count
        self.count += count
        self.sum += value * count
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def _value_of(self, index: int) -> float:
        return 2.0 * self.gamma**index / (self.gamma + 1.0)

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` (0-1), within ``alpha`` relative error; NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], not {q}")
        if self.count == 0:
            return math.nan
        if q == 0.0:
            return self.min
        if q == 1.0:
            return self.max
        rank = q * (self.count - 1)  # the same rank numpy's default 'linear' method starts from
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen > rank:
                # Clamp into the exact extremes so p50 of one value is that value.
                return min(max(self._value_of(index), self.min), self.max)
        return self.max

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """Several quantiles in one call (each as :meth:`quantile`)."""
        return [self.quantile(q) for q in qs]

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def _check_compatible(self, other: Histogram) -> None:
        if (self.alpha, self.lowest, self.highest) != (other.alpha, other.lowest, other.highest):
            raise ValueError(
                "cannot merge histograms with different parameters: "
                f"{(self.alpha, self.lowest, self.highest)} vs {(other.alpha, other.lowest, other.highest)}"
            )

    def merge(self, other: Histogram) -> None:
        """Add every observation of ``other`` (same alpha and range) into this histogram."""
        self._check_compatible(other)
        for index, n in other._counts.items():
            self._counts[index] = self._counts.get(index, 0) + n
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def copy(self) -> Histogram:
        clone = Histogram(self.alpha, self.lowest, self.highest)
        clone.merge(self)
        return clone

    def clear(self) -> None:
        self._counts.clear()
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: parameters, totals and the used buckets as ``{index: count}``."""
        return {
            "alpha": self.alpha,
            "lowest": self.lowest,
            "highest": self.highest,
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "buckets": {str(i): n for i, n in sorted(self._counts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Rebuild a histogram written by :meth:`to_dict`."""
        hist = cls(float(data["alpha"]), float(data["lowest"]), float(data["highest"]))
        for key, n in dict(data["buckets"]).items():
            index = int(key)
            if not hist._min_index <= index <= hist._max_index or int(n) < 0:
                raise ValueError(f"bucket {key}={n} is outside this histogram's range")
            if int(n):
                hist._counts[index] = int(n)
        hist.count = int(data["count"])
        if hist.count != sum(hist._counts.values()):
            raise ValueError("count does not equal the sum of the bucket counts")
        hist.sum = float(data["sum"])
        if hist.count:
            hist.min = float(data["min"])
            hist.max = float(data["max"])
        return hist

    def __repr__(self) -> str:
        if not self.count:
            return f"Histogram(alpha={self.alpha}, empty)"
        p50, p99 = self.quantiles((0.5, 0.99))
        return (
            f"Histogram(alpha={self.alpha}, count={self.count}, "
            f"p50={p50:.6g}, p99={p99:.6g}, max={self.max:.6g})"
        )
