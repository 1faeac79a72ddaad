"""Runtime adapters on the real fixture models: ORT and LiteRT, fp32 and int8, quantized I/O,
batching, input validation, and recorded fallbacks for delegates/providers that are absent."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from converter.datasets import flat
from edgeagent.errors import InferenceError, InputError, ModelLoadError, UsageError
from edgeagent.runtimes import ADAPTERS, LoadOptions, get_adapter, load_model
from edgeagent.runtimes.ort import CPU, dropped_providers

ORT_CPU = LoadOptions(delegate=CPU, threads=1)
XNNPACK = LoadOptions(delegate="xnnpack", threads=1)


@pytest.fixture(scope="module")
def samples(digits):  # type: ignore[no-untyped-def]
    images = digits.x_test[:40].astype(np.float32)
    return {"images": images, "flat": flat(images).astype(np.float32), "labels": digits.y_test[:40]}


@pytest.fixture(scope="module")
def reference(model_dir: Path, samples):  # type: ignore[no-untyped-def]
    """fp32 ONNX logits for the mlp (flat) and cnn (images)."""
    out = {}
    for name, key in (("mlp", "flat"), ("cnn", "images")):
        model = load_model(model_dir / f"{name}.onnx", "onnxruntime", ORT_CPU)
        out[name] = model.predict(samples[key])[0]
        model.close()
    return out


def test_every_registered_adapter_imports() -> None:
    for name, target in ADAPTERS.items():
        module_name, _, class_name = target.partition(":")
        adapter = getattr(importlib.import_module(module_name), class_name)()
        assert adapter.name == name
        assert adapter.unavailable_reason() is None  # both runtimes are installed here
    with pytest.raises(UsageError, match="unknown runtime"):
        get_adapter("tensorrt-direct")


@pytest.mark.parametrize(
    ("file", "runtime", "key", "precision", "max_abs", "min_agreement"),
    [
        ("mlp.onnx", "onnxruntime", "flat", "fp32", 1e-5, 1.0),
        ("cnn.onnx", "onnxruntime", "images", "fp32", 1e-5, 1.0),
        ("mlp.tflite", "litert", "flat", "fp32", 1e-4, 1.0),
        ("cnn.tflite", "litert", "images", "fp32", 1e-4, 1.0),
        ("mlp_int8.tflite", "litert", "flat", "int8", None, 0.9),
        ("cnn_int8.tflite", "litert", "images", "int8", None, 0.9),
    ],
)
def test_fixture_models_match_the_fp32_reference(  # type: ignore[no-untyped-def]
    model_dir, samples, reference, file, runtime, key, precision, max_abs, min_agreement
) -> None:
    options = ORT_CPU if runtime == "onnxruntime" else XNNPACK
    model = load_model(model_dir / file, runtime, options, precision=precision)
    try:
        assert model.fallbacks == ()
        assert model.delegate == options.delegate
        out = model.predict(samples[key])[0]  # a batch of 40, also on batch-1 TFLite models
        ref = reference[file.split("_")[0].split(".")[0]]
        assert out.shape == ref.shape and out.dtype == np.float32  # int8 outputs come back dequantized
        if max_abs is not None:
            assert np.abs(out - ref).max() < max_abs
        assert np.mean(out.argmax(1) == ref.argmax(1)) >= min_agreement
    finally:
        model.close()


def test_quantized_io_uses_the_models_scale_and_zero_point(model_dir: Path, samples) -> None:  # type: ignore[no-untyped-def]
    model = load_model(model_dir / "mlp_int8.tflite", "litert", XNNPACK, precision="int8")
    (spec,) = model.inputs
    assert spec.dtype == "int8" and spec.quantization is not None
    scale, zp = spec.quantization.scale[0], spec.quantization.zero_point[0]
    x = samples["flat"][:5]
    q = np.clip(np.round(x / scale + zp), -128, 127).astype(np.int8)
    raw_out = model.predict(q, raw=True)[0]
    assert raw_out.dtype == np.int8
    out_q = model.outputs[0].quantization
    assert out_q is not None
    expected = (raw_out.astype(np.float32) - out_q.zero_point[0]) * out_q.scale[0]
    np.testing.assert_allclose(model.predict(x)[0], expected, rtol=1e-6)
    assert model.caller_dtype(spec.name) == np.float32
    assert model.caller_dtype(spec.name, raw=True) == np.int8
    model.close()


def test_one_sample_without_a_batch_dimension(model_dir: Path, samples) -> None:  # type: ignore[no-untyped-def]
    model = load_model(model_dir / "cnn.onnx", "onnxruntime", ORT_CPU)
    one = model.predict(samples["images"][0])[0]
    assert one.shape == (1, 10)
    np.testing.assert_allclose(one[0], model.predict(samples["images"][:1])[0][0], rtol=1e-6)
    model.close()


@pytest.mark.parametrize(
    ("feeds", "raw", "code"),
    [
        (np.zeros((1, 63), np.float32), False, "bad_shape"),
        (np.zeros((2, 8, 8), np.float32), False, "bad_shape"),
        (np.zeros((1, 64), np.complex64), False, "bad_dtype"),
        (np.array([["a"] * 64]), False, "bad_dtype"),
        (np.zeros((1, 64), np.float32), True, "bad_dtype"),  # raw wants int8, not float
        (np.full((1, 64), 300, np.int64), True, "bad_value"),
        ({"nope": np.zeros((1, 64), np.float32)}, False, "unknown_input"),
        ({}, False, "missing_input"),
        (np.zeros((0, 64), np.float32), False, "bad_shape"),
        ([[1.0, 2.0], [3.0]], False, "bad_shape"),
    ],
)
def test_inputs_that_do_not_fit_are_refused_with_a_code(model_dir: Path, feeds, raw, code) -> None:  # type: ignore[no-untyped-def]
    model = load_model(model_dir / "mlp_int8.tflite", "litert", XNNPACK, precision="int8")
    with pytest.raises(InputError) as info:
        model.predict(feeds, raw=raw)
    assert info.value.code == code
    model.close()


def test_requested_but_absent_ort_provider_is_a_recorded_fallback(model_dir: Path) -> None:
    model = load_model(model_dir / "mlp.onnx", "onnxruntime", LoadOptions(delegate="CUDAExecutionProvider"))
    assert model.delegate == CPU
    (fallback,) = model.fallbacks
    assert (fallback.requested, fallback.used) == ("CUDAExecutionProvider", CPU)
    assert "not in this onnxruntime build" in fallback.reason
    assert model.predict(np.zeros((1, 64), np.float32))[0].shape == (1, 10)  # still serves, on the CPU
    model.close()


def test_provider_dropped_silently_at_session_creation_is_detected() -> None:
    # What ORT does when CUDA is compiled in but libcudart is missing: the session just lacks it.
    (fallback,) = dropped_providers(["CUDAExecutionProvider", CPU], [CPU])
    assert fallback.requested == "CUDAExecutionProvider" and fallback.used == CPU
    assert "dropped it" in fallback.reason
    assert dropped_providers([CPU], [CPU]) == []


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (LoadOptions(delegate="edgetpu"), "libedgetpu.so.1"),
        (LoadOptions(delegate="gpu"), "libtensorflowlite_gpu_delegate.so"),
        (
            LoadOptions(delegate="external", delegate_library=Path("/nonexistent/libvendor.so")),
            "does not load",
        ),
        (LoadOptions(delegate="external", delegate_library=Path("libc.so.6")), "not a TFLite delegate"),
        (LoadOptions(delegate="external"), "needs delegate_library"),
        (LoadOptions(delegate="hexagon"), "unknown LiteRT delegate"),
    ],
)
def test_missing_delegate_library_is_a_recorded_fallback(model_dir: Path, options, needle) -> None:  # type: ignore[no-untyped-def]
    model = load_model(model_dir / "mlp_int8.tflite", "litert", options, precision="int8")
    assert model.delegate == "xnnpack"
    (fallback,) = model.fallbacks
    assert fallback.requested == options.delegate and fallback.used == "xnnpack"
    assert needle in fallback.reason
    assert model.predict(np.zeros((1, 64), np.float32))[0].shape == (1, 10)
    model.close()


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_closed_session_refuses_to_run(model_dir: Path, runtime: str) -> None:
    path = model_dir / ("mlp.onnx" if runtime == "onnxruntime" else "mlp.tflite")
    model = load_model(path, runtime, ORT_CPU if runtime == "onnxruntime" else XNNPACK)
    model.close()
    with pytest.raises(InferenceError, match="closed"):
        model.predict(np.zeros((1, 64), np.float32))


@pytest.mark.parametrize(("suffix", "runtime"), [(".onnx", "onnxruntime"), (".tflite", "litert")])
def test_corrupt_model_file_is_a_load_error(tmp_path: Path, suffix: str, runtime: str) -> None:
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(ModelLoadError, match="cannot load it"):
        load_model(bad, runtime, ORT_CPU if runtime == "onnxruntime" else XNNPACK)


def test_session_options_are_typed_and_mapped_once() -> None:
    from edgeagent.runtimes.ort import provider_options, session_options

    so = session_options(LoadOptions(delegate=CPU, threads=3, graph_optimization="basic"))
    assert so.intra_op_num_threads == 3
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    trt = provider_options(LoadOptions(delegate="TensorrtExecutionProvider", precision="fp16"))
    assert trt["trt_fp16_enable"] == "True" and trt["trt_int8_enable"] == "False"
    assert provider_options(ORT_CPU) == {}
