"""The converter's Python API: one call from a model (file or torch module) to report and bundle."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter import extras
from converter.data import Dataset, load_data
from converter.errors import ModelLoadError, RecipeError
from converter.evaluate import Evaluator
from converter.model import DEPLOYABLE, ModelArtifact, detect
from converter.package import Packaged, package
from converter.passes import pass_class
from converter.pipeline import NoProgress, PipelineResult, Progress, run_pipeline
from converter.recipe import Recipe
from converter.report import write_report
from edgeagent.signing import SigningKey

#: ONNX opset torch modules are exported with.
TORCH_OPSET = 17


@dataclass
class ConvertResult:
    pipeline: PipelineResult
    packaged: Packaged | None
    reports: list[Path]


def convert(
    model: Path,
    recipe: Recipe,
    out_dir: Path,
    key: SigningKey | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Run ``recipe`` on ``model``, write the report and (when ``recipe.package``) the bundle.

    ``key`` signs the bundle; None writes it unsigned (local experiments only).
    """
    source = detect(model)
    data = load_data(recipe.data)
    if data is None:
        raise RecipeError(
            "every step is measured on evaluation data: give --eval FILE.npz or --dataset digits"
        )
    _check_passes(source, recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluate = recipe.evaluate
    task = recipe.package.task if recipe.package is not None else None
    if evaluate.task is None and task is not None:
        # The package task decides what the evaluator reports: accuracy only for classifiers.
        evaluate = evaluate.model_copy(
            update={"task": "classification" if task == "classification" else "regression"}
        )
    evaluator = Evaluator(data, evaluate)
    result = run_pipeline(source, recipe.passes, data, evaluator, out_dir / "artifacts", progress)
    packaged = None
    if recipe.package is not None:
        with (progress or NoProgress()).step("packaging"):
            packaged = package(result, data, recipe.package, key, out_dir)
    reports = write_report(result, data.source, packaged, out_dir)
    return ConvertResult(pipeline=result, packaged=packaged, reports=reports)


def _check_passes(source: ModelArtifact, recipe: Recipe) -> None:
    """Fail before any work when a pass cannot take what the previous one makes."""
    kind = source.kind
    for i, spec in enumerate(recipe.passes):
        cls = pass_class(spec.name)
        if kind not in cls.accepts:
            hint = ""
            if spec.name == "tflite":
                hint = " (ONNX -> TFLite is not supported; start from the Keras model)"
            elif kind == "torch":
                hint = " (a .pt2 program is a --distill teacher; for other passes use convert_torch or ONNX)"
            raise RecipeError(
                f"{spec.name} takes {', '.join(sorted(cls.accepts))} models but gets {kind}{hint}",
                where=f"passes[{i}]",
            )
        if cls.terminal and i != len(recipe.passes) - 1:
            raise RecipeError(f"{spec.name} must be the last pass", where=f"passes[{i}]")
        later = [
            s.name
            for s in recipe.passes[i + 1 :]
            if cls.followers is not None and s.name not in cls.followers
        ]
        if later:
            allowed = ", ".join(sorted(cls.followers or ())) or "nothing"
            raise RecipeError(
                f"{spec.name} can be followed only by {allowed}, not {later[0]}", where=f"passes[{i}]"
            )
        kind = cls.produces or kind
    if recipe.package is not None and kind not in DEPLOYABLE:
        fix = "distill it (--distill)" if kind == "torch" else "add the tflite pass (--tflite)"
        raise RecipeError(f"a {kind} model is not deployable: {fix} to package it")


def export_torch(module: Any, example_input: Any, path: Path, opset: int = TORCH_OPSET) -> ModelArtifact:
    """Export a torch module to ONNX with a dynamic batch dimension (input 'input', output 'output')."""
    torch = extras.torch()
    module.eval()
    # The TorchScript exporter is deprecated but writes the requested opset directly and needs no
    # onnxscript; its DeprecationWarnings are about the exporter, not the model.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (example_input,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:  # torch.onnx raises many kinds (tracing, unsupported ops)
        raise ModelLoadError(f"torch.onnx.export failed ({exc})") from exc
    return ModelArtifact(path, "onnx")


def convert_torch(
    module: Any,
    example_input: Any,
    recipe: Recipe,
    out_dir: Path,
    key: SigningKey | None = None,
    name: str = "model",
    progress: Progress | None = None,
) -> ConvertResult:
    """Export a torch module (given an example input batch) to ONNX, then :func:`convert` it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = export_torch(module, example_input, out_dir / f"{name}.onnx")
    return convert(exported.path, recipe, out_dir, key, progress)


__all__ = ["ConvertResult", "Dataset", "convert", "convert_torch", "export_torch"]
