"""The passes ``edgectl convert``'s flags stand for: flags -> recipe ``[[passes]]`` tables.

Order: distill, structured, prune, cluster (each compressing pass followed by ``finetune`` when
``--finetune`` is given), then quantize / search / mixed, then sparsify; Keras models end in the
tflite pass. Combinations that cannot work are refused here with one line naming the flags.
"""

from __future__ import annotations

import argparse
from typing import Any

from converter.errors import RecipeError


def pass_tables(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``[[passes]]`` tables the pass flags of ``edgectl convert`` describe, in pipeline order."""
    if args.model is None:
        raise RecipeError("give the MODEL to convert")
    keras = args.model.suffix.lower() in (".keras", ".h5") or args.model.is_dir()
    tables: list[dict[str, Any]] = []
    if args.distill is not None:
        distill: dict[str, Any] = {"type": "distill", "student": args.distill, "seed": args.seed}
        optional = {
            "epochs": args.distill_epochs,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "augment": args.distill_augment,
        }
        distill.update({k: v for k, v in optional.items() if v is not None})
        tables.append(distill)
        keras = False  # the student is an ONNX model
    elif any(
        v is not None for v in (args.distill_epochs, args.temperature, args.alpha, args.distill_augment)
    ):
        raise RecipeError("--distill-epochs/--distill-augment/--temperature/--alpha apply to --distill")
    tables += _shrinking_tables(args, keras)
    if args.objective is not None and args.max_drop is None:
        raise RecipeError("--objective ranks the candidates of --max-drop: give --max-drop F too")
    if args.qat is not None and args.quantize != "int8":
        raise RecipeError("--qat fine-tunes an int8 model: give --quantize int8 too")
    if keras:
        if args.qat is not None:
            tables.append(
                {"type": "finetune", "epochs": args.qat, "seed": args.seed, "quantization_aware": True}
            )
        if args.max_drop is not None or args.mixed_precision:
            raise RecipeError("--max-drop searches ONNX Runtime settings; for Keras choose --quantize")
        if args.per_channel or args.calibration != "minmax" or args.int8_target is not None:
            raise RecipeError(
                "--per-channel/--calibration/--int8-target apply to ONNX models "
                "(TFLite int8 is per-channel and does not saturate on any CPU)"
            )
        mode = {"int8": "int8", "dynamic": "dynamic", "fp16": "fp16", "none": "fp32"}[args.quantize]
        tables.append({"type": "tflite", "mode": mode, **({"sparse": True} if args.sparse else {})})
        return tables
    if args.tflite:
        raise RecipeError("--tflite converts Keras/SavedModel models; ONNX -> TFLite is not supported")
    if args.max_drop is not None:
        if args.qat is not None:
            raise RecipeError(
                "--qat trains the int8 model --quantize int8 makes; it cannot follow --max-drop"
            )
        if args.quantize not in ("none", "int8", "dynamic"):
            raise RecipeError(
                f"--max-drop searches int8 settings; it cannot be combined with --quantize {args.quantize}"
            )
        search: dict[str, Any] = {"type": "search", "max_drop": args.max_drop}
        if args.mixed_precision:
            search = {"type": "mixed", "max_drop": args.max_drop}
            if args.objective is not None or args.quantize == "dynamic":
                raise RecipeError(
                    "--mixed-precision keeps layers fp32 or static int8: no --objective/dynamic"
                )
        if args.objective is not None:
            search["objective"] = args.objective
        if args.quantize == "dynamic":
            search["modes"] = ["dynamic"]
        if args.int8_target is not None:
            search["target"] = args.int8_target
        tables.append(search)
    elif args.quantize != "none":
        table: dict[str, Any] = {
            "type": "quantize",
            "mode": "static" if args.quantize == "int8" else args.quantize,
        }
        if args.per_channel:
            table["per_channel"] = True
        if args.calibration != "minmax":
            table["calibration"] = args.calibration
        if args.int8_target is not None:
            if args.quantize == "fp16":
                raise RecipeError("--int8-target applies to --quantize int8 or dynamic, not fp16")
            table["target"] = args.int8_target
        tables.append(table)
        if args.qat is not None:
            tables.append({"type": "finetune", "epochs": args.qat, "seed": args.seed})
    if args.int8_target is not None and not any(t["type"] in ("quantize", "search", "mixed") for t in tables):
        raise RecipeError("--int8-target applies to --quantize int8/dynamic or --max-drop")
    if args.sparse:
        if any(t["type"] in ("quantize", "search", "mixed", "cluster") for t in tables):
            raise RecipeError(
                "--sparse stores fp32 weights; it cannot follow --quantize, --max-drop or --cluster"
            )
        tables.append({"type": "sparsify"})
    return tables


def _shrinking_tables(args: argparse.Namespace, keras: bool) -> list[dict[str, Any]]:
    """--structured, --prune and --cluster in that order, each followed by --finetune when given."""
    tables: list[dict[str, Any]] = []
    finetune = {"type": "finetune", "epochs": args.finetune, "seed": args.seed}
    if args.mixed_precision and args.max_drop is None:
        raise RecipeError("--mixed-precision chooses layers within a budget: give --max-drop F too")
    if args.structured_criterion is not None and args.structured is None:
        raise RecipeError("--structured-criterion applies to --structured")
    if keras and args.cluster is not None:
        raise RecipeError("--cluster applies to ONNX models")
    if args.cluster is not None and (args.quantize != "none" or args.max_drop is not None):
        raise RecipeError(
            "--cluster stores float codebooks; it cannot be combined with --quantize/--max-drop"
        )
    if args.structured is not None:
        table: dict[str, Any] = {"type": "structured", "fraction": args.structured}
        if args.structured_criterion is not None:
            table["criterion"] = args.structured_criterion
        tables.append(table)
    if args.prune is not None:
        if args.finetune is not None and tables:
            tables.append(finetune)
        tables.append({"type": "prune", "sparsity": args.prune, "scope": args.prune_scope})
    if args.cluster is not None:
        if args.finetune is not None and tables:
            tables.append(finetune)
        tables.append({"type": "cluster", "clusters": args.cluster})
    if args.finetune is not None:
        if not tables:
            raise RecipeError(
                "--finetune retrains a compressed model: "
                "give --prune SPARSITY too (or --structured, --cluster)"
            )
        tables.append(finetune)
    return tables
