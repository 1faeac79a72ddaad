"""``finetune`` and ``distill`` on digits: masks held, accuracy recovered, students close to teachers.

The 64-300-100-10 MLP (LeNet-300-100's shape) is trained once per session; every training run
here uses 2 torch threads and a fixed seed, so the numbers are repeatable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import flat
from tests.int8_support import LEVELS, output_step, run_level
from tests.lazy_imports import lazy, needs

torch = lazy("torch")
pytestmark = [pytest.mark.torch, needs("torch", "needs the torch extra: pip install 'edgeagent[torch]'")]
onnx = pytest.importorskip("onnx", reason="needs the host extra (onnx)")
ort = pytest.importorskip("onnxruntime", reason="needs the host extra (onnxruntime)")


def initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.fixture(scope="module")
def data() -> Any:
    from converter.data import DataConfig, load_data

    return load_data(DataConfig(dataset="digits"))


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory, data: Any) -> Path:
    """The 64-300-100-10 MLP trained 20 epochs (seed 0), exported to ONNX."""
    from converter.api import export_torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    x, y = torch.from_numpy(flat(data.train_x)), torch.from_numpy(data.train_y)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    return export_torch(net, x[:2], tmp_path_factory.mktemp("lenet") / "lenet.onnx").path


def context(data: Any, model: Path) -> Any:
    from converter.evaluate import EvaluateConfig, Evaluator
    from converter.model import ModelArtifact
    from converter.passes import PassContext

    evaluator = Evaluator(data, EvaluateConfig(latency_runs=1, latency_warmup=0))
    baseline = evaluator.evaluate(ModelArtifact(model, "onnx")).metrics
    return PassContext(data=data, evaluator=evaluator, baseline=baseline)


# ------------------------------------------------------------------------------ ONNX -> torch


@pytest.mark.parametrize("name", ["mlp.onnx", "cnn.onnx"])
def test_onnx_module_computes_what_onnxruntime_does(model_dir: Path, data: Any, name: str) -> None:
    from converter.onnx_torch import onnx_module, sample_shape
    from converter.runners import fit_inputs
    from converter.training import predict

    x = fit_inputs(data.x, sample_shape(model_dir / name))
    np.testing.assert_allclose(
        predict(onnx_module(model_dir / name), x), run_onnx(model_dir / name, x), rtol=1e-4, atol=1e-4
    )


# ----------------------------------------------------------------------------------- finetune


def test_finetune_holds_the_mask_and_recovers_90_percent_pruning(
    lenet: Path, data: Any, tmp_path: Path
) -> None:
    from converter.passes.finetune import FinetuneConfig, FinetunePass
    from converter.passes.prune import PruneConfig, PrunePass

    ctx = context(data, lenet)
    dense = ctx.baseline.accuracy
    pruned = PrunePass(PruneConfig(sparsity=0.9), ctx).run(ctx_model(lenet), tmp_path)
    pruned_accuracy = ctx.evaluator.evaluate(pruned.model).metrics.accuracy
    seen: list[Any] = []
    ctx.on_epoch = seen.append
    tuned = FinetunePass(FinetuneConfig(epochs=15), ctx).run(pruned.model, tmp_path)
    tuned_accuracy = ctx.evaluator.evaluate(tuned.model).metrics.accuracy

    before, after = initializers(pruned.model.path), initializers(tuned.model.path)
    for name, weights in before.items():
        if weights.ndim >= 2:
            assert np.all(after[name][weights == 0] == 0), f"{name}: a pruned weight moved"
            assert np.count_nonzero(after[name] == 0) == np.count_nonzero(weights == 0), name
    assert not np.array_equal(before["0.bias"], after["0.bias"])  # the rest did train
    assert tuned.sparsity == pytest.approx(0.9, abs=0.01)
    assert pruned_accuracy < dense - 0.05  # pruning 90% without retraining costs accuracy ...
    assert tuned_accuracy >= dense - 0.015  # ... and fine-tuning wins it back
    chain = tuned.details["accuracy"]
    assert chain["before pruning"] == dense
    assert chain["after pruning"] == pytest.approx(pruned_accuracy, abs=1e-9)
    assert chain["after fine-tuning"] == pytest.approx(tuned_accuracy, abs=1e-9)
    assert [e.epoch for e in seen] == [h["epoch"] for h in tuned.details["history"]]


def ctx_model(path: Path) -> Any:
    from converter.model import ModelArtifact

    return ModelArtifact(path, "onnx")


def test_finetune_is_repeatable_with_a_seed(lenet: Path, data: Any, tmp_path: Path) -> None:
    from converter.passes.finetune import FinetuneConfig, FinetunePass
    from converter.passes.prune import PruneConfig, PrunePass

    ctx = context(data, lenet)
    pruned = PrunePass(PruneConfig(sparsity=0.8), ctx).run(ctx_model(lenet), tmp_path).model
    runs = []
    for i, seed in enumerate((1, 1, 2)):
        (tmp_path / str(i)).mkdir()
        out = FinetunePass(FinetuneConfig(epochs=2, seed=seed), ctx).run(pruned, tmp_path / str(i))
        runs.append(out.model.path.read_bytes())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_finetune_without_training_data_says_how_to_give_it(lenet: Path, data: Any, tmp_path: Path) -> None:
    from dataclasses import replace

    from converter.errors import DataError
    from converter.passes import PassContext
    from converter.passes.finetune import FinetuneConfig, FinetunePass

    no_train = replace(data, train_x=None, train_y=None)
    with pytest.raises(DataError, match=r"--train FILE\.npz or --dataset digits"):
        FinetunePass(FinetuneConfig(epochs=1), PassContext(data=no_train)).run(ctx_model(lenet), tmp_path)


# ------------------------------------------------------------------------------------ distill


def test_distilled_student_is_close_to_its_teacher(
    lenet: Path, data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from converter.passes import distill as distill_module
    from converter.passes.distill import DistillConfig, DistillPass

    ctx = context(data, lenet)
    out = DistillPass(DistillConfig(student="mlp:32", epochs=40), ctx).run(ctx_model(lenet), tmp_path)
    teacher, student = out.details["teacher"], out.details["student"]
    assert teacher["parameters"] >= 10 * student["parameters"]
    assert student["accuracy"] >= teacher["accuracy"] - 0.03
    measured = ctx.evaluator.evaluate(out.model).metrics.accuracy
    assert measured == pytest.approx(student["accuracy"], abs=1e-9)  # the ONNX export is the module
    assert teacher["accuracy"] == ctx.baseline.accuracy

    # The teacher's logits are cached: a second run never invokes the teacher on the training data.
    def no_teacher(_model: Any) -> Any:
        raise AssertionError("teacher invoked again")

    cached = distill_module.teacher_logits(ctx_model(lenet), data.train_x, tmp_path)
    monkeypatch.setattr(distill_module, "open_runner", no_teacher)
    np.testing.assert_array_equal(
        distill_module.teacher_logits(ctx_model(lenet), data.train_x, tmp_path), cached
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [("mlp:", "unknown student"), ("resnet", "unknown student"), ("mlp:0x", "unknown student")],
)
def test_student_spec_is_validated(spec: str, message: str) -> None:
    from pydantic import ValidationError

    from converter.passes.distill import DistillConfig

    with pytest.raises(ValidationError, match=message):
        DistillConfig(student=spec)


def test_cnn_student_needs_images() -> None:
    from converter.students import build_student

    with pytest.raises(ValueError, match=r"cnn:small takes \(H, W, C\) images"):
        build_student("cnn:small", (64,), 10)
    assert build_student("cnn:small", (8, 8, 1), 10)(torch.zeros(2, 8, 8, 1)).shape == (2, 10)


# ---------------------------------------------------------------------------------------- CLI


def edgectl(*argv: str | Path) -> int:
    from edgeagent.cli.common import build_parser, run
    from fleet.edgectl import COMMANDS, DESCRIPTION

    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


def test_cli_prune_finetune_int8(lenet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = edgectl(
        "convert", lenet, "--dataset", "digits", "--prune", "0.9", "--finetune", "8", "--seed", "3",
        "--quantize", "int8", "--name", "lenet", "--version", "1.0.0", "--unsigned", "-o", out,
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["prune", "finetune", "quantize"]
    finetune = report["steps"][1]
    assert finetune["params"]["seed"] == 3 and finetune["params"]["epochs"] == 8
    assert set(finetune["details"]["accuracy"]) == {"before pruning", "after pruning", "after fine-tuning"}
    assert finetune["after"]["accuracy"] > report["steps"][0]["after"]["accuracy"]
    assert "after fine-tuning" in (out / "report.md").read_text()


def test_cli_distill_then_int8(lenet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = edgectl(
        "convert", lenet, "--dataset", "digits", "--distill", "mlp:16", "--distill-epochs", "10",
        "--temperature", "2", "--alpha", "0.5", "--quantize", "int8",
        "--name", "student", "--version", "1.0.0", "--unsigned", "-o", out,
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["distill", "quantize"]
    distill = report["steps"][0]
    assert distill["params"]["temperature"] == 2.0 and distill["params"]["alpha"] == 0.5
    assert distill["details"]["student"]["parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    assert distill["after"]["size_bytes"] < report["baseline"]["size_bytes"] / 10
    assert "| teacher |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--finetune", "3"], "give --prune SPARSITY too"),
        (["--temperature", "2"], "apply to --distill"),
    ],
)
def test_cli_training_flag_errors(lenet: Path, tmp_path: Path, argv: list[str], message: str) -> None:
    import argparse

    from converter.cli import build_recipe, register
    from converter.errors import RecipeError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["convert", str(lenet), "--dataset", "digits", *argv, "--name", "n", "--version", "1.0.0", "-o", "x"]
    )
    with pytest.raises(RecipeError, match=message):
        build_recipe(args)


def test_rich_progress_shows_epoch_loss_and_validation_accuracy() -> None:
    import io

    rich_console = pytest.importorskip("rich.console")
    from converter.cli import RichProgress
    from converter.passes import EpochLog

    progress = RichProgress()
    progress.console = rich_console.Console(file=io.StringIO(), force_terminal=True)
    with progress.step("finetune: m.onnx"):
        progress.epoch(EpochLog("finetune", 2, 5, 0.1234, 0.975))
        assert "epoch 2/5, loss 0.1234, validation top-1 97.50%" in str(progress._status.status)
    progress.epoch(EpochLog("finetune", 3, 5, 0.1, 0.98))  # outside a step: nothing to update


def test_finetune_trains_the_fixture_cnn_with_its_mask(model_dir: Path, data: Any, tmp_path: Path) -> None:
    from converter.passes.finetune import FinetuneConfig, FinetunePass
    from converter.passes.prune import PruneConfig, PrunePass

    ctx = context(data, model_dir / "cnn.onnx")
    pruned = PrunePass(PruneConfig(sparsity=0.8), ctx).run(ctx_model(model_dir / "cnn.onnx"), tmp_path).model
    tuned = FinetunePass(FinetuneConfig(epochs=3), ctx).run(pruned, tmp_path)
    before, after = initializers(pruned.path), initializers(tuned.model.path)
    assert set(tuned.details["masked_tensors"]) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for name in tuned.details["masked_tensors"]:
        assert np.array_equal(after[name] == 0, before[name] == 0), name
    assert ctx.evaluator.evaluate(tuned.model).metrics.accuracy == pytest.approx(
        tuned.details["accuracy"]["after fine-tuning"], abs=1e-9
    )


def tiny_student(sample_shape: tuple[int, ...], classes: int) -> Any:
    """A student factory, as a recipe names it with student = "module:function"."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(sample_shape)), classes))


def test_recipe_names_a_student_factory(lenet: Path, data: Any, tmp_path: Path) -> None:
    from converter.passes import pass_class
    from converter.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"passes": [{"type": "distill", "student": f"{__name__}:tiny_student", "epochs": 3}]}
    )
    spec = recipe.passes[0]
    out = pass_class(spec.name)(spec.config, context(data, lenet)).run(ctx_model(lenet), tmp_path)
    assert out.details["student"]["parameters"] == 64 * 10 + 10


# -------------------------------------------------------------------- quantization-aware training


@pytest.mark.parametrize("level", LEVELS)
def test_qat_trains_the_int8_graph_and_keeps_it_int8(
    lenet: Path, data: Any, tmp_path: Path, level: str
) -> None:
    from converter.onnx_torch import onnx_module
    from converter.passes.finetune import FinetuneConfig, FinetunePass
    from converter.passes.prune import PruneConfig, PrunePass
    from converter.passes.quantize import QuantizeConfig, QuantizePass
    from converter.training import predict

    ctx = context(data, lenet)
    pruned = PrunePass(PruneConfig(sparsity=0.8), ctx).run(ctx_model(lenet), tmp_path).model
    quantized = QuantizePass(QuantizeConfig(mode="static", per_channel=True), ctx).run(pruned, tmp_path).model
    x = flat(data.x)
    # The imported QDQ graph computes what ONNX Runtime's int8 execution does: exactly the graph's
    # own semantics (basic), and the fused integer kernels (all) to within one output step, on
    # every CPU (8-bit weights saturated them by 1.19 on x86 without VNNI).
    atol = 1e-5 if level == "basic" else output_step(quantized.path)
    np.testing.assert_allclose(
        predict(onnx_module(quantized.path), x), run_level(quantized.path, x, level), atol=atol
    )

    out = FinetunePass(FinetuneConfig(epochs=3, learning_rate=1e-4), ctx).run(quantized, tmp_path)
    assert out.details["quantization_aware"] and out.model.path.name.endswith("-qat.onnx")
    before, after = onnx.load(str(quantized.path)).graph, onnx.load(str(out.model.path)).graph
    assert [n.op_type for n in after.node] == [n.op_type for n in before.node]
    old, new = initializers(quantized.path), initializers(out.model.path)
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in old.items()}
    weights = [n for n in old if n.endswith("weight_quantized")]
    assert len(weights) == 3
    for name in weights:
        assert new[name].dtype == np.int8
        np.testing.assert_array_equal(new[name] == 0, old[name] == 0)  # pruned stay pruned
        assert not np.array_equal(new[name], old[name])  # the rest trained
        assert np.abs(new[name].astype(np.int32)).max() <= 64  # still 7-bit: no saturation on AVX2
        scale = name.replace("_quantized", "_scale")
        np.testing.assert_array_equal(new[scale], old[scale])  # scales are fixed
    chain = out.details["accuracy"]
    measured = ctx.evaluator.evaluate(out.model).metrics.accuracy
    assert chain["after QAT"] == pytest.approx(measured, abs=1e-9)
    assert measured >= chain["before QAT"] - 0.01


def test_cli_qat_needs_int8_and_runs_after_quantize(lenet: Path, tmp_path: Path) -> None:
    import argparse

    from converter.cli import build_recipe, register
    from converter.errors import RecipeError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    common = ["convert", str(lenet), "--dataset", "digits", "--name", "n", "--version", "1.0.0", "-o", "x"]
    recipe = build_recipe(parser.parse_args([*common, "--quantize", "int8", "--qat", "4"]))
    assert [(p.name, getattr(p.config, "epochs", None)) for p in recipe.passes] == [
        ("quantize", None),
        ("finetune", 4),
    ]
    for bad in (["--qat", "4"], ["--quantize", "dynamic", "--qat", "4"]):
        with pytest.raises(RecipeError, match="give --quantize int8 too"):
            build_recipe(parser.parse_args([*common, *bad]))


# ------------------------------------------------------------------------------ torch teacher


def test_torch_export_program_is_a_distillation_teacher(lenet: Path, data: Any, tmp_path: Path) -> None:
    from converter.onnx_torch import onnx_module

    teacher = tmp_path / "teacher.pt2"
    module = onnx_module(lenet).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (torch.zeros(4, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(teacher))
    out = tmp_path / "out"
    rc = edgectl(
        "convert", teacher, "--dataset", "digits", "--distill", "mlp:16", "--distill-epochs", "5",
        "--name", "s", "--version", "1.0.0", "--unsigned", "-o", out,
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["kind"] == "torch"
    reference = float(np.mean(run_onnx(lenet, flat(data.x)).argmax(1) == data.y))
    assert report["baseline"]["accuracy"] == pytest.approx(reference, abs=1e-9)
    teacher_details = report["steps"][0]["details"]["teacher"]
    assert teacher_details["parameters"] == sum(int(a.size) for a in initializers(lenet).values())
    # A torch program cannot be shipped or pruned itself: one line says what to do.
    rc = edgectl(
        "convert", teacher, "--dataset", "digits", "--prune", "0.5",
        "--name", "s", "--version", "1.0.0", "--unsigned", "-o", tmp_path / "bad",
    )  # fmt: skip
    assert rc == 2


def test_transfer_sets_shift_and_mixup(lenet: Path, data: Any, tmp_path: Path) -> None:
    from converter.errors import DataError
    from converter.passes.distill import DistillConfig, DistillPass, mixup_samples, shifted_copies

    images = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 1)
    shifted = shifted_copies(images)
    assert shifted.shape == (16, 3, 3, 1)
    # Image 0 moved down-right by one pixel (dy = dx = +1 is the last of the 8 directions).
    np.testing.assert_array_equal(shifted[14, :, :, 0], [[4, 5, 0], [7, 8, 0], [0, 0, 0]])
    with pytest.raises(DataError, match="must be \\(H, W\\) or \\(H, W, C\\)"):
        shifted_copies(np.zeros((2, 64), np.float32))
    blends = mixup_samples(images, 3, seed=0)
    assert blends.shape == (6, 3, 3, 1)
    assert blends.min() >= images.min() and blends.max() <= images.max()
    np.testing.assert_array_equal(blends, mixup_samples(images, 3, seed=0))

    ctx = context(data, lenet)
    out = DistillPass(DistillConfig(student="mlp:16", epochs=1, augment="mixup", mixup_copies=2), ctx).run(
        ctx_model(lenet), tmp_path
    )
    train_rows = len(data.train_x) - round(len(data.train_x) * 0.15)
    assert out.details["augment"] == "mixup" and out.details["transfer_samples"] == 3 * train_rows
