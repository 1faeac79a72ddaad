"""``edgectl registry serve``: answer block requests for the bundles in a folder."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from fleet.hostopts import add_broker_options, broker_settings

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    registry = subparsers.add_parser(
        "registry",
        help="serve bundles to devices over MQTT",
        description="The registry answers devices' block requests for the bundles in a folder.",
    )
    sub = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve every *.bundle in a folder until stopped",
        description=(
            "Serve every *.bundle in DIR (files added later are picked up without a restart). "
            "Run several replicas against the same folder: they share the request topic through "
            "an MQTT shared subscription, so each request is answered once."
        ),
        epilog="example:\n  edgectl registry serve --dir /srv/bundles --broker mqtt://localhost:1883",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--dir", required=True, type=Path, help="folder of *.bundle files")
    serve.add_argument(
        "--share",
        default="registry",
        help="shared-subscription group of the replicas (default: %(default)s); '' subscribes plainly",
    )
    serve.add_argument(
        "--workers", type=int, default=2, help="request-handling threads (default: %(default)s)"
    )
    add_broker_options(serve)
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from fleet.registry import Registry

    settings = broker_settings(args)
    topics = settings.topics()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    registry = Registry(
        settings.broker,
        args.dir,
        topics=topics,
        share=args.share or None,
        workers=args.workers,
    ).start()
    print(
        f"serving {len(registry.index)} bundles from {args.dir} on {settings.broker.url} (Ctrl-C stops)",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        registry.close()
        s = registry.stats
        print(
            f"served {s.blocks_served} blocks ({s.bytes_served} bytes) for {s.requests} requests; "
            f"{s.not_found} not found, {s.malformed} malformed"
        )
    return 0
