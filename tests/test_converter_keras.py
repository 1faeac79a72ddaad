"""The seed workflow and the tflite pass: Keras -> prune -> TFLite, checked with LiteRT directly."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import flat
from edgeagent.bundle.golden import load_golden
from edgeagent.bundle.reader import extract_bundle
from edgeagent.cli.common import build_parser, run
from edgeagent.signing import KeyRing
from fleet.edgectl import COMMANDS, DESCRIPTION
from tests.lazy_imports import needs

pytestmark = [
    pytest.mark.tensorflow,
    needs("tensorflow", "needs the tensorflow extra: pip install 'edgeagent[tensorflow]'"),
]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
litert = pytest.importorskip("ai_edge_litert.interpreter", reason="needs the litert extra")


def edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture(scope="module")
def keras_mlp(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> Path:
    """The issue's model: Dense(128, relu) -> Dense(10), trained briefly on digits."""
    from converter import extras

    extras.tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(flat(digits.x_train), digits.y_train, epochs=10, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "mlp.keras"
    model.save(path)
    return path


def litert_logits(path: Path, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Run a .tflite one sample at a time, (de)quantizing with the tensors' own parameters."""
    interpreter = litert.Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for sample in x.reshape(len(x), *inp["shape"][1:]):
        value = sample[None].astype(np.float32)
        if inp["dtype"] == np.int8:
            scale, zp = inp["quantization"]
            value = np.clip(np.round(value / scale + zp), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], value)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] == np.int8:
            scale, zp = out["quantization"]
            y = (y - zp) * scale
        rows.append(y[0])
    return np.stack(rows), inp


def test_seed_workflow_keras_prune90_full_int8(
    tmp_path: Path, keras_mlp: Path, keypair: Any, digits: Any, capsys: Any
) -> None:
    out = tmp_path / "out"
    rc = edgectl(
        "convert", keras_mlp, "--dataset", "digits", "--prune", "0.9", "--quantize", "int8", "--tflite",
        "--name", "seed", "--version", "1.0.0", "--key", keypair.private, "-o", out,
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["prune", "tflite"]
    verified = extract_bundle(out / "seed-1.0.0.bundle", tmp_path / "x", KeyRing.from_paths([keypair.public]))
    manifest = verified.manifest
    assert [(m.path, m.format, m.precision) for m in manifest.models] == [
        ("models/mlp-p90-int8.tflite", "tflite", "int8")
    ]

    # Pruning by percentile threshold: 90% of the kernels' weights are zero, biases kept.
    import keras

    source = {v.path: v.numpy() for v in keras.models.load_model(keras_mlp).weights}
    pruned_model = keras.models.load_model(out / "artifacts" / "mlp-p90.keras")
    pruned = {v.path: v.numpy() for v in pruned_model.weights}
    kernels = [p for p in pruned if p.endswith("kernel")]
    zeros = sum(int((pruned[p] == 0).sum()) for p in kernels)
    assert zeros / sum(pruned[p].size for p in kernels) == pytest.approx(0.9, abs=1e-3)
    for p in pruned:
        if p.endswith("bias"):
            np.testing.assert_array_equal(pruned[p], source[p])
    for p, row in report["steps"][0]["details"]["tensors"].items():
        assert row["sparsity"] == pytest.approx(float(np.mean(pruned[p] == 0)))

    # Every number of the report, recomputed with LiteRT and Keras on the files themselves.
    tflite = tmp_path / "x" / "models" / "mlp-p90-int8.tflite"
    y, inp = litert_logits(tflite, flat(digits.x_test))
    assert inp["dtype"] == np.int8
    after = report["steps"][1]["after"]
    assert after["accuracy"] == pytest.approx(float(np.mean(y.argmax(1) == digits.y_test)), abs=1e-9)
    assert after["size_bytes"] == tflite.stat().st_size
    keras_acc = float(np.mean(np.asarray(pruned_model(flat(digits.x_test))).argmax(1) == digits.y_test))
    assert report["steps"][0]["after"]["accuracy"] == pytest.approx(keras_acc, abs=1e-9)
    assert manifest.compression[1].accuracy_after == after["accuracy"]
    assert manifest.compression[0].sparsity == pytest.approx(0.9, abs=1e-3)
    # Full int8 of the pruned model costs little on top of pruning.
    assert abs(after["accuracy"] - keras_acc) <= 0.03
    assert after["size_bytes"] < report["baseline"]["size_bytes"] / 4

    golden = load_golden(tmp_path / "x" / "acceptance" / "golden.npz")
    (inputs,) = golden.inputs.values()  # named after the TFLite artifact's input
    assert inputs.shape == (100, 64)
    gy, _ = litert_logits(tflite, inputs)
    assert manifest.acceptance.min_accuracy is not None and golden.labels is not None
    assert manifest.acceptance.min_accuracy <= float(np.mean(gy.argmax(1) == golden.labels))


@pytest.mark.parametrize(
    ("mode", "precision", "max_ratio"),
    [("fp32", "fp32", 1.2), ("dynamic", "int8", 0.4), ("fp16", "fp16", 0.65)],
)
def test_tflite_modes(
    tmp_path: Path, keras_mlp: Path, digits: Any, mode: str, precision: str, max_ratio: float
) -> None:
    from converter.data import Dataset
    from converter.model import ModelArtifact
    from converter.passes import PassContext
    from converter.passes.tflite import TfliteConfig, TflitePass
    from edgeagent.modelinfo import inspect_model

    data = Dataset(inputs={"x": digits.x_test}, y=digits.y_test, calib={"x": digits.x_calib}, source="digits")
    output = TflitePass(TfliteConfig(mode=mode), PassContext(data=data)).run(  # type: ignore[arg-type]
        ModelArtifact(keras_mlp, "keras"), tmp_path
    )
    assert inspect_model(output.model.path)[1] == precision
    import keras

    reference = np.asarray(keras.models.load_model(keras_mlp)(flat(digits.x_test)))
    y, _ = litert_logits(output.model.path, flat(digits.x_test))
    assert np.mean(y.argmax(1) == reference.argmax(1)) >= 0.98
    float_bytes = 4 * (64 * 128 + 128 + 128 * 10 + 10)
    assert output.model.path.stat().st_size <= max_ratio * float_bytes + 4096


def test_keras_max_drop_is_refused_in_one_line(
    tmp_path: Path, keras_mlp: Path, keypair: Any, capsys: Any
) -> None:
    rc = edgectl(
        "convert", keras_mlp, "--dataset", "digits", "--max-drop", "0.01",
        "--name", "k", "--version", "1.0.0", "--key", keypair.private, "-o", tmp_path / "out",
    )  # fmt: skip
    assert rc == 2
    assert "for Keras choose --quantize" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["savedmodel", "h5"])
def test_savedmodel_and_h5_inputs(
    tmp_path: Path, keras_mlp: Path, keypair: Any, digits: Any, form: str
) -> None:
    import keras

    model = keras.models.load_model(keras_mlp)
    if form == "savedmodel":
        source = tmp_path / "saved"
        model.export(source, verbose=False)
    else:
        source = tmp_path / "mlp.h5"
        model.save(source)
    out = tmp_path / "out"
    rc = edgectl(
        "convert", source, "--dataset", "digits", "--quantize", "dynamic",
        "--name", "s", "--version", "1.0.0", "--key", keypair.private, "-o", out,
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["kind"] == ("savedmodel" if form == "savedmodel" else "keras")
    expected = float(np.mean(np.asarray(model(flat(digits.x_test))).argmax(1) == digits.y_test))
    assert report["baseline"]["accuracy"] == pytest.approx(expected, abs=1e-9)
    tflite = out / "artifacts" / report["steps"][0]["artifact"]
    y, _ = litert_logits(tflite, flat(digits.x_test))
    assert report["steps"][0]["after"]["accuracy"] == pytest.approx(
        float(np.mean(y.argmax(1) == digits.y_test)), abs=1e-9
    )


def test_keras_prune_finetune_qat_full_int8(tmp_path: Path, keras_mlp: Path, digits: Any) -> None:
    import keras

    out = tmp_path / "out"
    rc = edgectl(
        "convert", keras_mlp, "--dataset", "digits", "--prune", "0.9", "--finetune", "8", "--qat", "3",
        "--quantize", "int8", "--seed", "1", "--name", "k", "--version", "1.0.0", "--unsigned", "-o", out,
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    assert [s["name"] for s in steps] == ["prune", "finetune", "finetune", "tflite"]
    assert [s["params"]["quantization_aware"] for s in steps[1:3]] == [False, True]
    # Pruned weights stay exactly zero through fine-tuning and QAT; the rest trains.
    loaded = [keras.models.load_model(out / "artifacts" / s["artifact"]) for s in steps[:3]]
    pruned, tuned, qat = ({v.path: v.numpy() for v in m.weights} for m in loaded)
    for path, weights in pruned.items():
        if path.endswith("kernel"):
            np.testing.assert_array_equal(tuned[path] == 0, weights == 0)
            np.testing.assert_array_equal(qat[path] == 0, weights == 0)
            assert not np.array_equal(tuned[path], weights)
    assert steps[1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert steps[1]["after"]["accuracy"] > steps[0]["after"]["accuracy"]
    assert set(steps[2]["details"]["accuracy"]) == {"source", "before QAT", "after QAT"}
    history = steps[1]["details"]["history"]
    assert 1 <= len(history) <= 8 and steps[1]["details"]["best_epoch"] <= len(history)
    # The TFLite int8 model is what the last step measured, and it kept most of the accuracy.
    y, inp = litert_logits(out / "artifacts" / steps[3]["artifact"], flat(digits.x_test))
    assert inp["dtype"] == np.int8
    assert steps[3]["after"]["accuracy"] == pytest.approx(float(np.mean(y.argmax(1) == digits.y_test)))
    assert steps[3]["after"]["accuracy"] >= report["baseline"]["accuracy"] - 0.05


def test_fake_quantized_kernel_has_int8_levels_per_output_channel() -> None:
    from converter.keras_training import fake_quantize_kernel

    kernel = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    kernel[:, 2] = 0.0
    quantized = fake_quantize_kernel(kernel)
    for channel in range(4):
        scale = np.abs(kernel[:, channel]).max() / 127 or 1.0
        levels = quantized[:, channel] / scale
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert np.abs(quantized[:, channel] - kernel[:, channel]).max() <= scale / 2 + 1e-6
    assert np.all(quantized[:, 2] == 0)


def test_keras_teacher_distilled_from_the_cli(tmp_path: Path, keras_mlp: Path) -> None:
    pytest.importorskip("torch", reason="needs the torch extra")
    out = tmp_path / "out"
    rc = edgectl(
        "convert", keras_mlp, "--dataset", "digits", "--distill", "mlp:16", "--distill-epochs", "5",
        "--name", "s", "--version", "1.0.0", "--unsigned", "-o", out,
    )  # fmt: skip
    assert rc == 0
    step = json.loads((out / "report.json").read_text())["steps"][0]
    teacher = step["details"]["teacher"]
    assert teacher["kind"] == "keras" and teacher["parameters"] == 64 * 128 + 128 + 128 * 10 + 10
    assert step["artifact"].endswith(".onnx")
