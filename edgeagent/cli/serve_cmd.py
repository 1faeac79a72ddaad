"""``serve``: verify bundles, pick a runtime for each, prove it on the golden set, serve on a socket.

Until the deployment flow (``edgeagent run``) serves what it installs, this is how a bundle
is served by hand; it uses the same pieces: verify + extract, selection, acceptance, server.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from edgeagent.cli.bundle_cmd import add_trust_args, keyring_from_args
from edgeagent.cli.infer_cmd import add_socket_arg
from edgeagent.cli.profile_args import add_profile_args, candidates_for

if TYPE_CHECKING:  # pydantic models: imported by the handlers, not at --help time
    from edgeagent.bundle.reader import VerifiedBundle

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  edgeagent serve digits-1.0.0.bundle --trusted /etc/edgeagent/keys/ --socket /tmp/edge.sock
  edgeagent serve detector-2.1.0.bundle classifier-1.0.0.bundle --trusted keys/ --autotune
  curl --unix-socket /tmp/edge.sock http://edge/v1/models
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve bundles on the local inference socket (verify, select runtime, accept, serve)",
        description=(
            "Verify each bundle, choose the runtime and delegate for this device's profile, run the "
            "bundle's acceptance test, and serve the models over HTTP/1.1 on a Unix socket until "
            "SIGINT/SIGTERM. Each bundle is served under its name; the first is the default model."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="bundle file(s) to serve")
    add_trust_args(parser)
    add_socket_arg(parser)
    add_profile_args(parser)
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="load every candidate, run the golden set on each, keep the fastest that passes",
    )
    parser.set_defaults(handler=_serve)


@contextlib.contextmanager
def extracted(bundle: Path, args: argparse.Namespace) -> Iterator[tuple[VerifiedBundle, Path]]:
    """Verify and extract ``bundle`` into a temporary folder, removed afterwards."""
    from edgeagent.bundle.reader import extract_bundle

    ring = keyring_from_args(args)
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-"))
    try:
        dest = workdir / "bundle"
        verified = extract_bundle(bundle, dest, ring, allow_unsigned=args.allow_unsigned)
        yield verified, dest
    finally:
        # Extracted files are read-only; rmtree needs the folders writable, which they are.
        shutil.rmtree(workdir, ignore_errors=True)


def _serve(args: argparse.Namespace) -> int:
    from edgeagent.serving import InferenceServer
    from edgeagent.serving.loader import prepare_served_model

    profile, candidates = candidates_for(args)
    server = InferenceServer(args.socket)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    with contextlib.ExitStack() as stack:
        stack.callback(server.close)
        for bundle in args.bundles:
            verified, folder = stack.enter_context(extracted(bundle, args))
            served = prepare_served_model(
                folder,
                verified.manifest,
                candidates,
                profile=profile,
                bundle_sha256=verified.sha256,
                autotune=args.autotune,
                precisions=args.precision,
            )
            server.activate(served)
            chosen = served.model
            print(
                f"{served.name} {served.version}: {chosen.runtime}/{chosen.delegate} {chosen.precision} "
                f"({served.model.path.name}, profile {profile}); acceptance passed",
                flush=True,
            )
        server.start()
        print(f"serving on {args.socket} (Ctrl-C to stop)", flush=True)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return 0
