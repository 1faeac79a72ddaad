"""``quantize`` (ONNX): ONNX Runtime static int8 (QDQ) and dynamic int8, or fp16 weights.

Static quantization calibrates activation ranges on the calibration data with MinMax,
Entropy or Percentile; weights are per-tensor or per-channel. Before quantizing, models
below opset 13 are upgraded (ORT's QDQ and per-channel paths need opset 13) and ORT's
pre-processing (shape inference + graph optimisation, with the fallback chain of
:mod:`converter.passes.preprocess`) runs. The typed options
become ORT's untyped ``extra_options`` in exactly one place, :func:`ort_extra_options`.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from converter import extras
from converter.errors import PassFailed, RecipeError
from converter.feeds import Feeds, fit_feeds, rows, sample, take
from converter.model import ModelArtifact, ModelKind, load_onnx
from converter.passes.base import Pass, PassConfig, PassOutput
from converter.passes.preprocess import prepare
from converter.runners import OnnxRunner

#: ORT's QDQ and per-channel paths need at least this opset.
MIN_OPSET = 13

QuantMode = Literal["static", "dynamic", "fp16"]
#: The CPU class an int8 model is built for. ORT's x86 u8s8 kernels without VNNI (AVX2 alone)
#: add pairs of u8*s8 products in int16 (VPMADDUBSW), which saturates with 8-bit weights: the
#: same model gives logits off by ~1.0 there and ~0.1 on VNNI x86 or ARM (sdot/udot do not).
Int8Target = Literal["portable", "x86-avx2", "x86-vnni", "arm"]
#: Targets whose int8 weights get ORT's 7-bit range (``reduce_range``), which cannot saturate.
SATURATING_TARGETS: frozenset[str] = frozenset({"portable", "x86-avx2"})
Calibration = Literal["minmax", "entropy", "percentile"]
IntType = Literal["int8", "uint8"]


class QuantizeConfig(PassConfig):
    mode: QuantMode = Field(
        default="static",
        description="'static': int8 weights and activations in QDQ format, activation ranges calibrated "
        "on calibration data; 'dynamic': int8 weights, activations quantized at run time; "
        "'fp16': float16 weights (half the size, computed in float32).",
    )
    per_channel: bool = Field(default=False, description="int8 weights with one scale per output channel.")
    calibration: Calibration = Field(
        default="minmax", description="Static mode: how activation ranges are found from calibration data."
    )
    percentile: float = Field(
        default=99.999, gt=0.0, le=100.0, description="calibration='percentile': the percentile of |x| kept."
    )
    activation_type: IntType = Field(default="uint8", description="Static mode: activation integer type.")
    weight_type: IntType = Field(default="int8", description="int8 modes: weight integer type.")
    activation_symmetric: bool = Field(
        default=False, description="Static mode: symmetric activation ranges (zero point 0 / 128)."
    )
    weight_symmetric: bool = Field(
        default=True, description="Symmetric weight ranges (zero point 0 for int8)."
    )
    quantize_bias: bool = Field(
        default=True,
        description="Static mode: store biases as int32 (with their own scales) rather than float32; "
        "false gives a smaller file for models whose biases are a visible part of it.",
    )
    target: Int8Target = Field(
        default="portable",
        description="int8 modes: the CPU class the model will run on. 'portable' (any device) and "
        "'x86-avx2' (x86 without VNNI) store 7-bit weights, which ORT's u8s8 kernels cannot "
        "saturate; 'x86-vnni' and 'arm' keep full 8-bit weights.",
    )
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit weights (ORT's reduce_range); default: chosen by `target`. Forcing false "
        "on a 'portable' or 'x86-avx2' target gives numerics that differ by CPU generation.",
    )
    op_types: list[str] = Field(
        default_factory=list,
        description="Quantize only these op types (e.g. ['MatMul', 'Gemm']); empty = ORT's defaults.",
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names left in float.")
    preprocess: bool = Field(
        default=True,
        description="Run ORT's quant_pre_process (shape inference, graph optimisation such as "
        "BatchNormalization folding) first, falling back to simpler shape inference where it fails.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.mode == "fp16" and (self.per_channel or self.nodes_to_exclude or self.op_types):
            raise ValueError("per_channel, op_types and nodes_to_exclude apply to int8 modes, not fp16")
        if self.mode == "fp16" and (self.target != "portable" or self.reduce_range is not None):
            raise ValueError("target and reduce_range apply to int8 modes, not fp16")
        if self.mode != "static" and (
            self.calibration != "minmax" or self.activation_symmetric or not self.quantize_bias
        ):
            raise ValueError(
                "calibration, activation_symmetric and quantize_bias apply to mode='static' only"
            )
        if self.calibration != "percentile" and self.percentile != 99.999:
            raise ValueError("percentile applies to calibration='percentile' only")
        return self

    @property
    def weights_7bit(self) -> bool:
        """Whether int8 weights use ORT's 7-bit range: explicit ``reduce_range``, else the target's."""
        if self.reduce_range is not None:
            return self.reduce_range
        return self.target in SATURATING_TARGETS

    @property
    def tag(self) -> str:
        """Short file-name tag: 'int8', 'int8pc', 'dynint8', 'fp16'."""
        if self.mode == "fp16":
            return "fp16"
        base = "int8" if self.mode == "static" else "dynint8"
        return base + ("pc" if self.per_channel else "")


def ort_extra_options(config: QuantizeConfig) -> dict[str, Any]:
    """Our typed fields as ORT's ``extra_options`` (the only place that spells its keys)."""
    options: dict[str, Any] = {"WeightSymmetric": config.weight_symmetric}
    if config.mode == "static":
        options["ActivationSymmetric"] = config.activation_symmetric
        options["QuantizeBias"] = config.quantize_bias
        if config.calibration == "percentile":
            options["CalibPercentile"] = config.percentile
    else:
        options["MatMulConstBOnly"] = True
    return options


class QuantizePass(Pass[QuantizeConfig]):
    name = "quantize"
    config_class = QuantizeConfig
    accepts: ClassVar[frozenset[ModelKind]] = frozenset({"onnx"})

    def run(self, model: ModelArtifact, out_dir: Path) -> PassOutput:
        self.check_input(model)
        out = out_dir / f"{model.stem}-{self.config.tag}.onnx"
        if self.config.mode == "fp16":
            converted = convert_weights_fp16(model.path, out)
            return PassOutput(
                model=ModelArtifact(out, "onnx"), notes=f"{converted} weight tensors stored as float16"
            )
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quantize-") as tmp:
            source, notes = self._prepare(model.path, Path(tmp))
            try:
                self._quantize(source, out)
            except (RecipeError, PassFailed):
                raise
            except Exception as exc:  # ORT raises plain RuntimeError/ValueError/onnx errors
                raise PassFailed(f"onnxruntime quantization failed ({exc})", pass_name=self.name) from exc
        return PassOutput(model=ModelArtifact(out, "onnx"), notes="; ".join([self._describe(), *notes]))

    def _describe(self) -> str:
        c = self.config
        weights = "per-channel" if c.per_channel else "per-tensor"
        bits = f"{'7-bit' if c.weights_7bit else '8-bit'} weights for target {c.target}"
        if c.mode == "dynamic":
            return f"dynamic int8, {weights} weights; {bits}"
        data = self.context.data
        samples = rows(data.calib) if data is not None and data.calib is not None else 0
        return f"static int8 QDQ, {weights} weights, {c.calibration} calibration on {samples} samples; {bits}"

    def _prepare(self, source: Path, tmp: Path) -> tuple[Path, list[str]]:
        """Upgrade to opset 13+ and run ORT's pre-processing; returns the file to quantize."""
        onnx = extras.require("onnx")
        notes = []
        graph_model = load_onnx(source)
        opset = next((o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < MIN_OPSET:
            from onnx import version_converter

            try:
                graph_model = version_converter.convert_version(graph_model, MIN_OPSET)
            except Exception as exc:  # the converter raises bare RuntimeError/ValueError
                raise PassFailed(
                    f"cannot upgrade opset {opset} to {MIN_OPSET} ({exc})", pass_name=self.name
                ) from exc
            source = tmp / "upgraded.onnx"
            onnx.save(graph_model, str(source))
            notes.append(f"opset {opset} upgraded to {MIN_OPSET}")
        if self.config.preprocess:
            prepared = prepare(source, tmp)
            source = prepared.path
            notes.append(prepared.note)
        return source, notes

    def _quantize(self, source: Path, out: Path) -> None:
        q = extras.require("onnxruntime.quantization")
        types = {"int8": q.QuantType.QInt8, "uint8": q.QuantType.QUInt8}
        common: dict[str, Any] = {
            "per_channel": self.config.per_channel,
            "reduce_range": self.config.weights_7bit,
            "weight_type": types[self.config.weight_type],
            "nodes_to_exclude": self.config.nodes_to_exclude,
            "op_types_to_quantize": self.config.op_types or None,
            "extra_options": ort_extra_options(self.config),
        }
        if self.config.mode == "dynamic":
            q.quantize_dynamic(str(source), str(out), **common)
            return
        data = self.context.data
        if data is None or data.calib is None:
            raise RecipeError(
                "static int8 needs calibration data: --calib FILE.npz (one array per input name, "
                "or 'x') or --dataset digits",
                where="quantize",
            )
        methods = {
            "minmax": q.CalibrationMethod.MinMax,
            "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile,
        }
        # Histogram calibrators stack per-batch arrays, so every batch must have the same size.
        batch = 32 if self.config.calibration == "minmax" else 1
        reader = _CalibrationReader(q.CalibrationDataReader, source, data.calib, batch)
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print progress
            q.quantize_static(
                str(source),
                str(out),
                reader.instance,
                quant_format=q.QuantFormat.QDQ,
                activation_type=types[self.config.activation_type],
                calibrate_method=methods[self.config.calibration],
                **common,
            )


class _CalibrationReader:
    """Feeds calibration rows to ORT one batch at a time (ORT wants a CalibrationDataReader).

    Every input is fed in the dtype the model declares: ORT calibrates the float tensors, and
    integer inputs (token ids, masks) pass through as integers, never cast to float.
    """

    def __init__(self, base: type[Any], model: Path, calib: Feeds, batch: int) -> None:
        runner = OnnxRunner(ModelArtifact(model, "onnx"))
        feeds = fit_feeds(runner.inputs, calib)
        if not runner.batch_dynamic or any(s.unbatched for s in runner.inputs):
            chunks = [sample(runner.inputs, feeds, i) for i in range(rows(feeds))]
        else:
            chunks = [take(feeds, slice(i, i + batch)) for i in range(0, rows(feeds), batch)]
        iterator = iter(chunks)

        class Reader(base):  # type: ignore[misc]
            def get_next(self) -> dict[str, Any] | None:
                return next(iterator, None)

        self.instance = Reader()


def convert_weights_fp16(source: Path, out: Path) -> int:
    """Store float32 initializers as float16, each followed by a Cast back to float32.

    The model computes in float32 as before (runs on any ONNX Runtime), while the file and
    its transfer are about half the size. Returns how many tensors were converted.
    """
    onnx = extras.require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph_model = load_onnx(source)
    graph = graph_model.graph
    casts, kept, converted = [], [], 0
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            half = init.name + "__fp16"
            kept.append(numpy_helper.from_array(array.astype(np.float16), half))
            casts.append(
                helper.make_node("Cast", [half], [init.name], to=TensorProto.FLOAT, name=half + "_cast")
            )
            converted += 1
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(graph_model, str(out))
    return converted
