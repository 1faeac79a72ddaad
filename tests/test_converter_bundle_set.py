"""What a converter bundle ships: the final artifacts, each with its own gate (the reported failure).

``--prune 0.9 --finetune N --quantize int8`` used to ship the pruned, the fine-tuned and the
int8 model under one gate derived from the weakest, and a jetson-nano (ONNX fp32 only) served
the un-fine-tuned pruned model with "acceptance passed". Here the same pipeline runs on the
fixture MLP with a tiny training budget; the bundle is extracted and served on the real
jetson-nano profile (its GPU providers are absent here, so ONNX Runtime's CPU fp32 serves).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.profile import load_profile, resolve_candidates
from edgeagent.bundle.manifest import TASK_GATES_VERSION, Manifest
from edgeagent.bundle.reader import extract_bundle
from edgeagent.selection import select_runtime
from edgeagent.serving.loader import prepare_served_model
from edgeagent.signing import KeyRing

pytestmark = pytest.mark.torch
pytest.importorskip("torch", reason="needs the torch extra: pip install 'edgeagent[torch]'")
pytest.importorskip("onnx", reason="needs the host extra (onnx)")

JETSON = resolve_candidates(load_profile("jetson-nano"), None)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, keypair: Any) -> Any:
    """mlp.onnx pruned to 90%, fine-tuned 3 epochs, static int8: packaged with the defaults."""
    from converter.api import convert
    from converter.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "data": {"dataset": "digits"},
            "evaluate": {"latency_runs": 2, "latency_warmup": 0},
            "passes": [
                {"type": "prune", "sparsity": 0.9},
                {"type": "finetune", "epochs": 3, "seed": 0},
                {"type": "quantize", "mode": "static"},
            ],
            "package": {"name": "digits", "version": "1.0.0"},
        }
    )
    out = tmp_path_factory.mktemp("converted")
    return convert(model_dir / "mlp.onnx", recipe, out, keypair.load()), recipe


def _extract(path: Path, dest: Path, keypair: Any) -> Manifest:
    return extract_bundle(path, dest, KeyRing.from_paths([keypair.public])).manifest


def _floor(value: float) -> float:
    return float(np.floor(value * 10_000) / 10_000)


def test_the_bundle_holds_only_the_final_artifacts_each_with_its_own_gate(
    converted: Any, tmp_path: Path, keypair: Any
) -> None:
    result, _ = converted
    _, finetuned, int8 = (s.model.path.name for s in result.pipeline.steps)
    manifest = _extract(result.packaged.bundle.path, tmp_path / "b", keypair)
    assert [m.path for m in manifest.models] == [f"models/{finetuned}", f"models/{int8}"]
    assert manifest.schema_version == TASK_GATES_VERSION  # the gates carry a task (schema 3)
    measured = result.packaged.measured
    for model in manifest.models:
        own = model.acceptance
        row = measured[model.path.removeprefix("models/")]
        assert own is not None
        assert own.min_accuracy == pytest.approx(_floor(row["accuracy"] - 0.02), abs=1e-9)
        assert own.min_top1_agreement == pytest.approx(_floor(row["top1_agreement"] - 0.02), abs=1e-9)
    lowest = min(m.acceptance.min_accuracy for m in manifest.models if m.acceptance)
    assert manifest.acceptance.min_accuracy == lowest  # the bundle-level gate: the finals' floor
    assert result.packaged.intermediates == [] and result.packaged.notes == []
    report = json.loads(next(p for p in result.reports if p.name == "report.json").read_text())
    assert report["bundle"]["models"] == [m.path for m in manifest.models]
    assert {name: g["min_accuracy"] for name, g in report["bundle"]["gates"].items()} == {
        m.path.removeprefix("models/"): m.acceptance.min_accuracy for m in manifest.models if m.acceptance
    }

    served = prepare_served_model(tmp_path / "b", manifest, JETSON, profile="jetson-nano")
    try:
        assert served.decision is not None and served.decision.chosen is not None
        assert served.decision.chosen.artifact == f"models/{finetuned}"
        assert served.verdict is not None and served.verdict.passed
    finally:
        served.model.close()


def test_kept_intermediates_are_gated_at_the_finals_floor_and_never_served(
    converted: Any, tmp_path: Path, keypair: Any
) -> None:
    from converter.cli import summary
    from converter.data import load_data
    from converter.package import package

    result, recipe = converted
    pruned, finetuned, int8 = (s.model.path.name for s in result.pipeline.steps)
    config = recipe.package.model_copy(update={"keep_intermediates": True})
    packaged = package(result.pipeline, load_data(recipe.data), config, keypair.load(), tmp_path)
    manifest = _extract(packaged.bundle.path, tmp_path / "b", keypair)
    # Finals first, so a profile's candidate finds the final of its kind before an intermediate.
    assert [m.path for m in manifest.models] == [f"models/{finetuned}", f"models/{int8}", f"models/{pruned}"]
    assert packaged.intermediates == [pruned]
    weak = manifest.models[2].acceptance
    assert weak is not None and weak.min_accuracy is not None
    assert weak.min_accuracy >= manifest.acceptance.min_accuracy  # type: ignore[operator]
    # Precondition of what follows: pruning without fine-tuning measurably lost accuracy.
    assert packaged.measured[pruned]["accuracy"] < weak.min_accuracy
    assert any(pruned in note and "no device will serve it" in note for note in packaged.notes)
    text = summary(type(result)(pipeline=result.pipeline, packaged=packaged, reports=[]))
    assert f"gate of {pruned} (intermediate)" in text and "note: " in text

    # Autotune loads every artifact the profile can run: the pruned one fails its own gate.
    selection = select_runtime(tmp_path / "b", manifest, JETSON, profile="jetson-nano", autotune=True)
    try:
        assert selection.entry.path != f"models/{pruned}"
        # The GPU providers are absent here (rejected per artifact); the CPU one loads and judges.
        refused = [r for r in selection.decision.rejected if r.artifact == f"models/{pruned}"]
        assert [r.stage for r in refused if r.stage != "delegate"] == ["acceptance"]
        timings = [t for t in selection.decision.timings if t.artifact == f"models/{pruned}"]
        assert [t.accepted for t in timings] == [False]
    finally:
        selection.model.close()


def test_keep_intermediates_flag_and_recipe_key() -> None:
    from converter.cli import build_recipe, register
    from converter.errors import RecipeError
    from converter.recipe import recipe_from_dict

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["convert", "m.onnx", "--dataset", "digits", "--prune", "0.5", "--name", "d", "--version", "1.0.0"]
    base += ["-o", "out"]
    recipe = build_recipe(parser.parse_args([*base, "--keep-intermediates"]))
    assert recipe.package is not None and recipe.package.keep_intermediates
    recipe = build_recipe(parser.parse_args(base))
    assert recipe.package is not None and not recipe.package.keep_intermediates
    assert recipe.package.artifacts == "final"
    with pytest.raises(RecipeError, match="keep_intermediates = true"):
        recipe_from_dict({"package": {"name": "d", "version": "1.0.0", "artifacts": "all"}})
