"""Selection over real device profiles and real bundles: artifacts, runtimes, delegates that
load, autotune, and a decision that names every rejected candidate with its reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devices.profile import Candidate, load_profile, resolve_candidates
from edgeagent.bundle import AcceptanceGate
from edgeagent.errors import NoCandidate
from edgeagent.selection import find_artifact, select_runtime
from tests.runtimes_support import extract, golden_arrays, make_bundle, write_golden


@pytest.fixture(scope="module")
def golden(digits, model_dir):  # type: ignore[no-untyped-def]
    return golden_arrays(digits, model_dir, images=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, keypair, model_dir, golden):  # type: ignore[no-untyped-def]
    """mlp.onnx (fp32) + mlp_int8.tflite + an Edge TPU-named copy of the int8 model, extracted."""
    root = tmp_path_factory.mktemp("selection")
    edgetpu = root / "mlp_int8_edgetpu.tflite"
    shutil.copy(model_dir / "mlp_int8.tflite", edgetpu)
    created = make_bundle(
        root / "out",
        keypair,
        [model_dir / "mlp.onnx", model_dir / "mlp_int8.tflite", edgetpu],
        write_golden(root / "golden.npz", golden),
    )
    verified = extract(created, root / "bundle", keypair)
    return verified.manifest, root / "bundle"


def _profile(name: str, host: str | None = None) -> list[Candidate]:
    return resolve_candidates(load_profile(name), load_profile(host) if host else None)


def test_first_candidate_that_loads_wins_and_the_rest_is_recorded(bundle) -> None:  # type: ignore[no-untyped-def]
    manifest, folder = bundle
    selection = select_runtime(folder, manifest, _profile("generic-x86_64"), profile="generic-x86_64")
    decision = selection.decision
    try:
        assert decision.chosen is not None
        assert decision.chosen.candidate == "litert/xnnpack/int8"
        assert decision.chosen.artifact == "models/mlp_int8.tflite"  # not the Edge TPU build
        (rejected,) = decision.rejected[:1]
        assert rejected.candidate == "onnxruntime/CPUExecutionProvider/int8"
        assert (rejected.stage, rejected.reason) == ("artifact", "the bundle has no onnx int8 artifact")
        assert decision.untried == ["onnxruntime/CPUExecutionProvider/fp32"]
        # no tflite fp32 and no tflite fp16
        assert [r.candidate for r in decision.rejected[1:]] == [
            "litert/xnnpack/fp32",
            "litert/xnnpack/fp32 (from fp16)",
        ]
        assert decision.timings[0].load_ms > 0
        assert selection.model.delegate == "xnnpack"
    finally:
        selection.model.close()


def test_missing_edgetpu_library_rejects_the_candidate_with_its_reason(bundle) -> None:  # type: ignore[no-untyped-def]
    manifest, folder = bundle
    candidates = _profile("coral-usb", host="rpi4")
    selection = select_runtime(folder, manifest, candidates, profile="coral-usb")
    try:
        first = selection.decision.rejected[0]
        assert first.candidate == "litert/edgetpu/int8"
        assert first.stage == "delegate"
        assert "libedgetpu.so.1" in first.reason
        assert selection.decision.chosen is not None
        assert selection.decision.chosen.candidate == "litert/xnnpack/int8"  # the host's own path
    finally:
        selection.model.close()


def test_absent_gpu_providers_are_rejected_and_the_cpu_provider_serves(bundle) -> None:  # type: ignore[no-untyped-def]
    manifest, folder = bundle
    selection = select_runtime(folder, manifest, _profile("jetson-orin"), profile="jetson-orin")
    try:
        by_candidate = {r.candidate: r for r in selection.decision.rejected}
        trt = by_candidate["onnxruntime/TensorrtExecutionProvider/fp16 (from fp32)"]
        assert trt.stage == "delegate" and "not in this onnxruntime build" in trt.reason
        assert by_candidate["onnxruntime/CUDAExecutionProvider/fp32"].stage == "delegate"
        assert by_candidate["onnxruntime/TensorrtExecutionProvider/int8"].stage == "artifact"
        assert selection.decision.chosen is not None
        assert selection.decision.chosen.candidate == "onnxruntime/CPUExecutionProvider/fp32"
    finally:
        selection.model.close()


def test_autotune_keeps_the_fastest_candidate_that_passes(bundle, golden) -> None:  # type: ignore[no-untyped-def]
    manifest, folder = bundle
    selection = select_runtime(
        folder, manifest, _profile("generic-x86_64"), profile="generic-x86_64", autotune=True, golden=golden
    )
    decision = selection.decision
    try:
        assert decision.mode == "autotune" and decision.untried == []
        measured = [t for t in decision.timings if t.p50_ms is not None]
        assert {t.candidate for t in measured} == {
            "litert/xnnpack/int8",
            "onnxruntime/CPUExecutionProvider/fp32",
        }
        fastest = min(measured, key=lambda t: t.p50_ms or 0.0)
        assert decision.chosen is not None and decision.chosen.candidate == fastest.candidate
        slower = [r for r in decision.rejected if r.stage == "slower"]
        assert len(slower) == 1 and "ms for the chosen candidate" in slower[0].reason
        assert selection.verdict is not None and selection.verdict.passed
    finally:
        selection.model.close()


def test_autotune_drops_candidates_that_fail_acceptance(tmp_path: Path, keypair, model_dir, golden) -> None:  # type: ignore[no-untyped-def]
    strict = AcceptanceGate(min_accuracy=0.9, atol=1e-3)  # int8 logits are not within 1e-3
    created = make_bundle(
        tmp_path / "out",
        keypair,
        [model_dir / "mlp.onnx", model_dir / "mlp_int8.tflite"],
        write_golden(tmp_path / "g.npz", golden),
        gate=strict,
    )
    verified = extract(created, tmp_path / "b", keypair)
    selection = select_runtime(
        tmp_path / "b", verified.manifest, _profile("generic-x86_64"), autotune=True, golden=golden
    )
    try:
        failed = [r for r in selection.decision.rejected if r.stage == "acceptance"]
        assert [r.candidate for r in failed] == ["litert/xnnpack/int8"]
        assert "tolerance_ratio" in failed[0].reason
        assert selection.decision.chosen is not None
        assert selection.decision.chosen.candidate == "onnxruntime/CPUExecutionProvider/fp32"
    finally:
        selection.model.close()


def test_no_candidate_carries_the_decision(bundle) -> None:  # type: ignore[no-untyped-def]
    manifest, folder = bundle
    only_fp16 = [Candidate(runtime="litert", delegate="xnnpack", precision="fp16")]
    with pytest.raises(NoCandidate) as info:
        select_runtime(folder, manifest, only_fp16, profile="x")
    decision = info.value.decision
    assert decision.chosen is None  # type: ignore[attr-defined]
    assert "no tflite fp16 artifact" in str(info.value)


def test_artifact_restrictions(bundle) -> None:  # type: ignore[no-untyped-def]
    manifest, _ = bundle
    tpu = Candidate(runtime="litert", delegate="edgetpu", precision="int8", artifact_suffix="_edgetpu.tflite")
    found = find_artifact(manifest, tpu, "coral-usb")
    assert not isinstance(found, str) and found.path == "models/mlp_int8_edgetpu.tflite"
    cpu = Candidate(runtime="litert", delegate="xnnpack", precision="int8")
    found = find_artifact(manifest, cpu, "rpi4")
    assert not isinstance(found, str) and found.path == "models/mlp_int8.tflite"
