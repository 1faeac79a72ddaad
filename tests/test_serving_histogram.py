"""The latency histogram: quantiles within the documented relative error, exact merges,
bounded memory, round trip through its JSON form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.histogram import Histogram

latencies = st.lists(st.floats(min_value=1e-6, max_value=100.0, allow_nan=False), min_size=1, max_size=300)
quantile = st.floats(min_value=0.0, max_value=1.0)


@settings(max_examples=200, deadline=None)
@given(values=latencies, q=quantile)
def test_quantile_is_within_alpha_of_the_exact_rank(values: list[float], q: float) -> None:
    hist = Histogram(alpha=0.01)
    for v in values:
        hist.record(v)
    ordered = sorted(values)
    exact = ordered[math.floor(q * (len(values) - 1))]
    got = hist.quantile(q)
    assert abs(got - exact) <= 0.01 * exact * (1 + 1e-9)
    assert hist.count == len(values)
    assert hist.min == ordered[0] and hist.max == ordered[-1]


@settings(max_examples=100, deadline=None)
@given(a=latencies, b=latencies)
def test_merge_equals_recording_everything_in_one(a: list[float], b: list[float]) -> None:
    left, right, both = Histogram(), Histogram(), Histogram()
    for v in a:
        left.record(v)
        both.record(v)
    for v in b:
        right.record(v)
        both.record(v)
    left.merge(right)
    assert left.to_dict()["buckets"] == both.to_dict()["buckets"]
    assert left.count == both.count and left.min == both.min and left.max == both.max
    assert math.isclose(left.sum, both.sum)


def test_memory_is_bounded_whatever_is_recorded() -> None:
    hist = Histogram()
    assert hist.bucket_limit == 1037  # 1 µs .. 1000 s at 1 %
    rng = np.random.default_rng(0)
    for v in np.exp(rng.uniform(math.log(1e-9), math.log(1e6), 50_000)):
        hist.record(float(v))
    assert len(hist.to_dict()["buckets"]) <= hist.bucket_limit
    assert hist.min < 1e-6 and hist.max > 1e3  # the extremes stay exact
    assert hist.quantile(1.0) == hist.max


def test_json_round_trip_and_bad_input() -> None:
    hist = Histogram()
    for v in (0.001, 0.002, 0.0021, 0.5):
        hist.record(v)
    back = Histogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert back.to_dict() == hist.to_dict()
    assert back.quantiles((0.5, 0.99)) == hist.quantiles((0.5, 0.99))
    with pytest.raises(ValueError, match="different parameters"):
        hist.merge(Histogram(alpha=0.02))
    broken = hist.to_dict() | {"count": 99}
    with pytest.raises(ValueError, match="count"):
        Histogram.from_dict(broken)
    assert math.isnan(Histogram().quantile(0.5))
    with pytest.raises(ValueError):
        hist.quantile(1.5)
    hist.clear()
    assert hist.count == 0 and hist.to_dict()["buckets"] == {}
