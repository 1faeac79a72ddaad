"""``edgectl convert``: compress a model, measure every step, and package a signed bundle."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converter.api import ConvertResult
    from converter.passes import EpochLog
    from converter.recipe import Recipe
    from edgeagent.bundle.manifest import AcceptanceGate

EPILOG = """\
examples:
  edgectl convert mlp.onnx --dataset digits --prune 0.5 --quantize int8 \\
      --name digits --version 1.0.0 --key keys/release.key -o out/
  edgectl convert cnn.onnx --dataset digits --max-drop 0.01 --objective latency \\
      --name digits --version 1.0.1 --key K -o out/
  edgectl convert model.keras --eval eval.npz --calib calib.npz --prune 0.9 --quantize int8 --tflite \\
      --name kws --version 2.0.0 --key K -o out/
  edgectl convert model.onnx --recipe recipe.toml --key K -o out/
  edgectl convert seg.onnx --eval seg.npz --calib calib.npz --quantize int8 --task segmentation \\
      --name seg --version 1.0.0 --key K -o out/
  edgectl convert mlp.onnx --dataset digits --prune 0.9 --finetune 30 --quantize int8 \\
      --name digits --version 1.0.2 --key K -o out/
  edgectl convert teacher.onnx --dataset digits --distill mlp:32 --quantize int8 \\
      --name digits-student --version 2.0.0 --key K -o out/
  edgectl convert mlp.onnx --dataset digits --prune 0.9 --finetune 30 --quantize int8 --qat 10 \\
      --name digits --version 1.0.3 --key K -o out/

Evaluation data (--eval) is an .npz with 'x' (inputs) and 'y' (integer labels); calibration data
(--calib) needs only 'x'; training data (--train, for --finetune/--distill) is shaped like --eval.
Writes OUTDIR/NAME-VERSION.bundle, OUTDIR/report.{json,md,png} and the intermediate models under
OUTDIR/artifacts/. See docs/converter.md for the recipe format.
"""

_QUANTIZE = ("int8", "dynamic", "fp16", "none")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="prune/quantize a model, measure each step, write a report and a signed bundle",
        description=(
            "Run compression passes on an ONNX, Keras (.keras/.h5) or SavedModel model (or distil a "
            "torch.export .pt2 teacher), measure accuracy, size, transfer size and host latency after "
            "every pass, and package the artifacts with an acceptance test into a signed bundle. "
            "Passes come from flags or from a TOML --recipe."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        type=Path,
        nargs="?",
        metavar="MODEL",
        help=".onnx, .keras, .h5, a SavedModel folder, or a torch.export .pt2 program as a --distill teacher "
        "(default: the recipe's `model`)",
    )
    passes = parser.add_argument_group("passes (or give them in --recipe)")
    passes.add_argument(
        "--prune", type=_sparsity, metavar="SPARSITY", help="magnitude-prune to this sparsity (0-1)"
    )
    passes.add_argument(
        "--prune-scope",
        choices=("global", "per_layer"),
        default="global",
        help="one threshold or one per tensor",
    )
    passes.add_argument(
        "--structured",
        type=_sparsity,
        metavar="FRACTION",
        help="remove this fraction of every prunable layer's filters/neurons (smaller, faster graph; "
        "ONNX, Keras Sequential)",
    )
    passes.add_argument(
        "--structured-criterion",
        choices=("l1", "l2"),
        help="--structured: rank channels by the L1 (default) or L2 norm of their weights",
    )
    passes.add_argument(
        "--cluster",
        type=_clusters,
        metavar="K",
        help="ONNX: share K weights per tensor (k-means, 2-256): uint8 indices + a codebook, expanded by "
        "ONNX Runtime at load; far smaller to transfer",
    )
    passes.add_argument(
        "--finetune",
        type=_positive,
        metavar="EPOCHS",
        help="retrain after each of --structured, --prune and --cluster for at most EPOCHS epochs, pruned "
        "weights held at zero and cluster assignments fixed (ONNX; Keras after --prune)",
    )
    passes.add_argument(
        "--qat",
        type=_positive,
        metavar="EPOCHS",
        help="quantization-aware fine-tuning with --quantize int8 for at most EPOCHS epochs "
        "(ONNX: after quantizing, through the int8 graph; Keras: fake-quant kernels before TFLite int8)",
    )
    passes.add_argument(
        "--distill",
        metavar="STUDENT",
        help="first train a student from MODEL (the teacher): mlp:64, mlp:128,64, cnn:small, module:factory",
    )
    passes.add_argument(
        "--distill-epochs", type=_positive, metavar="N", help="--distill: most epochs (default 100)"
    )
    passes.add_argument(
        "--distill-augment",
        choices=("none", "shift", "mixup"),
        help="--distill: extra transfer samples the teacher labels: 1-pixel shifts or mixup blends",
    )
    passes.add_argument(
        "--temperature", type=float, metavar="T", help="--distill: softening temperature (default 4)"
    )
    passes.add_argument(
        "--alpha", type=_fraction, metavar="F", help="--distill: weight of the soft-label term (default 0.7)"
    )
    passes.add_argument(
        "--seed",
        type=int,
        default=0,
        help="--finetune/--qat/--distill: seed of the split, shuffling, weights",
    )
    passes.add_argument(
        "--quantize",
        choices=_QUANTIZE,
        default="none",
        help="int8 (ONNX: static QDQ; Keras: full-int8 TFLite), dynamic, fp16, none (default)",
    )
    passes.add_argument("--per-channel", action="store_true", help="int8: one weight scale per channel")
    passes.add_argument(
        "--calibration",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="static int8 calibration",
    )
    passes.add_argument(
        "--int8-target",
        choices=("portable", "x86-avx2", "x86-vnni", "arm"),
        help="ONNX int8: the CPUs the model will run on. portable (default) and x86-avx2 store 7-bit "
        "weights, since ORT's int8 kernels saturate on x86 without VNNI; x86-vnni and arm keep 8 bits",
    )
    passes.add_argument(
        "--max-drop",
        type=_fraction,
        metavar="F",
        help="search int8 settings for the best model whose top-1 drop is <= F (e.g. 0.01) and that is "
        "no larger and no slower than the float model",
    )
    passes.add_argument(
        "--mixed-precision",
        action="store_true",
        help="--max-drop: scan each layer's int8 sensitivity alone and keep the most sensitive in fp32, "
        "the rest int8, within the budget",
    )
    passes.add_argument(
        "--objective",
        choices=("size", "latency", "balanced"),
        help="--max-drop: what 'best' means: fewest bytes, lowest host p50, or the lowest product of "
        "both ratios to the float model (default balanced)",
    )
    passes.add_argument(
        "--sparse",
        action="store_true",
        help="store mostly-zero (pruned) weights sparsely, smaller on disk: ONNX fp32 as sparse "
        "initializers, "
        "Keras in TFLite's sparse format",
    )
    passes.add_argument("--tflite", action="store_true", help="convert a Keras/SavedModel model to TFLite")
    passes.add_argument("--recipe", type=Path, metavar="FILE.toml", help="data, passes and package settings")
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument(
        "--eval", type=Path, metavar="FILE", help=".npz with 'x' and 'y' to measure every step on"
    )
    source.add_argument("--dataset", choices=("digits",), help="built-in data set (demo, tests)")
    data.add_argument("--calib", type=Path, metavar="FILE", help=".npz with 'x' for int8 calibration")
    data.add_argument(
        "--train",
        type=Path,
        metavar="FILE",
        help=".npz with 'x' and 'y' to fine-tune or distill on (--dataset digits has its own)",
    )
    bundle = parser.add_argument_group("bundle")
    bundle.add_argument("--name", help="bundle name (required unless the recipe has [package])")
    bundle.add_argument("--version", help="semantic version, e.g. 1.0.0")
    bundle.add_argument("--key", type=Path, metavar="KEY", help="private key (edgectl keys generate)")
    bundle.add_argument("--unsigned", action="store_true", help="write an unsigned bundle (experiments only)")
    bundle.add_argument("--description", help="free text shown by `edgectl bundle inspect`")
    bundle.add_argument(
        "--min-accuracy", type=_fraction, metavar="F", help="override the derived accuracy gate"
    )
    bundle.add_argument(
        "--min-agreement", type=_fraction, metavar="F", help="override the derived agreement gate"
    )
    bundle.add_argument("--golden-samples", type=int, metavar="N", help="acceptance-set size (default 100)")
    bundle.add_argument(
        "--task",
        choices=("classification", "regression", "detection", "segmentation", "embedding", "custom"),
        help="what the model does, which decides each output's gate metrics (default: classification "
        "when 'y' holds integer classes and the first output is class scores, else regression)",
    )
    bundle.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=SHAPE",
        help="shape a latency budget is timed on, e.g. x=1x3x320x320; must match the evaluation data",
    )
    bundle.add_argument(
        "--state",
        action="append",
        metavar="OUT=IN",
        help="a streaming model: output OUT feeds input IN on the next step (repeatable); the golden "
        "set becomes one sequence of the first N evaluation rows, replayed with the state carried",
    )
    bundle.add_argument(
        "--keep-intermediates",
        action="store_true",
        default=None,
        help="also ship the models made on the way (e.g. pruned before fine-tuning); by default the "
        "bundle holds only the final model of each format/precision",
    )
    parser.add_argument("-o", "--out", required=True, type=Path, metavar="OUTDIR", help="output folder")
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier conversion in OUTDIR (else it must be empty)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.set_defaults(handler=_convert)


def _fraction(text: str, *, below_one: bool = False) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0.0 <= value <= 1.0 or (below_one and value == 1.0):
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, {'1)' if below_one else '1]'}")
    return value


def _sparsity(text: str) -> float:
    return _fraction(text, below_one=True)


def _clusters(text: str) -> int:
    value = _positive(text)
    if not 2 <= value <= 256:
        raise argparse.ArgumentTypeError(f"{text} clusters: expected 2-256 (uint8 indices)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe the flags describe, or the --recipe file with flags layered on top."""
    from converter.errors import RecipeError
    from converter.flags import pass_tables
    from converter.recipe import load_recipe, recipe_from_dict

    pass_flags = (
        args.prune is not None
        or args.quantize != "none"
        or args.max_drop is not None
        or args.tflite
        or args.sparse
        or args.finetune is not None
        or args.qat is not None
        or args.distill is not None
        or args.objective is not None
        or args.structured is not None
        or args.cluster is not None
        or args.mixed_precision
    )
    if args.recipe is not None:
        if pass_flags:
            raise RecipeError(
                "give passes either in --recipe or as flags "
                "(--distill/--structured/--prune/--cluster/--finetune/--qat/--quantize/--max-drop/"
                "--mixed-precision/--objective/--sparse/--tflite)"
            )
        recipe = load_recipe(args.recipe)
    else:
        recipe = recipe_from_dict({"passes": pass_tables(args)})
    data_update: dict[str, Any] = {}
    if args.eval is not None:
        data_update.update(eval=args.eval, dataset=None)
    if args.dataset is not None:
        data_update.update(dataset=args.dataset, eval=None)
    if args.calib is not None:
        data_update["calib"] = args.calib
    if args.train is not None:
        data_update["train"] = args.train
    package: dict[str, Any] = recipe.package.model_dump() if recipe.package else {}
    overrides = {
        "name": args.name,
        "version": args.version,
        "description": args.description,
        "min_accuracy": args.min_accuracy,
        "min_top1_agreement": args.min_agreement,
        "golden_samples": args.golden_samples,
        "keep_intermediates": args.keep_intermediates,
        "task": args.task,
        "input_shapes": _input_shapes(args.input_shape) or None,
        "state": _state_pairs(args.state) if args.state else None,
    }
    package.update({k: v for k, v in overrides.items() if v is not None})
    if not package.get("name") or not package.get("version"):
        raise RecipeError("--name and --version are required (or a [package] table in the recipe)")
    body = recipe.model_dump(exclude={"passes"})
    body["data"] = {**body["data"], **data_update}
    body["package"] = package
    merged = recipe_from_dict(body)
    return merged.model_copy(update={"passes": recipe.passes})


def _input_shapes(items: list[str]) -> dict[str, list[int]]:
    from edgeagent.bundle.create import parse_input_shape

    return dict(parse_input_shape(item) for item in items)


def _state_pairs(items: list[str]) -> dict[str, str]:
    from converter.errors import RecipeError

    pairs: dict[str, str] = {}
    for item in items:
        out, eq, inp = (part.strip() for part in item.partition("="))
        if not eq or not out or not inp or out in pairs:
            raise RecipeError(f"--state {item!r}: expected OUT=IN, each OUT once")
        pairs[out] = inp
    return pairs


class RichProgress:
    """A spinner per long step on stderr, and a line with its duration when it ends.

    Training steps show the epoch, the training loss and the validation accuracy in the spinner.
    """

    def __init__(self) -> None:
        from converter import extras

        console_module = extras.require("rich.console")
        self.console = console_module.Console(stderr=True)
        self._status: Any = None
        self._description = ""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        started = time.monotonic()
        with self.console.status(description) as status:
            self._status, self._description = status, description
            try:
                yield
            finally:
                self._status = None
        self.console.print(f"[green]done[/] {description} ({time.monotonic() - started:.1f} s)")

    def epoch(self, entry: EpochLog) -> None:
        if self._status is not None:
            self._status.update(
                f"{self._description}: epoch {entry.epoch}/{entry.epochs}, loss {entry.loss:.4f}, "
                f"validation top-1 {entry.val_accuracy:.2%}"
            )


def _convert(args: argparse.Namespace) -> int:
    from converter.api import convert
    from converter.outdir import fresh_output
    from edgeagent.errors import UsageError
    from edgeagent.signing import SigningKey

    recipe = build_recipe(args)
    model = args.model or recipe.model
    if model is None:
        raise UsageError("give the MODEL to convert (or `model = ...` in the recipe)")
    if args.key is None and not args.unsigned:
        raise UsageError("give --key KEY to sign the bundle (or --unsigned for a local experiment)")
    key = SigningKey.load(args.key) if args.key is not None else None
    progress = None if args.quiet or not sys.stderr.isatty() else RichProgress()
    with fresh_output(args.out, force=args.force):
        result = convert(model, recipe, args.out, key, progress)
    print(summary(result))
    return 0


def _bounds(gate: AcceptanceGate) -> str:
    from edgeagent.cli.bundle_cmd import describe_bounds

    return describe_bounds(gate)


def summary(result: ConvertResult) -> str:
    """The steps table, warnings and what was written, as plain text."""
    from converter.report import artifact_warnings

    pipeline = result.pipeline
    rows = [("source", pipeline.source.path.name, pipeline.baseline)]
    rows += [(s.name, s.model.path.name, s.after) for s in pipeline.steps]
    lines = [f"{'step':<10} {'artifact':<32} {'top-1':>7} {'bytes':>10} {'transfer':>9} {'p50 ms':>8}"]
    for name, artifact, m in rows:
        acc = "-" if m.accuracy is None else f"{m.accuracy * 100:.2f}%"
        sizes = f"{m.size_bytes:>10,} {m.transfer_bytes:>9,}"
        lines.append(f"{name:<10} {artifact:<32} {acc:>7} {sizes} {m.latency_p50_ms:>8.3f}")
    lines += [n for s in pipeline.steps if (n := f"{s.name}: {s.notes}") and s.notes]
    lines += [f"warning: {w}" for w in artifact_warnings(pipeline)]
    if result.packaged is not None:
        packaged = result.packaged
        bundle = packaged.bundle
        lines += [f"bundle: {bundle.path}", f"sha256: {bundle.sha256}"]
        for name, gate in packaged.gates.items():
            kept = " (intermediate)" if name in packaged.intermediates else ""
            lines.append(f"gate of {name}{kept}: {_bounds(gate)}")
        lines += [f"note: {note}" for note in packaged.notes]
    lines += [f"report: {p}" for p in result.reports]
    return "\n".join(lines)
