"""A TFLite model with float16 weights is served on every profile whose runtime can run it.

MediaPipe ships its face models this way, and before the fix 9 of the 10 profiles refused
such a bundle (``no runtime can serve ... the bundle has no tflite fp32 artifact``): only
rpi5 listed a LiteRT candidate that loads an fp16 artifact. LiteRT dequantizes fp16
weights to fp32 when it loads them on the CPU (XNNPACK), so every profile with a LiteRT
CPU candidate can serve it. The model is built here with TensorFlow
(``target_spec.supported_types = [tf.float16]``) from a tiny seeded Keras model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.profile import list_profiles, load_profile, resolve_candidates
from edgeagent.bundle import AcceptanceGate
from edgeagent.client import Client
from edgeagent.selection import select_runtime
from edgeagent.serving import InferenceServer
from edgeagent.serving.loader import prepare_served_model
from tests.runtimes_support import extract, make_bundle, write_golden

pytestmark = pytest.mark.tensorflow
pytest.importorskip("tensorflow", reason="needs the tensorflow extra: pip install 'edgeagent[tensorflow]'")
litert = pytest.importorskip("ai_edge_litert.interpreter", reason="needs the litert extra")

SAMPLES = 40
FEATURES = 16
# The host board a coral-usb accessory sits on in these tests (this machine is x86-64).
HOST = "generic-x86_64"


def _tiny_tflite(folder: Path) -> tuple[Path, Path, Any]:
    """(fp16-weight .tflite, fp32 .tflite, the Keras model) of a seeded 16 -> 32 -> 4 MLP."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(FEATURES,), batch_size=1, name="input")
    hidden = keras.layers.Dense(32, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(4)(hidden))
    paths = []
    for name, fp16 in (("tiny_fp16.tflite", True), ("tiny.tflite", False)):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if fp16:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        paths.append(folder / name)
        paths[-1].write_bytes(bytes(converter.convert()))
    return paths[0], paths[1], model


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, keypair):  # type: ignore[no-untyped-def]
    """An extracted, verified bundle whose only model is the fp16-weight TFLite file."""
    root = tmp_path_factory.mktemp("fp16")
    fp16, _, model = _tiny_tflite(root)
    x = np.random.default_rng(0).normal(size=(SAMPLES, FEATURES)).astype(np.float32)
    reference = np.asarray(model.predict(x, verbose=0), np.float32)
    golden = write_golden(root / "golden.npz", {"inputs": x, "reference": reference})
    created = make_bundle(
        root / "out", keypair, [fp16], golden, name="tiny16", gate=AcceptanceGate(min_top1_agreement=0.9)
    )
    verified = extract(created, root / "bundle", keypair)
    return root / "bundle", verified, x


def test_the_fixture_is_an_fp16_weight_model(fp16_bundle) -> None:  # type: ignore[no-untyped-def]
    _, verified, _ = fp16_bundle
    (entry,) = verified.manifest.models
    assert (entry.format, entry.precision) == ("tflite", "fp16")
    assert entry.inputs[0].dtype == "float32"  # fp16 weights, fp32 inputs: the MediaPipe shape


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_with_litert_serves_fp16_weights(fp16_bundle, name: str) -> None:  # type: ignore[no-untyped-def]
    folder, verified, _ = fp16_bundle
    profile = load_profile(name)
    candidates = resolve_candidates(profile, load_profile(HOST) if profile.accessory else None)
    assert any(c.runtime == "litert" and c.delegate == "xnnpack" for c in candidates)
    selection = select_runtime(folder, verified.manifest, candidates, profile=name)
    try:
        chosen = selection.decision.chosen
        assert chosen is not None
        assert (chosen.runtime, chosen.delegate, chosen.precision) == ("litert", "xnnpack", "fp32")
        assert chosen.candidate == "litert/xnnpack/fp32 (from fp16)"
    finally:
        selection.model.close()


def test_served_outputs_equal_the_bare_runtime(fp16_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, verified, x = fp16_bundle
    candidates = list(load_profile("rpi4").candidates)
    served = prepare_served_model(folder, verified.manifest, candidates, profile="rpi4")
    with InferenceServer(tmp_path / "agent.sock") as server:
        server.activate(served)
        with Client(server.socket_path) as client:
            outputs = np.concatenate([client.predict(row[None]).output for row in x])
    interpreter = litert.Interpreter(model_path=str(folder / verified.manifest.models[0].path), num_threads=4)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    bare = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None])
        interpreter.invoke()
        bare.append(interpreter.get_tensor(out["index"]).copy())
    np.testing.assert_array_equal(outputs, np.concatenate(bare))
