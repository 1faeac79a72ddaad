"""``infer``: send one input file to the local inference socket and print the reply as JSON."""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any

from edgeagent.defaults import DEFAULT_SOCKET
from edgeagent.errors import UsageError

EPILOG = """\
examples:
  edgeagent infer --input digit.npy
  edgeagent infer --socket /tmp/edge.sock --input batch.json --model classifier
  edgeagent infer --input sample_int8.npy --raw        # quantized integers in and out

input files: .npy (one array), .npz (one array per model input, named after it; a golden set's
'input.<name>' arrays work too), .json (a nested list, or {"inputs": [[...]]} /
{"inputs": {"name": [[...]], ...}}). Each input is converted to the dtype the model declares
(token ids stay integers; a float array for an integer input is refused). Every output is printed,
by name, in the model's order.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="run one input file through the served model and print the outputs",
        description=(
            "Send an input file to the agent's local inference endpoint and print the reply as JSON: "
            "outputs, prediction id, model, version, runtime, delegate and server latency."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_socket_arg(parser)
    parser.add_argument(
        "--input", required=True, type=Path, metavar="FILE", help="FILE.npy, FILE.npz or FILE.json"
    )
    parser.add_argument("--model", metavar="NAME", help="served model name (default: the default model)")
    parser.add_argument(
        "--session",
        metavar="ID",
        help="a stateful model's session: the step continues from that session's state "
        "(default: from the initial state)",
    )
    parser.add_argument(
        "--raw", action="store_true", help="quantized models: send and receive the raw integer tensors"
    )
    parser.set_defaults(handler=_infer)


def read_input(path: Path) -> tuple[Any, bool]:
    """(inputs, binary): an array or {name: array} for .npy/.npz, arrays from nested lists for .json."""
    import numpy as np

    if not path.is_file():
        raise UsageError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), True
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            golden = {k.removeprefix("input."): v for k, v in arrays.items() if k.startswith("input.")}
            return golden or arrays, True  # a golden set: its inputs only (not labels, outputs)
        if suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            inputs = doc["inputs"] if isinstance(doc, dict) and "inputs" in doc else doc
            if isinstance(inputs, dict):
                return {str(k): np.asarray(v) for k, v in inputs.items()}, False
            return np.asarray(inputs), False
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from exc
    raise UsageError(f"{path}: unknown input type {suffix or '(no suffix)'}; use .npy, .npz or .json")


def _infer(args: argparse.Namespace) -> int:
    from edgeagent.client import Client

    inputs, binary = read_input(args.input)
    with Client(args.socket) as client:
        result = client.predict(inputs, model=args.model, raw=args.raw, binary=binary, session=args.session)
    print(
        json.dumps(
            {
                "id": result.id,
                "model": result.model,
                "version": result.version,
                "runtime": result.runtime,
                "delegate": result.delegate,
                "latency_ms": result.latency_ms,
                "outputs": {name: array.tolist() for name, array in result.outputs.items()},
            }
        )
    )
    return 0


def add_socket_arg(parser: argparse.ArgumentParser) -> None:
    """``--socket PATH``: the agent's inference socket (serve, infer and feedback share it)."""
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"Unix socket (default {DEFAULT_SOCKET})",
    )
