#!/usr/bin/env python
"""Regenerate the small real-model test fixtures in ``tests/fixtures/models/``.

Trains two tiny digit classifiers ONCE in PyTorch (fixed seed, 2 threads), exports them to ONNX, copies the
same weights into equivalent Keras models and converts those to TFLite (fp32 and full-integer int8).
Every artifact is then evaluated on the digits test split with its real runtime (onnxruntime,
ai_edge_litert) and described in a generated ``FIXTURES.md``.

    .venv/bin/python scripts/make_fixtures.py [--out DIR] [--seed N]

Needs the ``dev`` extra (torch, onnxscript, tensorflow-cpu, onnx, onnxruntime, ai-edge-litert,
scikit-learn). Nothing is downloaded. Exits non-zero if an accuracy target or the ONNX/TFLite
agreement check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Quiet, reproducible, modest on CPU: must be set before numpy/torch/tensorflow are imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PYTHONHASHSEED", "0")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converter.datasets import DigitsSplits, flat, load_digits_splits  # noqa: E402

THREADS = 2
OPSET = 17
MIN_ACC_FP32 = 0.93
MAX_INT8_DROP = 0.02
MAX_FP32_DIFF = 1e-4
EXPECTED_SIGNATURES = {"serving_default": {"inputs": ["input"], "outputs": ["logits"]}}
REGEN_COMMAND = ".venv/bin/python scripts/make_fixtures.py"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "models"


# --------------------------------------------------------------------------------------------- torch


def _torch_models() -> tuple[Any, Any]:
    """Return the (MLP, CNN) torch module classes; torch is imported lazily."""
    import torch
    from torch import nn

    class DigitsMLP(nn.Module):
        """(batch, 64) float32 in [0, 1] -> (batch, 10) logits."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    class DigitsCNN(nn.Module):
        """(batch, 8, 8, 1) NHWC float32 in [0, 1] -> (batch, 10) logits.

        Permutes to NCHW for the convolutions and back to NHWC before flattening, so the dense layer
        sees the same feature order as the Keras twin (which is NHWC throughout).
        """

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
            self.fc = nn.Linear(16 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.permute(0, 3, 1, 2)
            h = torch.relu(self.conv1(h))
            h = torch.max_pool2d(h, 2)
            h = torch.relu(self.conv2(h))
            h = h.permute(0, 2, 3, 1).flatten(1)
            return self.fc(h)

    return DigitsMLP, DigitsCNN


def _train(model: Any, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, lr: float) -> Any:
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model


def train_torch(data: DigitsSplits, seed: int) -> tuple[Any, Any]:
    import torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    mlp_cls, cnn_cls = _torch_models()
    torch.manual_seed(seed)
    mlp = _train(mlp_cls(), flat(data.x_train), data.y_train, seed=seed, epochs=40, lr=5e-3)
    torch.manual_seed(seed)
    cnn = _train(cnn_cls(), data.x_train, data.y_train, seed=seed, epochs=30, lr=5e-3)
    return mlp, cnn


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(x)).numpy(), dtype=np.float32)


def export_onnx(model: Any, example: np.ndarray, path: Path, exporter: str) -> None:
    """Export to ONNX opset 17 with a dynamic batch dimension and io names ``input``/``logits``.

    ``legacy`` (default) is the TorchScript exporter (``dynamo=False``): deprecated since torch 2.9 but
    it writes opset 17 directly. ``dynamo`` works too, but torch 2.13 builds opset 18 and converts it
    down with ONNX's version converter (after warning that onnxscript's converter can't).
    """
    import warnings

    import onnx
    import torch

    args = (torch.from_numpy(example),)
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        # The legacy exporter's DeprecationWarnings and torch.export's FutureWarnings are about the
        # exporters themselves, not this model.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        if exporter == "legacy":
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=True,
                **names,
            )
        else:
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
                **names,
            )
    proto = onnx.load(str(path))
    if exporter == "dynamo":
        # Drop per-node rewriter/stack-trace annotations: noise in a fixture.
        for node in proto.graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain: o.version for o in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise RuntimeError(f"{path.name}: exported opsets {opsets}, wanted {OPSET}")


# ------------------------------------------------------------------------------------- keras/tflite


def _np(t: Any) -> np.ndarray:
    return np.asarray(t.detach().numpy(), dtype=np.float32)


def keras_mlp(torch_mlp: Any) -> Any:
    import keras

    inp = keras.Input(shape=(64,), batch_size=None, name="input", dtype="float32")
    h = keras.layers.Dense(32, activation="relu", name="fc1")(inp)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out, name="digits_mlp")
    model.get_layer("fc1").set_weights([_np(torch_mlp.fc1.weight).T, _np(torch_mlp.fc1.bias)])
    model.get_layer("logits").set_weights([_np(torch_mlp.fc2.weight).T, _np(torch_mlp.fc2.bias)])
    return model


def keras_cnn(torch_cnn: Any) -> Any:
    import keras

    def conv_w(conv: Any) -> list[np.ndarray]:
        # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        return [np.ascontiguousarray(_np(conv.weight).transpose(2, 3, 1, 0)), _np(conv.bias)]

    inp = keras.Input(shape=(8, 8, 1), batch_size=None, name="input", dtype="float32")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out, name="digits_cnn")
    model.get_layer("conv1").set_weights(conv_w(torch_cnn.conv1))
    model.get_layer("conv2").set_weights(conv_w(torch_cnn.conv2))
    model.get_layer("logits").set_weights([_np(torch_cnn.fc.weight).T, _np(torch_cnn.fc.bias)])
    return model


def to_tflite(model: Any, input_shape: tuple[int, ...], calib: np.ndarray | None) -> bytes:
    """Convert a Keras model to TFLite with batch fixed to 1; int8 (in, out and ops) if ``calib`` given.

    Goes through a temporary SavedModel with one ``serving_default`` signature (``input`` -> ``logits``)
    so LiteRT's signature runner sees the same io names as the ONNX file. (``from_concrete_functions``
    with the Keras model as trackable keeps the Keras 3 weights as resource variables: READ_VARIABLE
    ops, no weights in the file and failed calibration; freezing first works but drops the signature
    and takes a deprecated path.)
    """
    import tempfile

    import keras
    import tensorflow as tf

    spec = tf.TensorSpec((1, *input_shape), tf.float32, name="input")

    @tf.function(input_signature=[spec])
    def serve(input: Any) -> dict[str, Any]:
        # The argument name `input` becomes the signature's input key.
        return {"logits": model(input, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    with tempfile.TemporaryDirectory(prefix="make_fixtures_") as tmp:
        archive.write_out(tmp, verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
        if calib is not None:

            def representative() -> Iterator[list[np.ndarray]]:
                for row in calib:
                    yield [row[None, ...].astype(np.float32)]

            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        return bytes(conv.convert())


# ------------------------------------------------------------------------------------------ runtimes


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str]
    dtype: str
    quant: tuple[float, int] | None = None  # (scale, zero_point) for quantized tensors


@dataclass
class Artifact:
    file: str
    kind: str  # onnx | tflite
    precision: str  # fp32 | int8
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    accuracy: float = 0.0
    size: int = 0
    sha256: str = ""


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def onnx_run(path: Path, x: np.ndarray) -> tuple[np.ndarray, list[TensorInfo], list[TensorInfo]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ins = [TensorInfo(i.name, list(i.shape), _ORT_DTYPES.get(i.type, i.type)) for i in sess.get_inputs()]
    outs = [TensorInfo(o.name, list(o.shape), _ORT_DTYPES.get(o.type, o.type)) for o in sess.get_outputs()]
    (logits,) = sess.run(None, {ins[0].name: x})
    return np.asarray(logits, dtype=np.float32), ins, outs


def _tinfo(d: dict[str, Any]) -> TensorInfo:
    scale, zp = d["quantization"]
    quant = (float(scale), int(zp)) if scale else None
    return TensorInfo(d["name"], [int(s) for s in d["shape"]], np.dtype(d["dtype"]).name, quant)


def tflite_run(path: Path, x: np.ndarray) -> tuple[np.ndarray, list[TensorInfo], list[TensorInfo]]:
    """Run sample by sample (batch is fixed to 1); int8 models get quantized input, dequantized output."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=THREADS)
    interp.allocate_tensors()
    (ind,) = interp.get_input_details()
    (outd,) = interp.get_output_details()
    signatures = interp.get_signature_list()
    if signatures != EXPECTED_SIGNATURES:
        raise RuntimeError(f"{path.name}: signatures {signatures}, expected {EXPECTED_SIGNATURES}")
    ins, outs = [_tinfo(ind)], [_tinfo(outd)]
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
    return np.stack(rows), ins, outs


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == y))


# ------------------------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "numpy",
        "torch",
        "onnxscript",
        "onnx",
        "onnxruntime",
        "tensorflow-cpu",
        "keras",
        "ai-edge-litert",
        "scikit-learn",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "(not installed)"
    return out


def _fmt_tensors(ts: list[TensorInfo]) -> str:
    parts = []
    for t in ts:
        shape = "(" + ", ".join(str(s) for s in t.shape) + ")"
        q = f" scale={t.quant[0]:.6g} zp={t.quant[1]}" if t.quant else ""
        parts.append(f"`{t.name}` {shape} {t.dtype}{q}")
    return "<br>".join(parts)


def write_report(out: Path, arts: list[Artifact], checks: dict[str, float], seed: int, exporter: str) -> None:
    command = REGEN_COMMAND
    if seed != 0:
        command += f" --seed {seed}"
    if exporter != "legacy":
        command += f" --exporter {exporter}"
    lines = [
        "# Model fixtures (generated — do not edit)",
        "",
        f"Regenerated with `{command}` (from the repository root; `--out DIR` writes elsewhere).",
        f"Seed {seed}; {THREADS} threads; ONNX exporter: torch.onnx `{exporter}`.",
        "",
        f"Data: scikit-learn digits via `converter.datasets.load_digits_splits(seed={seed})` — stratified",
        "70/10/20 train/calibration/test split; pixels scaled to [0, 1] (raw value / 16), images NHWC",
        "(N, 8, 8, 1) float32; MLP inputs are the same images flattened row-major to (N, 64)",
        "(`converter.datasets.flat`). Labels are int64 0-9. Outputs are raw logits (no softmax).",
        "",
        "Models (trained once in PyTorch; the ONNX files are `torch.onnx.export` of those modules, the",
        "TFLite files are Keras twins holding the same weights):",
        "- MLP: Dense 64→32 + ReLU → Dense 10.",
        "- CNN: NHWC in; Conv 3×3×8 (same) + ReLU → MaxPool 2 → Conv 3×3×16 (same) + ReLU → flatten (NHWC",
        "  order) → Dense 10. The ONNX graph transposes NHWC→NCHW internally.",
        "",
        "ONNX: opset 17, dynamic batch dimension `batch`. TFLite: batch dimension fixed to 1 (run one",
        "sample per `invoke`); each file has one signature `serving_default` with input key `input` and",
        "output key `logits` (the tensor names in the table are the converter's). `*_int8.tflite` are",
        "full-integer (int8 ops, int8 input and int8 output): quantize inputs with",
        "`q = clip(round(x / scale + zp), -128, 127)` and dequantize outputs with `(q - zp) * scale`.",
        "Calibration used the 180-sample calibration split.",
        "",
        f"`golden_mlp.npz` is an acceptance set for `mlp.onnx`: the first {GOLDEN_SAMPLES} test samples",
        "flattened to (N, 64) (`inputs`), their `labels`, and `mlp.onnx`'s logits (`reference`), written",
        "reproducibly by `edgeagent.bundle.save_golden`. `labels.txt` names the classes 0-9.",
        "",
        "Accuracy is measured on the 360-sample test split with the real runtime (onnxruntime,",
        "ai_edge_litert.interpreter).",
        "",
        "| file | bytes | sha256 | input | output | test accuracy |",
        "|---|---:|---|---|---|---:|",
    ]
    for a in arts:
        lines.append(
            f"| `{a.file}` | {a.size} | `{a.sha256}` | {_fmt_tensors(a.inputs)} | "
            f"{_fmt_tensors(a.outputs)} | {a.accuracy:.4f} |"
        )
    lines += ["", "Cross-checks (max |Δlogit| over the whole test split):", ""]
    lines += [f"- {k}: {v:.3g}" for k, v in checks.items()]
    lines += ["", "Library versions:", ""]
    lines += [f"- {k} {v}" for k, v in _versions().items()]
    lines.append("")
    (out / "FIXTURES.md").write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------- main


def _finish(out: Path, art: Artifact) -> Artifact:
    data = (out / art.file).read_bytes()
    art.size = len(data)
    art.sha256 = hashlib.sha256(data).hexdigest()
    return art


GOLDEN_SAMPLES = 100
DEMO_MODEL = Path(__file__).resolve().parents[1] / "fleet" / "assets" / "digits_mlp.onnx"


def write_golden(out: Path, inputs: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> None:
    """golden_mlp.npz (first test samples, labels, mlp.onnx logits) and labels.txt for the demo."""
    from edgeagent.bundle.golden import UNNAMED, GoldenSet, save_golden

    # Unnamed (the legacy 'inputs'/'reference' keys): the committed file stays byte-identical.
    save_golden(
        out / "golden_mlp.npz",
        GoldenSet(
            {UNNAMED: inputs.astype(np.float32)},
            labels.astype(np.int64),
            {UNNAMED: reference.astype(np.float32)},
        ),
    )
    (out / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)), encoding="utf-8")
    print(f"wrote {out / 'golden_mlp.npz'} ({len(inputs)} samples) and {out / 'labels.txt'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and training (default 0)")
    parser.add_argument(
        "--exporter",
        choices=("legacy", "dynamo"),
        default="legacy",
        help="torch.onnx exporter (default %(default)s: writes opset 17 directly)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits_splits(seed=args.seed)
    x_test, y_test = data.x_test, data.y_test
    print(f"digits: train {len(data.x_train)}, calibration {len(data.x_calib)}, test {len(x_test)}")

    # 1. train once in torch, export ONNX
    mlp, cnn = train_torch(data, args.seed)
    nets: dict[str, tuple[Any, Callable[[np.ndarray], np.ndarray], tuple[int, ...]]] = {
        "mlp": (mlp, flat, (64,)),
        "cnn": (cnn, lambda a: a, (8, 8, 1)),
    }
    ref: dict[str, np.ndarray] = {}
    for name, (net, prep, _) in nets.items():
        ref[name] = torch_logits(net, prep(x_test))
        print(f"torch {name}: test accuracy {accuracy(ref[name], y_test):.4f}")
        export_onnx(net, prep(x_test[:2]), out / f"{name}.onnx", args.exporter)

    # 2. Keras twins with the same weights -> TFLite fp32 and int8
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.random.set_seed(args.seed)
    builders = {"mlp": keras_mlp, "cnn": keras_cnn}
    for name, (net, prep, shape) in nets.items():
        kmodel = builders[name](net)
        kdiff = float(np.max(np.abs(np.asarray(kmodel(prep(x_test), training=False)) - ref[name])))
        print(f"keras {name}: max |logit - torch| {kdiff:.3g}")
        (out / f"{name}.tflite").write_bytes(to_tflite(kmodel, shape, None))
        (out / f"{name}_int8.tflite").write_bytes(to_tflite(kmodel, shape, prep(data.x_calib)))

    # 3. evaluate every artifact with its real runtime
    arts: list[Artifact] = []
    logits: dict[str, np.ndarray] = {}
    for name, (_, prep, _) in nets.items():
        for file, kind, prec in (
            (f"{name}.onnx", "onnx", "fp32"),
            (f"{name}.tflite", "tflite", "fp32"),
            (f"{name}_int8.tflite", "tflite", "int8"),
        ):
            run = onnx_run if kind == "onnx" else tflite_run
            lg, ins, outs = run(out / file, prep(x_test))
            logits[file] = lg
            arts.append(_finish(out, Artifact(file, kind, prec, ins, outs, accuracy(lg, y_test))))

    checks: dict[str, float] = {}
    for name in nets:
        checks[f"{name}.onnx vs torch"] = float(np.max(np.abs(logits[f"{name}.onnx"] - ref[name])))
        checks[f"{name}.tflite vs {name}.onnx"] = float(
            np.max(np.abs(logits[f"{name}.tflite"] - logits[f"{name}.onnx"]))
        )
    write_report(out, arts, checks, args.seed, args.exporter)
    n = GOLDEN_SAMPLES
    write_golden(out, flat(x_test[:n]), y_test[:n], logits["mlp.onnx"][:n])
    if out == DEFAULT_OUT:
        # `edgectl demo` starts from this model; it ships inside the package.
        shutil.copyfile(out / "mlp.onnx", DEMO_MODEL)
        print(f"copied mlp.onnx to {DEMO_MODEL}")

    # 4. print the table and enforce the targets
    print()
    print(f"{'file':<20} {'bytes':>8} {'accuracy':>9}  sha256")
    for a in arts:
        print(f"{a.file:<20} {a.size:>8} {a.accuracy:>9.4f}  {a.sha256[:16]}")
    for k, v in checks.items():
        print(f"max |Δlogit| {k}: {v:.3g}")
    print(f"wrote {out / 'FIXTURES.md'}")

    failures = []
    acc = {a.file: a.accuracy for a in arts}
    for name in nets:
        for f in (f"{name}.onnx", f"{name}.tflite"):
            if acc[f] < MIN_ACC_FP32:
                failures.append(f"{f}: accuracy {acc[f]:.4f} < {MIN_ACC_FP32}")
        drop = acc[f"{name}.tflite"] - acc[f"{name}_int8.tflite"]
        if drop > MAX_INT8_DROP:
            failures.append(f"{name}_int8.tflite: accuracy drop {drop:.4f} > {MAX_INT8_DROP}")
    failures += [f"{k}: {v:.3g} > {MAX_FP32_DIFF}" for k, v in checks.items() if v > MAX_FP32_DIFF]
    for a in arts:
        if a.size >= 200_000:
            failures.append(f"{a.file}: {a.size} bytes is too big for a fixture")
    for msg in failures:
        print(f"FAILED: {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
