"""``edgectl push`` and ``edgectl rollback``: deploy a bundle to a device or group, or undo it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.errors import UsageError
from fleet.hostopts import add_broker_options, broker_settings

if TYPE_CHECKING:  # pydantic models: imported by the handlers, not at --help time
    from collections.abc import Callable

    from edgeagent.protocol import BundleRef
    from edgeagent.signing import SigningKey
    from fleet.push import FleetConnection, Published, Target

PUSH_EPILOG = """\
examples:
  edgectl push out/digits-1.1.0.bundle --device pi-kitchen-01 --key keys/release.key \\
      --broker mqtts://broker:8883 --registry /srv/bundles
  edgectl push out/digits-1.1.0.bundle --group canary --key keys/release.key \\
      --broker mqtts://broker:8883 --registry /srv/bundles --timeout 600

The bundle is copied into the registry folder (which `edgectl registry serve` serves), then
a signed desired-state document for that one model is published, retained, for the device
or group. Devices that are offline catch up when they reconnect. Unless --no-wait, progress
and each device's outcome (with its acceptance numbers, or the code and reason it refused)
are shown.

exit status (docs/cli.md): 0 every device committed the bundle; 1 a deployment failed (and
was rolled back); 2 bad input; 3 a device refused the document (signature, replay, downgrade,
seq_in_future, ...); 4 a concurrent push of the same model replaced this one; 5 no outcome
within --timeout. With several devices, the first of 3, 1, 5, 4 that occurred.
"""

# Exit statuses of push and rollback (docs/cli.md), in the order a mixed result reports them.
EXIT_STATUS = {"refused": 3, "failed": 1, "timeout": 5, "superseded": 4}


def _common(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", metavar="ID", help="one device")
    where.add_argument("--group", metavar="NAME", help="every device of a group (see the agent's groups)")
    parser.add_argument("--key", required=True, type=Path, help="private key that signs the desired doc")
    parser.add_argument("--model", default="default", help="model name on the device (default: %(default)s)")
    parser.add_argument("--no-wait", action="store_true", help="publish and return without following devices")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for outcomes (default 300)"
    )
    parser.add_argument(
        "--reset-seq",
        action="store_true",
        help="a signed reset of the devices' seq for this model, for a seq stuck ahead of the clock "
        "(refusals with code seq_in_future or replayed; docs/protocol.md)",
    )
    add_broker_options(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = subparsers.add_parser(
        "push",
        help="deploy a bundle to a device or a group",
        description="Deploy a signed bundle: put it in the registry and publish the desired state.",
        epilog=PUSH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("bundle", type=Path, metavar="BUNDLE")
    _common(push)
    push.add_argument(
        "--registry", required=True, type=Path, metavar="DIR", help="the registry's bundle folder"
    )
    push.add_argument("--rollback", action="store_true", help="allow a lower version than the one running")
    push.set_defaults(handler=_push)

    rollback = subparsers.add_parser(
        "rollback",
        help="return a device or group to its previous bundle",
        description=(
            "Publish a signed desired doc that points the model back at the bundle each device "
            "reports as its previous one (or --to a bundle file), with the downgrade permission set."
        ),
    )
    _common(rollback)
    rollback.add_argument("--to", type=Path, metavar="BUNDLE", help="roll back to this bundle file instead")
    rollback.add_argument("--registry", type=Path, metavar="DIR", help="registry folder (needed with --to)")
    rollback.set_defaults(handler=_rollback)


def _connection(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fleet.push import FleetConnection, Target

    target = Target("device", args.device) if args.device else Target("group", args.group)
    settings = broker_settings(args)
    topics = settings.topics()
    try:
        target.model_topic(topics, args.model)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    conn = FleetConnection(settings.broker, topics, f"edgectl-{os.getpid()}")
    return target, conn


def _publish_and_follow(
    args: argparse.Namespace,
    conn: FleetConnection,
    target: Target,
    ref: BundleRef,
    key: SigningKey,
    *,
    rollback: bool,
    reported: dict[str, bytes],
    say_first: Callable[[int], str],
) -> int:
    """Publish the model's desired doc, then follow it to each device's real outcome."""
    from fleet.follow import Follower
    from fleet.push import devices_of, publish_desired, seq_floor

    devices = devices_of(conn, target, reported)
    # Subscribed before publishing: an immediate refusal is not missed.
    follower = Follower(conn, devices, args.model, ref, lambda line: print(line, flush=True))

    def publish(floor: int, reset: bool = False) -> Published:
        return publish_desired(
            conn, target, args.model, ref, key, rollback=rollback, reset_seq=reset, floor=floor
        )

    published = publish(seq_floor(conn, target, reported), args.reset_seq)
    print(say_first(published.seq), flush=True)
    if args.no_wait:
        return 0
    if not devices:
        print(f"no device reports membership of group {args.group} yet; they will catch up when they do")
        return 0
    results = follower.follow(published, args.timeout, publish)
    for result in results:
        print(f"{result.device}: {'OK' if result.ok else result.status.upper()} - {result.detail}")
    for status, code in EXIT_STATUS.items():
        if any(r.status == status for r in results if not r.ok):
            return code
    return 0


def _push(args: argparse.Namespace) -> int:
    from edgeagent.protocol import BundleRef
    from edgeagent.signing import SigningKey
    from fleet.push import add_to_registry, check_registry, verify_own_bundle

    key = SigningKey.load(args.key)
    verified = verify_own_bundle(args.bundle, key)
    m = verified.manifest
    check_registry(args.registry)
    ref = BundleRef(name=m.name, version=m.version, sha256=verified.sha256, size=verified.size)
    target, conn = _connection(args)
    with conn:
        # Copied only once the broker answers: a failed push leaves nothing in the registry.
        stored = add_to_registry(args.bundle, verified, args.registry)
        reported = conn.retained(conn.topics.all_devices("reported"))
        return _publish_and_follow(
            args,
            conn,
            target,
            ref,
            key,
            rollback=args.rollback,
            reported=reported,
            say_first=lambda seq: (
                f"pushed {m.name} {m.version} ({verified.sha256[:12]}, {stored.name}) to "
                f"{target.id} as model {args.model!r}, seq {seq}"
            ),
        )


def _rollback(args: argparse.Namespace) -> int:
    from edgeagent.protocol import BundleRef, Reported
    from edgeagent.signing import SigningKey
    from fleet.push import PushError, add_to_registry, devices_of, verify_own_bundle

    key = SigningKey.load(args.key)
    target, conn = _connection(args)
    with conn:
        reported = conn.retained(conn.topics.all_devices("reported"))
        devices = devices_of(conn, target, reported)
        if args.to is not None:
            if args.registry is None:
                raise UsageError("--to needs --registry")
            verified = verify_own_bundle(args.to, key)
            add_to_registry(args.to, verified, args.registry)
            ref = BundleRef(
                name=verified.manifest.name,
                version=verified.manifest.version,
                sha256=verified.sha256,
                size=verified.size,
            )
        else:
            previous: set[BundleRef] = set()
            for topic, payload in reported.items():
                if conn.topics.device_of(topic) not in devices:
                    continue
                status = Reported.model_validate_json(payload).models.get(args.model)
                if status and status.previous:
                    previous.add(status.previous)
            if len(previous) != 1:
                found = ", ".join(sorted(f"{r.name} {r.version}" for r in previous)) or "none"
                raise PushError(
                    f"devices report {len(previous)} previous bundles ({found}); name one with --to"
                )
            ref = previous.pop()
        return _publish_and_follow(
            args,
            conn,
            target,
            ref,
            key,
            rollback=True,
            reported=reported,
            say_first=lambda seq: (
                f"rolling {target.id} back to {ref.name} {ref.version} ({ref.sha256[:12]}), seq {seq}"
            ),
        )
