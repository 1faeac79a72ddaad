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
    publish = sub.add_parser(
        "publish",
        help="publish a bundle as content-addressed objects (folder, http(s) PUT, s3://)",
        description=(
            "Write BUNDLE, each of its files in its wire form (xz where it pays) under "
            "objects/<sha256>, and its delivery index into DEST, so devices fetch only the "
            "files they use, from the registry, a web server/CDN or a bucket (docs/bundle.md)."
        ),
        epilog=(
            "examples:\n  edgectl registry publish out/digits-1.1.0.bundle --to /srv/bundles\n"
            "  edgectl registry publish out/digits-1.1.0.bundle --to https://cdn-origin.example.com/edge/\n"
            "  edgectl registry publish out/digits-1.1.0.bundle --to s3://my-bucket/edge"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("bundle", type=Path, metavar="BUNDLE")
    publish.add_argument(
        "--to", required=True, metavar="DEST", help="folder, http(s):// base URL or s3://bucket/prefix"
    )
    publish.add_argument(
        "--block-kib",
        type=int,
        default=64,
        help="block size of the index's hashes in KiB (default: %(default)s)",
    )
    publish.add_argument("--endpoint-url", help="S3 endpoint of an S3-compatible store (MinIO, Ceph, ...)")
    publish.set_defaults(handler=_publish)


def _publish(args: argparse.Namespace) -> int:
    from edgeagent.errors import UsageError
    from fleet.publish import destination, publish

    if not args.bundle.is_file():
        raise UsageError(f"{args.bundle}: no such bundle")
    if not 4 <= args.block_kib <= 256:
        raise UsageError("--block-kib must be within 4-256")
    done = publish(
        args.bundle, destination(args.to, endpoint_url=args.endpoint_url), block_size=args.block_kib * 1024
    )
    print(
        f"published {args.bundle.name} to {args.to}: {done.objects} objects ({done.uploaded} new), "
        f"{done.wire_bytes} bytes on the wire for {done.plain_bytes} plain; index {done.index.sha256} "
        f"({done.index.size} bytes)"
    )
    return 0


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
