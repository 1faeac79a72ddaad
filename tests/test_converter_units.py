"""Converter logic without the heavy paths: registry, configs, pruning math, recipes, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from converter.errors import ConverterError, MissingExtra, RecipeError
from converter.evaluate import Metrics, regressions
from converter.extras import require
from converter.passes import REGISTRY, pass_class
from converter.passes.preprocess import error_reason
from converter.passes.prune import PruneConfig, magnitude_threshold, prune_arrays
from converter.passes.quantize import QuantizeConfig, ort_extra_options
from converter.passes.search import Objective, SearchConfig, rank
from converter.passes.tflite import TfliteConfig
from converter.recipe import load_recipe, recipe_from_dict
from edgeagent.errors import EdgeError, UsageError

EXAMPLES = Path(__file__).parent.parent / "examples" / "recipes"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_pass_imports_and_is_complete(name: str) -> None:
    cls = pass_class(name)
    assert cls.name == name
    assert cls.accepts
    for field_name, field in cls.config_class.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"


def test_unknown_pass_names_the_known_ones() -> None:
    known = "known: cluster, distill, finetune, mixed, prune, quantize, search, sparsify, structured, tflite"
    with pytest.raises(RecipeError, match=known):
        pass_class("distil")


def test_error_tree() -> None:
    assert issubclass(ConverterError, EdgeError)
    # Recipe mistakes and missing extras are the user's to fix: the CLI exits 2 for them.
    assert issubclass(RecipeError, UsageError)
    assert issubclass(MissingExtra, UsageError)


def test_missing_extra_gives_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'edgeagent\[tensorflow\]'") as info:
        require("tensorflow")
    assert info.value.extra == "tensorflow"


# ------------------------------------------------------------------------------------------ prune


def test_global_threshold_hits_the_target_over_all_tensors() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(40, 50)).astype(np.float32),
        "b": 3 * rng.normal(size=(10, 10)).astype(np.float32),
    }
    pruned, report = prune_arrays(tensors, PruneConfig(sparsity=0.9))
    zeros = sum(int((t == 0).sum()) for t in pruned.values())
    assert zeros == round(0.9 * 2100)
    # One threshold: the tensor with larger weights keeps more of them.
    assert report["b"]["sparsity"] < report["a"]["sparsity"]
    assert report["a"]["threshold"] == report["b"]["threshold"]
    for name, t in tensors.items():
        kept = pruned[name] != 0
        np.testing.assert_array_equal(pruned[name][kept], t[kept])
        assert np.all(np.abs(t[~kept]) <= report[name]["threshold"])
        assert np.all(np.abs(t[kept]) > report[name]["threshold"])


def test_per_layer_prunes_each_tensor_to_the_target() -> None:
    rng = np.random.default_rng(1)
    tensors = {"a": rng.normal(size=(30, 30)), "b": 5 * rng.normal(size=(20, 5))}
    _, report = prune_arrays(tensors, PruneConfig(sparsity=0.5, scope="per_layer"))
    assert report["a"]["zeros"] == 450
    assert report["b"]["zeros"] == 50


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=500),
    sparsity=st.floats(min_value=0.0, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_threshold_zeroes_exactly_k_distinct_magnitudes(n: int, sparsity: float, seed: int) -> None:
    magnitudes = np.abs(np.random.default_rng(seed).normal(size=n))
    theta = magnitude_threshold(magnitudes, sparsity)
    assert int((magnitudes <= theta).sum()) == round(sparsity * n)


def test_prune_config_refuses_full_sparsity() -> None:
    with pytest.raises(ValidationError, match="less than 1"):
        PruneConfig(sparsity=1.0)


# --------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (QuantizeConfig(mode="dynamic"), {"WeightSymmetric": True, "MatMulConstBOnly": True}),
        (QuantizeConfig(), {"WeightSymmetric": True, "ActivationSymmetric": False, "QuantizeBias": True}),
        (
            QuantizeConfig(calibration="percentile", percentile=99.9, activation_symmetric=True),
            {
                "WeightSymmetric": True,
                "ActivationSymmetric": True,
                "QuantizeBias": True,
                "CalibPercentile": 99.9,
            },
        ),
        (
            QuantizeConfig(weight_symmetric=False, quantize_bias=False),
            {"WeightSymmetric": False, "ActivationSymmetric": False, "QuantizeBias": False},
        ),
    ],
)
def test_typed_options_map_onto_ort_extra_options(
    config: QuantizeConfig, expected: dict[str, object]
) -> None:
    assert ort_extra_options(config) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "fp16", "per_channel": True}, "apply to int8 modes"),
        ({"mode": "dynamic", "calibration": "entropy"}, "mode='static' only"),
        ({"calibration": "minmax", "percentile": 99.0}, "calibration='percentile' only"),
        ({"mode": "int4"}, "Input should be"),
        ({"per_chanel": True}, "Extra inputs are not permitted"),
    ],
)
def test_quantize_config_cross_field_rules(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        QuantizeConfig.model_validate(fields)


def test_tflite_int8_io_only_for_int8() -> None:
    with pytest.raises(ValidationError, match="int8_io applies"):
        TfliteConfig(mode="fp16", int8_io=False)


def _metrics(size: int, p50: float) -> Metrics:
    return Metrics(
        samples=1,
        size_bytes=size,
        transfer_bytes=size,
        transfer_codec="xz",
        latency_p50_ms=p50,
        latency_p95_ms=p50,
    )


@pytest.mark.parametrize(
    ("objective", "winner"),
    [
        ("size", "small-slow"),  # fewest bytes
        ("latency", "big-fast"),  # lowest p50
        ("balanced", "middle"),  # lowest size ratio x p50 ratio
    ],
)
def test_objectives_rank_accepted_candidates(objective: Objective, winner: str) -> None:
    reference = _metrics(1000, 1.0)
    candidates = {
        "small-slow": _metrics(300, 0.9),  # size x p50 ratios: 0.3 x 0.9 = 0.27
        "middle": _metrics(400, 0.4),  # 0.4 x 0.4 = 0.16
        "big-fast": _metrics(900, 0.2),  # 0.9 x 0.2 = 0.18
    }
    best = min(candidates, key=lambda name: rank(objective, candidates[name], reference))
    assert best == winner


def test_regressions_quote_both_numbers_and_only_what_is_worse() -> None:
    source = _metrics(1000, 1.0)
    assert regressions(_metrics(1000, 1.0), source, "the source") == []
    assert regressions(_metrics(999, 0.5), source, "the source") == []
    assert regressions(_metrics(1290, 2.0), source, "the source m.onnx") == [
        "larger than the source m.onnx (1,290 vs 1,000 bytes, 1.29x)",
        "slower than the source m.onnx (p50 2.000 vs 1.000 ms, 2.00x)",
    ]


def test_an_accuracy_loss_past_five_points_is_named_with_both_numbers() -> None:
    from converter.evaluate import accuracy_loss

    source = _metrics(1000, 1.0).model_copy(update={"accuracy": 1.0})
    assert accuracy_loss(source.model_copy(update={"accuracy": 0.96}), source, "the source") is None
    assert accuracy_loss(_metrics(1000, 1.0), source, "the source") is None  # not a classifier
    lost = accuracy_loss(source.model_copy(update={"accuracy": 0.25}), source, "the source m.onnx")
    assert lost == (
        "top-1 25.00% against 100.00% for the source m.onnx (75.0 points lost; int8: try "
        "--per-channel, or --max-drop to search settings)"
    )


def test_error_reason_is_never_empty() -> None:
    assert error_reason(ValueError("bad shape\nmore detail")) == "ValueError: bad shape"
    assert error_reason(AssertionError()) == "AssertionError()"
    try:
        raise AssertionError
    except AssertionError as exc:
        assert error_reason(exc).startswith("AssertionError() in test_error_reason_is_never_empty (")


def test_search_objective_in_a_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[[passes]]\ntype = "search"\nmax_drop = 0.01\nobjective = "latency"\n')
    config = load_recipe(path).passes[0].config
    assert isinstance(config, SearchConfig) and config.objective == "latency"
    assert SearchConfig(max_drop=0.01).objective == "balanced"
    path.write_text('[[passes]]\ntype = "search"\nmax_drop = 0.01\nobjective = "speed"\n')
    with pytest.raises(RecipeError, match=r"passes\[0\]\.objective: Input should be 'size', 'latency' or"):
        load_recipe(path)


# ---------------------------------------------------------------------------------------- recipes


def test_example_recipes_parse() -> None:
    paths = sorted(EXAMPLES.glob("*.toml"))
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.passes and recipe.package is not None


def test_recipe_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "r.toml"
    bad.write_text('[[passes]]\ntype = "prune"\nsparsity = 1.5\n')
    with pytest.raises(RecipeError, match=r"r\.toml: passes\[0\]\.sparsity: Input should be less than 1"):
        load_recipe(bad)
    bad.write_text('[data]\ndataset = "digits"\neval = "x.npz"\n')
    with pytest.raises(RecipeError, match="either dataset or eval"):
        load_recipe(bad)
    bad.write_text("[[passes]]\nsparsity = 0.5\n")
    with pytest.raises(RecipeError, match=r"passes\[0\]: needs type"):
        load_recipe(bad)
    bad.write_text("passes = [")
    with pytest.raises(RecipeError, match="not a readable TOML"):
        load_recipe(bad)


def test_recipe_paths_are_relative_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.toml"
    path.write_text('model = "m.onnx"\n[data]\neval = "e.npz"\ncalib = "/abs/c.npz"\n')
    recipe = load_recipe(path)
    assert recipe.model == tmp_path / "sub" / "m.onnx"
    assert recipe.data.eval == tmp_path / "sub" / "e.npz"
    assert recipe.data.calib == Path("/abs/c.npz")


def test_recipe_from_dict_keeps_pass_order() -> None:
    recipe = recipe_from_dict(
        {"passes": [{"type": "prune", "sparsity": 0.5}, {"type": "quantize", "mode": "dynamic"}]}
    )
    assert [p.name for p in recipe.passes] == ["prune", "quantize"]
    assert isinstance(recipe.passes[1].config, QuantizeConfig)


def test_regression_task_reports_mse(model_dir: Path, digits: object) -> None:
    pytest.importorskip("onnxruntime", reason="needs the host extra")
    from converter.data import Dataset
    from converter.evaluate import EvaluateConfig, Evaluator
    from converter.model import ModelArtifact
    from converter.runners import OnnxRunner

    model = ModelArtifact(model_dir / "mlp.onnx", "onnx")
    x = digits.x_test  # type: ignore[attr-defined]
    targets = OnnxRunner(model).predict(x.reshape(len(x), 64))
    data = Dataset(inputs={"x": x}, y=targets + 0.5, calib=None, source="self")
    metrics = Evaluator(data, EvaluateConfig(task="regression", latency_runs=5)).evaluate(model).metrics
    assert metrics.accuracy is None
    assert metrics.mse == pytest.approx(0.25, rel=1e-5)


def test_misshapen_data_is_a_data_error() -> None:
    from converter.errors import DataError
    from converter.runners import fit_inputs

    assert fit_inputs(np.zeros((3, 8, 8, 1)), (64,)).shape == (3, 64)
    assert fit_inputs(np.zeros((3, 5)), (None,)).shape == (3, 5)
    with pytest.raises(DataError, match=r"data samples have shape \[10\] but the model takes \[64\]"):
        fit_inputs(np.zeros((3, 10)), (64,))


def test_undeployable_result_is_refused_before_any_work(tmp_path: Path) -> None:
    from converter.api import convert

    model = tmp_path / "model.keras"
    model.write_bytes(b"not read: the recipe is checked first")
    recipe = recipe_from_dict({"data": {"dataset": "digits"}, "package": {"name": "k", "version": "1.0.0"}})
    with pytest.raises(RecipeError, match="a keras model is not deployable: add the tflite pass"):
        convert(model, recipe, tmp_path / "out")
    onnx_recipe = recipe_from_dict({"data": {"dataset": "digits"}, "passes": [{"type": "tflite"}]})
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(
        RecipeError, match=r"passes\[0\]: tflite takes keras, savedmodel models but gets onnx"
    ):
        convert(tmp_path / "m.onnx", onnx_recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [(200, 100, "2.0x fewer"), (100, 200, "2.0x more"), (100, 100, "1.0x fewer")],
)
def test_distill_note_says_more_for_a_larger_student(teacher: int, student: int, expected: str) -> None:
    # A student twice the teacher's size was reported as "0.5x fewer parameters".
    from converter.passes.distill import compare

    assert compare(teacher, student, "fewer", "more") == expected
