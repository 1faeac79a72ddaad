"""``bundle`` commands: create (host), verify, inspect and extract (host and device)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgeagent.cli.profile_args import precision_list
from edgeagent.errors import UsageError

if TYPE_CHECKING:  # pydantic, numpy, cryptography: imported by the handlers, not at --help time
    from edgeagent.bundle.manifest import AcceptanceGate, Manifest, OutputGate
    from edgeagent.bundle.reader import VerifiedBundle
    from edgeagent.signing import KeyRing

CREATE_EXAMPLE = """\
  edgectl bundle create --name digits --version 1.0.0 --model mlp.onnx --model mlp_int8.tflite \\
      --golden golden.npz --min-accuracy 0.9 --key keys/release.key -o out/
  edgectl bundle create --name digits --version 1.1.0 --model mlp.onnx --model mlp_int8.tflite \\
      --golden golden.npz --min-accuracy 0.9 --model-gate mlp.onnx:min_accuracy=0.95 \\
      --key keys/release.key -o out/
  edgectl bundle create --name seg --version 1.0.0 --model seg.onnx --latency-budget rpi5=80 \\
      --input-shape image=1x3x320x320 --key keys/release.key -o out/
"""
EXAMPLES = """\
  {prog} bundle verify out/digits-1.0.0.bundle --trusted keys/release.pub
  {prog} bundle inspect out/digits-1.0.0.bundle --json
  {prog} bundle extract out/digits-1.0.0.bundle --trusted keys/ --to /tmp/digits
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # The examples name the program they are shown by; bundles are created on the host (edgectl).
    prog = subparsers._prog_prefix.split()[0]
    epilog = "examples:\n" + (CREATE_EXAMPLE if prog == "edgectl" else "") + EXAMPLES.format(prog=prog)
    bundle = subparsers.add_parser(
        "bundle",
        help="create, verify, inspect or extract a signed model bundle",
        description="A bundle is one signed, reproducible file: models, acceptance test, report.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="package models into OUTDIR/NAME-VERSION.bundle",
        description=(
            "Package one or more models (.onnx, .tflite) with an optional golden set and labels into "
            "a signed bundle. Input/output names, shapes and dtypes are read from the model files. "
            "The same inputs give a byte-identical bundle (set SOURCE_DATE_EPOCH to stamp a date)."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("--name", required=True, help="bundle name, e.g. 'digits'")
    create.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    create.add_argument(
        "--model",
        required=True,
        action="append",
        type=Path,
        metavar="FILE",
        help="model file (.onnx or .tflite); repeat for several artifacts",
    )
    create.add_argument(
        "--golden",
        type=Path,
        metavar="FILE.npz",
        help="acceptance set: 'input.<name>' per model input (or 'inputs' for a one-input model), "
        "optional 'labels' (int) and 'output.<name>' reference outputs",
    )
    create.add_argument("--labels", type=Path, metavar="FILE", help="class names, one per line")
    create.add_argument(
        "--key", required=True, type=Path, metavar="KEY", help="private key (edgectl keys generate)"
    )
    create.add_argument("-o", "--out", required=True, type=Path, metavar="OUTDIR", help="output folder")
    create.add_argument("--description", default="", help="free text shown by inspect")
    create.add_argument(
        "--precision",
        type=precision_list,
        default=[],
        metavar="LIST",
        help=(
            "artifact precisions devices should serve, most preferred first, e.g. 'fp32,int8' "
            "(default: each device's profile order; a device's own override wins)"
        ),
    )
    create.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="OUT=IN",
        help="a stateful model: output OUT returns the state that input IN takes on the next step "
        "(repeatable; the server keeps it per client session)",
    )
    create.add_argument(
        "--state-initial",
        action="append",
        default=[],
        metavar="IN=FILE.npy",
        help="the initial value of state input IN (one sample, with its batch dimension; default zeros)",
    )
    gate = create.add_argument_group("acceptance gate (checked on the device before it switches over)")
    gate.add_argument(
        "--min-accuracy", type=_fraction, metavar="F", help="min top-1 accuracy on golden labels, 0-1"
    )
    gate.add_argument(
        "--min-agreement",
        type=_fraction,
        metavar="F",
        help="min fraction of golden samples whose top-1 matches 'reference', 0-1",
    )
    gate.add_argument("--atol", type=float, help="absolute tolerance against 'reference' outputs")
    gate.add_argument("--rtol", type=float, help="relative tolerance against 'reference' outputs")
    gate.add_argument(
        "--latency-budget",
        action="append",
        default=[],
        metavar="PROFILE=MS",
        help="p95 latency budget in ms for a device profile ('*' = any); repeatable",
    )
    gate.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=SHAPE",
        help="shape a latency budget is timed on without --golden, e.g. x=1x3x320x320 (batch 1); "
        "needed for inputs with dynamic dimensions; repeatable, one per input",
    )
    gate.add_argument(
        "--model-gate",
        action="append",
        default=[],
        metavar="FILE:BOUND=V[,BOUND=V]",
        help="give one --model its own gate (the bounds above, overridden by these: min_accuracy, "
        "min_agreement, atol, rtol); a device serves it only if it passes; repeatable",
    )
    create.set_defaults(handler=_create)

    verify = sub.add_parser(
        "verify",
        help="check signature and every file hash; print the sha256",
        description="Exit 0 and print the bundle's sha256 when it is intact and signed by a trusted key; "
        "otherwise exit 1 with one line naming the reason.",
    )
    verify.add_argument("bundle", type=Path, metavar="FILE")
    add_trust_args(verify)
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=_verify)

    inspect = sub.add_parser(
        "inspect",
        help="show name, version, models, io specs, acceptance gate and compression report",
        description="Show what a bundle holds. Without --trusted the signature is not checked "
        "(it says so); with --trusted the whole bundle is verified first.",
    )
    inspect.add_argument("bundle", type=Path, metavar="FILE")
    inspect.add_argument(
        "--trusted",
        action="append",
        type=Path,
        default=[],
        metavar="PUB",
        help="verify against these public keys (.pub files or folders) first",
    )
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(handler=_inspect)

    extract = sub.add_parser(
        "extract",
        help="verify and unpack into a new folder",
        description="Verify the bundle and unpack it into DIR (which must not exist), all or nothing.",
    )
    extract.add_argument("bundle", type=Path, metavar="FILE")
    add_trust_args(extract)
    extract.add_argument("--to", required=True, type=Path, metavar="DIR", help="new folder to create")
    extract.set_defaults(handler=_extract)


def add_trust_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trusted",
        action="append",
        type=Path,
        default=[],
        metavar="PUB",
        help="trusted public key (.pub) or a folder of them; repeatable",
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept a bundle without manifest.sig (local experiments only; still checks hashes)",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def keyring_from_args(args: argparse.Namespace) -> KeyRing:
    from edgeagent.signing import KeyRing

    if not args.trusted and not getattr(args, "allow_unsigned", False):
        raise UsageError("give at least one --trusted public key (or --allow-unsigned)")
    for path in args.trusted:
        if not path.exists():
            raise UsageError(f"{path}: no such key file or folder")
    return KeyRing.from_paths(args.trusted)


def _create(args: argparse.Namespace) -> int:
    # Host-only path: model inspection may import onnx/onnxruntime/LiteRT, so import here.
    from edgeagent.bundle.create import create_bundle, parse_input_shape
    from edgeagent.bundle.manifest import AcceptanceGate
    from edgeagent.signing import SigningKey

    budgets: dict[str, float] = {}
    for item in args.latency_budget:
        profile, sep, ms = item.partition("=")
        try:
            budgets[profile] = float(ms)
        except ValueError:
            sep = ""
        if not sep or not profile:
            raise UsageError(f"--latency-budget {item!r}: expected PROFILE=MS, e.g. rpi4=12.5")
    if (
        args.min_accuracy is not None or args.min_agreement is not None or args.atol or args.rtol
    ) and not args.golden:
        raise UsageError("acceptance bounds need --golden FILE.npz to check them against")
    try:
        gate = AcceptanceGate(
            min_accuracy=args.min_accuracy,
            min_top1_agreement=args.min_agreement,
            atol=args.atol,
            rtol=args.rtol,
            latency_p95_ms=budgets,
        )
    except ValueError as exc:
        raise UsageError(f"acceptance gate: {exc}") from exc
    own = dict(_model_gate(item, args.model, gate) for item in args.model_gate)
    created = create_bundle(
        name=args.name,
        version=args.version,
        models=args.model,
        key=SigningKey.load(args.key),
        out_dir=args.out,
        golden=args.golden,
        labels=args.labels,
        description=args.description,
        gate=gate,
        model_gates=own,
        serve_precision=args.precision,
        input_shapes=dict(parse_input_shape(item) for item in args.input_shape),
        state=_assignments("--state", args.state, "OUT=IN", str),
        state_initial=_assignments("--state-initial", args.state_initial, "IN=FILE.npy", Path),
    )
    print(created.path)
    print(f"sha256: {created.sha256}")
    return 0


_V = TypeVar("_V")


def _assignments(flag: str, items: list[str], form: str, value: Callable[[str], _V]) -> dict[str, _V]:
    """``KEY=VALUE`` flags as a dict; UsageError for a malformed or repeated key."""
    out: dict[str, _V] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip() or not text.strip():
            raise UsageError(f"{flag} {item!r}: expected {form}")
        if key.strip() in out:
            raise UsageError(f"{flag} names {key.strip()!r} twice")
        out[key.strip()] = value(text.strip())
    return out


_MODEL_GATE_FIELDS = {
    "min_accuracy": "min_accuracy",
    "min_agreement": "min_top1_agreement",
    "atol": "atol",
    "rtol": "rtol",
}


def _model_gate(item: str, models: list[Path], base: AcceptanceGate) -> tuple[Path, AcceptanceGate]:
    """``FILE:BOUND=V,...`` → (the --model it names, the bundle gate with those bounds replaced)."""
    from pydantic import ValidationError

    from edgeagent.bundle.manifest import AcceptanceGate
    from edgeagent.validation import problems

    name, sep, body = item.rpartition(":")
    matches = [m for m in models if name and (str(m) == name or m.name == name)]
    if not sep or len(matches) != 1:
        raise UsageError(f"--model-gate {item!r}: expected FILE:BOUND=V[,BOUND=V] naming one --model")
    fields: dict[str, float] = {}
    for pair in body.split(","):
        key, eq, value = pair.partition("=")
        if not eq or key.strip() not in _MODEL_GATE_FIELDS:
            known = ", ".join(_MODEL_GATE_FIELDS)
            raise UsageError(f"--model-gate {item!r}: {pair!r} is not BOUND=V with BOUND one of {known}")
        try:
            fields[_MODEL_GATE_FIELDS[key.strip()]] = float(value)
        except ValueError:
            raise UsageError(f"--model-gate {item!r}: {value!r} is not a number") from None
    try:
        return matches[0], AcceptanceGate.model_validate({**base.model_dump(), **fields})
    except ValidationError as exc:
        raise UsageError(f"--model-gate {item!r}: {problems(exc)}") from exc


def _verify(args: argparse.Namespace) -> int:
    from edgeagent.bundle.reader import verify_bundle

    result = verify_bundle(args.bundle, keyring_from_args(args), allow_unsigned=args.allow_unsigned)
    if args.json:
        print(json.dumps(_summary(result), indent=2))
    else:
        signer = f"signed by {result.signed_by}" if result.signed_by else "UNSIGNED"
        print(f"{result.sha256}  {args.bundle}")
        m = result.manifest
        print(f"ok: {m.name} {m.version}, {len(m.files)} files, {signer}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from edgeagent.bundle.reader import extract_bundle

    result = extract_bundle(args.bundle, args.to, keyring_from_args(args), allow_unsigned=args.allow_unsigned)
    print(f"{result.sha256}  {args.bundle}")
    count = len(result.manifest.files) + 1 + (result.signed_by is not None)
    print(f"extracted {count} files (manifest included) to {args.to}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from edgeagent.bundle.reader import read_manifest_unverified, verify_bundle
    from edgeagent.signing import KeyRing

    if args.trusted:
        result = verify_bundle(args.bundle, KeyRing.from_paths(args.trusted))
        manifest, key, checked, sha = result.manifest, result.signed_by, True, result.sha256
    else:
        manifest, key = read_manifest_unverified(args.bundle)
        checked, sha = False, None
    if args.json:
        body: dict[str, Any] = {
            "manifest": manifest.model_dump(mode="json"),
            "signature": {"key_id": key, "verified": checked},
            "sha256": sha,
        }
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    print(render_manifest(manifest, key, checked, sha))
    return 0


def _summary(result: VerifiedBundle) -> dict[str, Any]:
    return {
        "sha256": result.sha256,
        "size": result.size,
        "name": result.manifest.name,
        "version": result.manifest.version,
        "signed_by": result.signed_by,
    }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def describe_bounds(gate: AcceptanceGate) -> str:
    """A gate's bounds in words ("accuracy >= 0.950; p95 <= 5 ms on rpi4")."""
    bounds = []
    if gate.min_accuracy is not None:
        bounds.append(f"accuracy >= {gate.min_accuracy:.3f}")
    if gate.min_top1_agreement is not None:
        bounds.append(f"top-1 agreement >= {gate.min_top1_agreement:.3f}")
    if gate.atol is not None or gate.rtol is not None:
        bounds.append(f"outputs within atol={gate.atol} rtol={gate.rtol}")
    for output, b in gate.outputs.items():
        bounds += _output_bounds(output, b)
    bounds += [f"p95 <= {ms:g} ms on {profile}" for profile, ms in sorted(gate.latency_p95_ms.items())]
    if gate.latency_shapes:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in gate.latency_shapes.items())
        bounds.append(f"latency timed on {shapes}")
    task = f"{gate.task}: " if gate.task else ""
    return task + ("; ".join(bounds) if bounds else "no bounds set")


def _output_bounds(output: str, b: OutputGate) -> list[str]:
    """One output's bounds as 'metric[output] op value' (the Check names acceptance reports)."""
    from edgeagent.agreement import METRICS

    given = {"topk_agreement": f" (k={b.top_k})", "iou": f" (mask > {b.mask_threshold})"}
    given["box_match"] = f" (IoU >= {b.box_iou})"
    bounds = [
        f"{m.check}[{output}] {m.op} {value:.4g}{given.get(m.check, '')}"
        for m in METRICS
        if (value := getattr(b, m.bound)) is not None
    ]
    bounds += [f"{k}[{output}] = {v:.4g}" for k, v in (("atol", b.atol), ("rtol", b.rtol)) if v is not None]
    return bounds


def render_manifest(manifest: Manifest, key: str | None, checked: bool, sha: str | None) -> str:
    """Plain-text view of a manifest for ``bundle inspect``."""
    if key is None:
        sig = "none (unsigned)"
    elif checked:
        sig = f"key {key} (verified)"
    else:
        sig = f"key {key} (NOT verified: pass --trusted PUB to check)"
    lines = [f"{manifest.name} {manifest.version}  (schema {manifest.schema_version})"]
    if manifest.description:
        lines.append(f"  {manifest.description}")
    if sha:
        lines.append(f"sha256:    {sha}")
    lines.append(f"signature: {sig}")
    if manifest.serve_precision:
        lines.append(f"serve precision: {', '.join(manifest.serve_precision)} (the author's preference)")
    sizes = {f.path: f.size for f in manifest.files}
    lines.append("models:")
    for model in manifest.models:
        extra = f", delegates: {', '.join(model.delegates)}" if model.delegates else ""
        lines.append(
            f"  {model.path}  {model.format} {model.precision}  {_human_bytes(sizes[model.path])}"
            f"  runtimes: {', '.join(model.runtimes) or 'any'}{extra}"
        )
        if model.state is not None:
            carried = ", ".join(f"{p.output} -> {p.input}" for p in model.state.pairs)
            held = "resource variables" if model.state.variables else ""
            lines.append(f"    state: {', '.join(x for x in (carried, held) if x)}")
        for kind, specs in (("in ", model.inputs), ("out", model.outputs)):
            for spec in specs:
                shape = "x".join("?" if d is None else str(d) for d in spec.shape) or "scalar"
                quant = ""
                if spec.quantization is not None:
                    q = spec.quantization
                    quant = (
                        f"  scale={q.scale[0]:.6g} zero_point={q.zero_point[0]}"
                        if len(q.scale) == 1
                        else f"  per-channel ({len(q.scale)}) axis={q.axis}"
                    )
                lines.append(f"    {kind} {spec.name}: {spec.dtype}[{shape}]{quant}")
    gate = manifest.acceptance
    golden = f"{gate.golden} ({gate.samples} samples)" if gate.golden else "none"
    lines.append(f"acceptance: golden {golden}; " + describe_bounds(gate))
    for model in manifest.models:
        if model.acceptance is not None:
            lines.append(f"  {model.path}: {describe_bounds(model.acceptance)}")
    if manifest.labels:
        lines.append(f"labels:    {manifest.labels}")
    if manifest.compression:
        lines.append("compression report:")
        lines.append(f"  {'pass':<12} {'accuracy':>17} {'size':>23} {'sparsity':>9}")
        for step in manifest.compression:
            acc = f"{_num(step.accuracy_before)} -> {_num(step.accuracy_after)}"
            size = f"{_bytes_or_dash(step.size_before)} -> {_bytes_or_dash(step.size_after)}"
            sparsity = _num(step.sparsity)
            lines.append(f"  {step.name:<12} {acc:>17} {size:>23} {sparsity:>9}")
    else:
        lines.append("compression report: none")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _bytes_or_dash(value: int | None) -> str:
    return "-" if value is None else _human_bytes(value)
