"""``edgectl``: the host program.

It lives in :mod:`fleet` (host side) rather than :mod:`edgeagent` because it fronts the
converter and fleet commands, and nothing in ``edgeagent`` may import those. Each
sub-command group is a module with ``register(subparsers)``; add new ones to ``COMMANDS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from edgeagent.cli.common import main_for

DESCRIPTION = """\
Host tools for edge model deployment: make signing keys, compress models and package them
into signed, reproducible bundles, push them to a fleet over MQTT, and watch the fleet.

first steps:
  edgectl keys generate --name release --out keys/
  edgectl bundle create --name digits --version 1.0.0 --model mlp.onnx --key keys/release.key -o out/
  edgectl bundle verify out/digits-1.0.0.bundle --trusted keys/release.pub
  edgectl bundle inspect out/digits-1.0.0.bundle
"""

COMMANDS: tuple[str, ...] = (
    "edgeagent.cli.keys_cmd",
    "edgeagent.cli.bundle_cmd",
    "fleet.registry_cmd",
    "fleet.push_cmd",
    "fleet.command_cmd",
    "fleet.fleet_cmd",
    "fleet.rollout.cli",  # rollout: staged rollouts (issue 20)
    "fleet.demo_cmd",
    "converter.cli",
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    main_for("edgectl", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    main()
