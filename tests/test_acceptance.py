"""Acceptance on the golden set: every number next to its bound, the reason when one misses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeagent.acceptance import load_golden, run_acceptance
from edgeagent.bundle import AcceptanceGate
from edgeagent.errors import UsageError
from edgeagent.runtimes import LoadOptions, load_model
from tests.runtimes_support import golden_arrays, write_golden


@pytest.fixture(scope="module")
def golden(digits, model_dir):  # type: ignore[no-untyped-def]
    return golden_arrays(digits, model_dir, images=False)


@pytest.fixture(scope="module")
def fp32(model_dir):  # type: ignore[no-untyped-def]
    model = load_model(model_dir / "mlp.onnx", "onnxruntime", LoadOptions("CPUExecutionProvider", threads=1))
    yield model
    model.close()


@pytest.fixture(scope="module")
def int8(model_dir):  # type: ignore[no-untyped-def]
    model = load_model(
        model_dir / "mlp_int8.tflite", "litert", LoadOptions("xnnpack", threads=1), precision="int8"
    )
    yield model
    model.close()


def _check(verdict, name):  # type: ignore[no-untyped-def]
    return next(c for c in verdict.checks if c.name == name)


def test_fp32_model_passes_every_bound(fp32, golden) -> None:  # type: ignore[no-untyped-def]
    gate = AcceptanceGate(
        golden="acceptance/golden.npz", min_accuracy=0.9, min_top1_agreement=1.0, atol=1e-4, rtol=1e-4
    )
    verdict = run_acceptance(fp32, gate, golden, profile="generic-x86_64")
    assert verdict.passed and verdict.reason is None
    assert verdict.samples == len(golden["inputs"])
    assert [c.name for c in verdict.checks] == ["accuracy", "top1_agreement", "tolerance_ratio"]
    assert _check(verdict, "accuracy").value >= 0.9
    assert _check(verdict, "top1_agreement").value == 1.0
    assert _check(verdict, "tolerance_ratio").value <= 1.0
    assert 0 < verdict.latency.p50_ms <= verdict.latency.p95_ms <= verdict.latency.max_ms
    assert (verdict.runtime, verdict.delegate, verdict.precision) == (
        "onnxruntime",
        "CPUExecutionProvider",
        "fp32",
    )


def test_int8_model_agrees_but_misses_a_tight_tolerance(int8, golden) -> None:  # type: ignore[no-untyped-def]
    gate = AcceptanceGate(golden="g.npz", min_accuracy=0.9, min_top1_agreement=0.9, atol=1e-3)
    verdict = run_acceptance(int8, gate, golden)
    assert not verdict.passed
    assert _check(verdict, "accuracy").passed and _check(verdict, "top1_agreement").passed
    tolerance = _check(verdict, "tolerance_ratio")
    assert not tolerance.passed and tolerance.value > 1.0 and tolerance.bound == 1.0
    assert "atol=0.001" in tolerance.detail
    assert verdict.reason is not None and verdict.reason.startswith("tolerance_ratio ")
    assert "> bound 1" in verdict.reason


@pytest.mark.parametrize(
    ("budgets", "profile", "passed"),
    [
        ({"rpi4": 1e-6}, "rpi4", False),
        ({"rpi4": 1e-6, "*": 1e4}, "generic-x86_64", True),  # '*' applies to other profiles
        ({"*": 1e-6}, None, False),
        ({"rpi4": 1e-6}, "generic-x86_64", True),  # no budget for this profile: not checked
    ],
)
def test_latency_budget_per_profile(fp32, golden, budgets, profile, passed) -> None:  # type: ignore[no-untyped-def]
    verdict = run_acceptance(fp32, AcceptanceGate(latency_p95_ms=budgets), golden, profile=profile)
    assert verdict.passed is passed
    if not passed:
        check = _check(verdict, "latency_p95_ms")
        assert check.value == verdict.latency.p95_ms and check.bound == 1e-6
        assert "latency_p95_ms" in (verdict.reason or "")


def test_bounds_without_the_data_they_need_fail_with_the_reason(fp32, golden) -> None:  # type: ignore[no-untyped-def]
    inputs_only = {"inputs": golden["inputs"]}
    gate = AcceptanceGate(golden="g.npz", min_accuracy=0.5, min_top1_agreement=0.5, atol=1.0)
    verdict = run_acceptance(fp32, gate, inputs_only)
    assert not verdict.passed
    assert all(c.value is None and not c.passed for c in verdict.checks)
    assert "no 'labels'" in (verdict.reason or "") and "no reference outputs" in (verdict.reason or "")


def test_no_golden_set_times_zero_inputs(fp32) -> None:  # type: ignore[no-untyped-def]
    verdict = run_acceptance(fp32, AcceptanceGate(latency_p95_ms={"*": 1e4}), None)
    assert verdict.passed and verdict.samples == 0 and verdict.latency.runs > 0


def test_load_golden_refuses_unreadable_files(tmp_path: Path, golden) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable golden"):
        load_golden(bad)
    good = write_golden(tmp_path / "g.npz", golden)
    assert set(load_golden(good).arrays()) == {"inputs", "labels", "reference"}  # legacy keys round-trip
    no_inputs = tmp_path / "empty.npz"
    np.savez(no_inputs, labels=np.arange(3))
    with pytest.raises(UsageError, match="has no inputs"):
        load_golden(no_inputs)
