"""``--sparse`` for Keras models: pruned weights in TFLite's sparse format, run by LiteRT.

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
