"""``edgectl demo``: the whole loop on this machine, no configuration."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the whole loop on this machine: convert, push, deploy, serve, report",
        description=(
            "Start a broker (Mosquitto if installed, else embedded amqtt), a registry and a device "
            "agent in a temporary folder; convert the digits model with pruning and int8; push the "
            "signed bundle; wait for the device to prove and activate it; run predictions; print "
            "what the device reports; stop everything."
        ),
    )
    demo.add_argument("--workdir", type=Path, help="keep everything in this (new or empty) folder")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder afterwards")
    demo.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="which broker to start (default: Mosquitto when installed, else embedded amqtt)",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from fleet.demo import demo_main

    return demo_main(args.keep, args.workdir, args.broker)
