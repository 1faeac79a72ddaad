"""``tflite`` (needs the tensorflow extra): Keras or SavedModel -> TFLite.

Modes: ``fp32``; ``dynamic`` (dynamic-range: int8 weights, float activations); ``fp16``
(float16 weights); ``int8`` (full integer: int8 ops, activation ranges from a representative
dataset drawn from the calibration data, optionally int8 input and output).

Keras 3 models go through a temporary SavedModel with one ``serving_default`` signature
(``keras.export.ExportArchive``): ``TFLiteConverter.from_keras_model`` on Keras 3 keeps the
weights as resource variables and calibration then fails.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from converter import extras
from converter.errors import ModelLoadError, PassFailed, RecipeError
from converter.feeds import single
from converter.model import ModelArtifact, ModelKind, check_one_input, load_keras
from converter.passes.base import Pass, PassConfig, PassOutput
from converter.runners import fit_inputs
from edgeagent.storage import atomic_write_bytes

TfliteMode = Literal["fp32", "dynamic", "fp16", "int8"]


class TfliteConfig(PassConfig):
    mode: TfliteMode = Field(
        default="int8",
        description="'fp32'; 'dynamic' (int8 weights, float activations); 'fp16' (float16 weights); "
        "'int8' (full integer, calibrated on the calibration data).",
    )
    int8_io: bool = Field(
        default=True,
        description="mode='int8': int8 input and output tensors (what integer-only accelerators need); "
        "false keeps float32 input/output with quantize/dequantize ops inside.",
    )
    batch_size: int = Field(default=1, ge=1, description="Fixed batch dimension of the artifact.")
    sparse: bool = Field(
        default=False,
        description="Store mostly-zero (pruned) weights in TFLite's sparse format (the converter's "
        "EXPERIMENTAL_SPARSITY): a smaller file. LiteRT densifies them when it loads the model, "
        "except in the MobileNet-shaped subgraphs XNNPACK's sparse inference takes (docs/converter.md).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TfliteConfig:
        if self.mode != "int8" and not self.int8_io:
            raise ValueError("int8_io applies to mode='int8' only")
        return self


class TflitePass(Pass[TfliteConfig]):
    name = "tflite"
    config_class = TfliteConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"keras", "savedmodel"})
    produces: ClassVar[ModelKind | None] = "tflite"

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        tf = extras.tensorflow()
        suffix = "" if self.config.mode == "fp32" else f"-{self.config.mode}"
        out = out_dir / f"{model.stem}{suffix}.tflite"
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tflite-") as tmp:
            if model.kind == "keras":
                saved, sample_shape = self._export_keras(model.path, Path(tmp) / "saved")
            else:
                saved, sample_shape = model.path, None
            try:
                converter = tf.lite.TFLiteConverter.from_saved_model(
                    str(saved), signature_keys=["serving_default"]
                )
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(
                    f"{model.path}: TensorFlow cannot read it ({exc})", path=str(model.path)
                ) from exc
            self._configure(tf, converter, sample_shape)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    flat = bytes(converter.convert())
            except (RecipeError, PassFailed):
                raise
            except Exception as exc:  # the converter raises ConverterError/RuntimeError from MLIR
                raise PassFailed(f"TFLite conversion failed ({exc})", pass_name=self.name) from exc
        atomic_write_bytes(out, flat)
        return PassOutput(model=ModelArtifact(out, "tflite"), notes=f"TFLite {self.config.mode}")

    def _export_keras(self, source: Path, saved: Path) -> tuple[Path, tuple[int, ...]]:
        tf = extras.tensorflow()
        keras = extras.require("keras")
        net = load_keras(source)
        check_one_input(source, len(net.inputs))
        dims = net.inputs[0].shape[1:]
        if any(d is None for d in dims):
            raise ModelLoadError(f"{source}: input shape {list(dims)} must be fixed apart from the batch")
        sample_shape = tuple(int(d) for d in dims)
        spec = tf.TensorSpec((self.config.batch_size, *sample_shape), tf.float32, name="input")

        @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator, unused-ignore]
        def serve(input: Any) -> dict[str, Any]:
            return {"output": net(input, training=False)}

        archive = keras.export.ExportArchive()
        archive.track(net)
        archive.add_endpoint("serving_default", serve)
        archive.write_out(str(saved), verbose=False)
        return saved, sample_shape

    def _configure(self, tf: Any, converter: Any, sample_shape: tuple[int, ...] | None) -> None:
        mode = self.config.mode
        sparsity = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if self.config.sparse else []
        converter.optimizations = sparsity
        if mode == "fp32":
            return
        converter.optimizations = [tf.lite.Optimize.DEFAULT, *sparsity]
        if mode == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if mode != "int8":
            return
        data = self.context.data
        if data is None or data.calib is None:
            raise RecipeError(
                "full-int8 TFLite needs calibration data: --calib FILE.npz (array 'x') or --dataset digits",
                where="tflite",
            )
        only = np.asarray(single(data.calib, "the tflite pass"), dtype=np.float32)
        calib = only if sample_shape is None else fit_inputs(only, sample_shape)
        batch = self.config.batch_size

        def representative() -> Iterator[list[np.ndarray[Any, Any]]]:
            for i in range(0, len(calib) - batch + 1, batch):
                yield [calib[i : i + batch].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if self.config.int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
