"""The committed model fixtures in tests/fixtures/models/ load and behave as FIXTURES.md documents.

These tests only read the files (regenerate them with ``.venv/bin/python scripts/make_fixtures.py``);
they use the real device runtimes and never import tensorflow or torch.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import DigitsSplits, flat, load_digits_splits

FIXTURES = Path(__file__).parent / "fixtures" / "models"
THREADS = 2
MIN_ACCURACY = 0.90
MAX_INT8_DROP = 0.02
AGREE_SAMPLES = 50
AGREE_ATOL = 1e-3

ONNX_FILES = ["mlp.onnx", "cnn.onnx"]
TFLITE_FP32 = ["mlp.tflite", "cnn.tflite"]
TFLITE_INT8 = ["mlp_int8.tflite", "cnn_int8.tflite"]
ALL_FILES = ONNX_FILES + TFLITE_FP32 + TFLITE_INT8

# Per-sample input shape (without batch) of each model family.
SAMPLE_SHAPE = {"mlp": (64,), "cnn": (8, 8, 1)}


def _family(file: str) -> str:
    return file.split(".")[0].split("_")[0]


def _prep(file: str, x: np.ndarray) -> np.ndarray:
    return flat(x) if _family(file) == "mlp" else x


@pytest.fixture(scope="module")
def digits() -> DigitsSplits:
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install 'edgeagent[host]'")
    return load_digits_splits(seed=0)


@functools.cache
def _ort_session(file: str) -> Any:
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime: pip install 'edgeagent[onnx]'")
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(FIXTURES / file), so, providers=["CPUExecutionProvider"])


def _interpreter(file: str) -> Any:
    litert = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="needs ai-edge-litert: pip install 'edgeagent[litert]'"
    )
    interp = litert.Interpreter(model_path=str(FIXTURES / file), num_threads=THREADS)
    interp.allocate_tensors()
    return interp


def run_onnx(file: str, x: np.ndarray) -> np.ndarray:
    sess = _ort_session(file)
    (logits,) = sess.run(["logits"], {"input": x.astype(np.float32)})
    return np.asarray(logits, dtype=np.float32)


def run_tflite(file: str, x: np.ndarray) -> np.ndarray:
    """Float logits for float input ``x`` (N, ...); batch is fixed to 1, so one invoke per sample."""
    interp = _interpreter(file)
    (ind,) = interp.get_input_details()
    (outd,) = interp.get_output_details()
    rows = []
    for sample in x:
        inp = sample[None, ...].astype(np.float32)
        if ind["dtype"] == np.int8:
            scale, zp = ind["quantization"]
            inp = np.clip(np.round(inp / scale + zp), -128, 127).astype(np.int8)
        interp.set_tensor(ind["index"], inp)
        interp.invoke()
        out = interp.get_tensor(outd["index"])
        if outd["dtype"] == np.int8:
            scale, zp = outd["quantization"]
            out = (out.astype(np.float32) - zp) * scale
        rows.append(np.asarray(out, dtype=np.float32)[0])
    return np.stack(rows)


def run(file: str, x: np.ndarray) -> np.ndarray:
    x = _prep(file, x)
    return run_onnx(file, x) if file.endswith(".onnx") else run_tflite(file, x)


@functools.cache
def _test_accuracy(file: str) -> float:
    data = load_digits_splits(seed=0)
    logits = run(file, data.x_test)
    return float(np.mean(np.argmax(logits, axis=1) == data.y_test))


# ------------------------------------------------------------------------------------------- files


def test_all_fixtures_present_and_small() -> None:
    for file in [*ALL_FILES, "FIXTURES.md"]:
        path = FIXTURES / file
        assert path.is_file(), f"{path} missing: run .venv/bin/python scripts/make_fixtures.py"
        assert path.stat().st_size < 200_000


def test_fixtures_md_matches_files() -> None:
    """FIXTURES.md is generated with the files; its sizes and sha256 must still describe them."""
    text = (FIXTURES / "FIXTURES.md").read_text(encoding="utf-8")
    rows = {
        m[0]: (int(m[1]), m[2])
        for m in re.findall(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|", text, re.M)
    }
    assert sorted(rows) == sorted(ALL_FILES)
    for file, (size, sha) in rows.items():
        data = (FIXTURES / file).read_bytes()
        assert len(data) == size, file
        assert hashlib.sha256(data).hexdigest() == sha, file
    assert ".venv/bin/python scripts/make_fixtures.py" in text


# -------------------------------------------------------------------------------------- interfaces


@pytest.mark.parametrize("file", ONNX_FILES)
def test_onnx_io(file: str) -> None:
    sess = _ort_session(file)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert inp.name == "input"
    assert inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str), "batch dimension must be dynamic"
    assert tuple(inp.shape[1:]) == SAMPLE_SHAPE[_family(file)]
    assert out.name == "logits"
    assert out.type == "tensor(float)"
    assert isinstance(out.shape[0], str)
    assert out.shape[1:] == [10]
    # The dynamic batch really works: 1 and 7 samples.
    for n in (1, 7):
        logits = run_onnx(file, np.zeros((n, *SAMPLE_SHAPE[_family(file)]), np.float32))
        assert logits.shape == (n, 10)


@pytest.mark.parametrize("file", TFLITE_FP32 + TFLITE_INT8)
def test_tflite_io(file: str) -> None:
    interp = _interpreter(file)
    (ind,) = interp.get_input_details()
    (outd,) = interp.get_output_details()
    want = np.int8 if file in TFLITE_INT8 else np.float32
    assert tuple(ind["shape"]) == (1, *SAMPLE_SHAPE[_family(file)])
    assert tuple(outd["shape"]) == (1, 10)
    assert ind["dtype"] == want
    assert outd["dtype"] == want
    assert interp.get_signature_list() == {"serving_default": {"inputs": ["input"], "outputs": ["logits"]}}
    if want == np.int8:
        for d in (ind, outd):
            scale, zp = d["quantization"]
            assert scale > 0
            assert -128 <= zp <= 127
        # Inputs in [0, 1] must map onto the int8 range without saturating the scale.
        scale, zp = ind["quantization"]
        assert -128 <= round(0 / scale + zp) < round(1 / scale + zp) <= 127
    else:
        assert ind["quantization"] == (0.0, 0)


def test_int8_models_have_only_int8_activations() -> None:
    """Full-integer models: no float32 tensors between the int8 input and the int8 output."""
    for file in TFLITE_INT8:
        interp = _interpreter(file)
        floats = [
            t["name"] for t in interp.get_tensor_details() if t["dtype"] == np.float32 and len(t["shape"]) > 0
        ]
        assert floats == [], f"{file} has float32 tensors: {floats}"


# ---------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("file", ALL_FILES)
def test_accuracy_on_digits_test_split(file: str, digits: DigitsSplits) -> None:
    acc = _test_accuracy(file)
    assert acc >= MIN_ACCURACY, f"{file}: test accuracy {acc:.4f}"


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_int8_close_to_fp32(family: str, digits: DigitsSplits) -> None:
    fp32 = _test_accuracy(f"{family}.tflite")
    int8 = _test_accuracy(f"{family}_int8.tflite")
    assert int8 >= fp32 - MAX_INT8_DROP, f"{family}: int8 {int8:.4f} vs fp32 {fp32:.4f}"


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_onnx_and_tflite_fp32_agree(family: str, digits: DigitsSplits) -> None:
    x = digits.x_test[:AGREE_SAMPLES]
    a = run(f"{family}.onnx", x)
    b = run(f"{family}.tflite", x)
    assert a.shape == b.shape == (AGREE_SAMPLES, 10)
    np.testing.assert_allclose(a, b, rtol=0, atol=AGREE_ATOL)
    assert np.array_equal(np.argmax(a, axis=1), np.argmax(b, axis=1))
