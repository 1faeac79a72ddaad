"""``edgectl command``: send a signed command to one device and print its reply."""

from __future__ import annotations

import argparse
import json
import os
import queue
import time
import uuid
from pathlib import Path

from edgeagent.errors import UsageError
from fleet.hostopts import add_broker_options, broker_settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = subparsers.add_parser(
        "command",
        help="send a signed command to a device (refresh, bench) and show the reply",
        description=(
            "refresh: the device republishes its reported state and reconciles its desired state now. "
            "bench: the device re-runs each served model's acceptance test (golden set, latency) "
            "and replies with the verdicts. Commands are signed and carry a sequence number, so "
            "a replayed command is refused."
        ),
        epilog="example:\n  edgectl command bench --device pi-1 --key keys/release.key --broker mqtt://broker:1883",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("name", choices=("refresh", "bench"))
    cmd.add_argument("--device", required=True, metavar="ID")
    cmd.add_argument("--key", required=True, type=Path, help="private key that signs the command")
    cmd.add_argument("--model", help="only this model name (bench)")
    cmd.add_argument(
        "--reset-seq",
        action="store_true",
        help="a signed reset of the device's command seq (docs/protocol.md)",
    )
    cmd.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reply (default 60)")
    cmd.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_broker_options(cmd)
    cmd.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    from edgeagent.mqtt import Message
    from edgeagent.protocol import Command, CommandReply, sign_document, verdict_in
    from edgeagent.signing import SigningKey
    from fleet.push import FleetConnection, PushError, next_seq

    key = SigningKey.load(args.key)
    settings = broker_settings(args)
    topics = settings.topics()
    try:
        reply_topic = topics.cmd_reply(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    command = Command(
        seq=next_seq(0, reset=args.reset_seq, jitter=False),
        reset_seq=args.reset_seq,
        id=uuid.uuid4().hex[:12],
        target=f"device:{args.device}",
        name=args.name,
        model=args.model,
    )
    replies: queue.Queue[Message] = queue.Queue()
    with FleetConnection(settings.broker, topics, f"edgectl-cmd-{os.getpid()}") as conn:
        conn.session.subscribe(reply_topic, replies.put)
        time.sleep(0.2)  # let the subscription settle before the device can answer
        if not conn.session.publish(topics.cmd(args.device), sign_document(command, key), qos=1):
            raise PushError("lost the broker connection while sending the command")
        deadline = time.monotonic() + args.timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = replies.get(timeout=left)
            except queue.Empty:
                break
            try:
                reply = CommandReply.model_validate_json(msg.payload)
            except ValueError:
                continue
            if reply.id != command.id:
                continue
            if args.json:
                print(json.dumps(reply.model_dump(mode="json"), indent=2))
            else:
                print(f"{args.device}: {'OK' if reply.ok else 'FAILED'} ({reply.code}) - {reply.detail}")
                for name in reply.result:
                    verdict = verdict_in(reply.result, name)
                    if verdict is None:
                        print(f"  {name}: unreadable verdict")
                        continue
                    checks = ", ".join(
                        f"{c.name} {c.value:.4g} ({c.op} {c.bound:.4g})"
                        for c in verdict.checks
                        if c.value is not None
                    )
                    print(
                        f"  {name}: {'passed' if verdict.passed else 'FAILED'} on "
                        f"{verdict.runtime}/{verdict.delegate}; "
                        f"p50 {verdict.latency.p50_ms:.3f} ms, "
                        f"p95 {verdict.latency.p95_ms:.3f} ms; {checks or 'no bounds'}"
                    )
            return 0 if reply.ok else 1
    raise PushError(f"no reply from {args.device} within {args.timeout:.0f} s (is it online?)")
