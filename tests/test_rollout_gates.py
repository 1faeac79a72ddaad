"""Rollout gates and wave planning: pure logic, plain values."""

from __future__ import annotations

import numpy as np
import pytest

from edgeagent.errors import UsageError
from edgeagent.histogram import Histogram
from fleet.rollout.gates import Evidence, Side, judge
from fleet.rollout.model import Gates, parse_waves, plan_waves


def hist(median_ms: float, n: int = 500, seed: int = 0) -> Histogram:
    h = Histogram()
    for v in np.random.default_rng(seed).lognormal(np.log(median_ms), 0.2, n):
        h.record(v / 1000)
    return h


@pytest.mark.parametrize(
    ("waves", "devices", "ends"),
    [
        ("1,5%,25%,100%", 1000, [1, 50, 250, 1000]),
        ("1,5%,25%,100%", 10, [1, 3, 10]),  # 5% of 10 rounds up to 1, the same as wave 1: dropped
        ("2,50%", 3, [2, 3]),
        ("10", 4, [4]),
        ("1,2", 5, [1, 2, 5]),  # the last wave always reaches the whole target
    ],
)
def test_plan_waves(waves: str, devices: int, ends: list[int]) -> None:
    assert plan_waves(parse_waves(waves), devices) == ends


@pytest.mark.parametrize("bad", ["", "0", "5%%", "150%", "1.5", "abc", "-3"])
def test_bad_waves_are_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_waves(bad)


def side(latency: dict[str, Histogram] | None = None, **kw) -> Side:  # type: ignore[no-untyped-def]
    return Side(latency=latency or {}, **kw)


BASE = side({"rpi4": hist(10), "x86": hist(2, seed=1)}, labelled=1000, correct=950, rss_mb=100.0,
            devices=frozenset({"a", "b"}))  # fmt: skip


@pytest.mark.parametrize(
    ("case", "evidence", "reason"),
    [
        ("healthy", Evidence(10, {}, BASE, side({"rpi4": hist(10.2, seed=3), "x86": hist(2, seed=4)},
                             labelled=500, correct=474, rss_mb=104.0, devices=frozenset({"a", "b"}))), None),
        ("acceptance", Evidence(5, {"d1": "acceptance_failed"}, BASE, side()), "failed on-device acceptance"),
        ("failure ratio", Evidence(10, {"d1": "hash_mismatch", "d2": "timeout"}, BASE, side()),
         "2/10 devices failed"),
        ("one ratio too few", Evidence(2, {"d1": "timeout"}, BASE, side()), None),
        ("slow class", Evidence(10, {}, BASE, side({"rpi4": hist(13.5, seed=5), "x86": hist(2, seed=6)})),
         "on rpi4"),
        ("accuracy", Evidence(10, {}, BASE, side(labelled=500, correct=440)), "online accuracy 0.880"),
        ("few labels", Evidence(10, {}, BASE, side(labelled=20, correct=2)), None),
        # 46/50 against 950/1000: a 3-point drop that 50 labels cannot tell from noise (the
        # simulator's healthy rollouts were aborted by this before the standard error counted).
        ("noisy accuracy", Evidence(10, {}, BASE, side(labelled=50, correct=46)), None),
        ("rss", Evidence(10, {}, BASE, side(rss_mb=180.0)), "agent RSS 180 MB"),
        ("too few requests", Evidence(10, {}, BASE, side({"rpi4": hist(50, n=20)})), None),
    ],
)  # fmt: skip
def test_gates(case: str, evidence: Evidence, reason: str | None) -> None:
    verdict = judge(evidence, Gates())
    if reason is None:
        assert verdict.reason is None, case
    else:
        assert verdict.reason is not None and reason in verdict.reason, (case, verdict.reason)


def test_throttling_counts_only_devices_that_started_throttling() -> None:
    gates = Gates(max_throttled_ratio=0.2)
    base = side(throttled=frozenset({"a"}), devices=frozenset({"a", "b", "c"}))
    still = Evidence(3, {}, base, side(throttled=frozenset({"a"}), devices=frozenset({"a", "b", "c"})))
    assert judge(still, gates).reason is None
    newly = Evidence(3, {}, base, side(throttled=frozenset({"a", "b"}), devices=frozenset({"a", "b", "c"})))
    assert "1/3 updated devices started throttling" in (judge(newly, gates).reason or "")


def test_a_disabled_gate_does_not_judge() -> None:
    slow = Evidence(10, {}, BASE, side({"rpi4": hist(30)}))
    assert judge(slow, Gates(max_p99_ratio=None)).reason is None
    assert judge(slow, Gates()).figures["worst_p99_ratio"] > 2
