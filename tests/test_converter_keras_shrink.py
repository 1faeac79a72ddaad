"""Keras -> TFLite compression on LiteRT: ``--sparse`` (TFLite's sparse format) and ``--structured``.

The file must shrink with the sparsity and LiteRT must compute what the dense model computes
(fp32, so to float rounding): the sparse tensors are densified when LiteRT loads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import flat
from edgeagent.cli.common import build_parser, run
from fleet.edgectl import COMMANDS, DESCRIPTION
from tests.lazy_imports import needs

pytestmark = [
    pytest.mark.tensorflow,
    needs("tensorflow", "needs the tensorflow extra: pip install 'edgeagent[tensorflow]'"),
]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
litert = pytest.importorskip("ai_edge_litert.interpreter", reason="needs the litert extra")


def litert_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = litert.Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None].astype(np.float32))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(rows)


def test_sparse_tflite_is_smaller_and_computes_the_same(tmp_path: Path, digits: Any) -> None:
    from converter import extras

    extras.tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)]
    )
    source = tmp_path / "mlp.keras"
    model.save(source)
    outs = {}
    for name, extra in (("dense", []), ("sparse", ["--sparse"])):
        rc = run(build_parser("edgectl", DESCRIPTION, COMMANDS), [
            "convert", str(source), "--dataset", "digits", "--prune", "0.9", *extra, "--name", "m",
            "--version", "1.0.0", "--unsigned", "-o", str(tmp_path / name)])  # fmt: skip
        assert rc == 0
        outs[name] = next((tmp_path / name / "artifacts").glob("*.tflite"))
    assert outs["sparse"].stat().st_size < outs["dense"].stat().st_size / 3
    x = flat(digits.x_test[:32])
    np.testing.assert_allclose(litert_outputs(outs["sparse"], x), litert_outputs(outs["dense"], x), atol=1e-4)


def keras_cnn(path: Path, dead: bool) -> Path:
    """Conv2D(8) -> ReLU -> MaxPool -> Conv2D(8) -> BatchNorm -> ReLU -> Flatten -> Dense(16) -> Dense(10),
    with (``dead``) the odd filters/units zero, so removing them changes nothing."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10),
    ])  # fmt: skip
    for layer in model.layers:
        values = layer.get_weights()
        if dead and type(layer).__name__ in ("Conv2D", "Dense") and layer is not model.layers[-1]:
            values[0][..., 1::2] = 0.0
            values[1][1::2] = 0.0
        if type(layer).__name__ == "BatchNormalization":  # beta 0 keeps a dead channel at 0
            values = [np.full_like(values[0], 1.5), np.zeros_like(values[1]), values[2], values[3] + 1.0]
        layer.set_weights(values)
    model.save(path)
    return path


def test_structured_keras_then_tflite_computes_the_same_on_litert(tmp_path: Path, digits: Any) -> None:
    from converter import extras

    extras.tensorflow()
    source = keras_cnn(tmp_path / "cnn.keras", dead=True)
    outs = {}
    for name, extra in (("full", []), ("pruned", ["--structured", "0.5"])):
        rc = run(build_parser("edgectl", DESCRIPTION, COMMANDS), [
            "convert", str(source), "--dataset", "digits", *extra, "--tflite", "--name", "m",
            "--version", "1.0.0", "--unsigned", "-o", str(tmp_path / name)])  # fmt: skip
        assert rc == 0
        outs[name] = next((tmp_path / name / "artifacts").glob("*.tflite"))
    assert outs["pruned"].stat().st_size < outs["full"].stat().st_size / 2
    x = digits.x_test[:32]
    np.testing.assert_allclose(litert_outputs(outs["pruned"], x), litert_outputs(outs["full"], x), atol=1e-4)


def test_structured_keras_refuses_what_it_cannot_cut(tmp_path: Path) -> None:
    from converter import extras
    from converter.errors import PassFailed
    from converter.model import ModelArtifact
    from converter.passes.structured import StructuredConfig, StructuredPass

    extras.tensorflow()
    import keras

    only = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    only.save(tmp_path / "one.keras")
    with pytest.raises(PassFailed, match=r"no layer can lose channels.*model's output"):
        StructuredPass(StructuredConfig(fraction=0.5)).run(
            ModelArtifact(tmp_path / "one.keras", "keras"), tmp_path
        )
