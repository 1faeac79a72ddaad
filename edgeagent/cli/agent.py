"""``edgeagent``: the device program.

Each sub-command lives in its own module with a ``register(subparsers)`` function; add new
ones to ``COMMANDS``. Modules here must not import host-only packages (converter, fleet,
onnx, tensorflow, torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from edgeagent.cli.common import main_for

DESCRIPTION = """\
The on-device agent: pulls signed model bundles over MQTT, verifies them, picks the best
runtime for this hardware, proves accuracy and latency before switching over, and serves
local inference.

examples:
  edgeagent detect                                   # which profile this board gets, and why
  edgeagent run --config /etc/edgeagent/agent.toml   # the service (what systemd starts)
  edgeagent status                                   # active/previous bundles, journal, last outcome
  edgeagent serve digits-1.0.0.bundle --trusted /etc/edgeagent/keys/ --socket /tmp/edge.sock
  edgeagent infer --socket /tmp/edge.sock --input digit.npy
  edgeagent feedback --socket /tmp/edge.sock 3f2a9c1e-1b 7     # that prediction's true class
  edgeagent bundle verify digits-1.0.0.bundle --trusted /etc/edgeagent/keys/release.pub
"""

COMMANDS: tuple[str, ...] = (
    "edgeagent.cli.bundle_cmd",
    "edgeagent.cli.detect_cmd",
    "edgeagent.cli.run_cmd",
    "edgeagent.cli.status_cmd",
    "edgeagent.cli.service_cmd",
    "edgeagent.cli.serve_cmd",
    "edgeagent.cli.infer_cmd",
    "edgeagent.cli.feedback_cmd",
    "edgeagent.cli.bench_cmd",
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    main_for("edgeagent", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    main()
