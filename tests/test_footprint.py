"""A device installs edgeagent + devices + one runtime: the agent must not import host packages."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from edgeagent.cli.common import build_parser
from edgeagent.cli.agent import COMMANDS
build_parser("edgeagent", "", COMMANDS)
import edgeagent.agent, edgeagent.serving.server, edgeagent.transfer, edgeagent.client
import edgeagent.runtimes.ort, edgeagent.runtimes.litert, devices.detect
host = ("onnx", "tensorflow", "torch", "sklearn", "converter", "fleet", "rich", "keras", "matplotlib")
print(",".join(m for m in host if m in sys.modules))
"""


def test_agent_imports_no_host_package() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"the agent imported host-only packages: {result.stdout.strip()}"
