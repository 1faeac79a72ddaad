"""Default paths and names the command lines show in their help, with no imports.

They live here, not beside the code that uses them (config, protocol, client), so that
``--help`` does not import pydantic or numpy to print a default.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/agent.toml")
CONFIG_ENV = "EDGEAGENT_CONFIG"
DEFAULT_PREFIX = "edge"  # first level of every MQTT topic
DEFAULT_SOCKET = Path("/run/edgeagent/agent.sock")  # socket_path in agent.toml, by default
DEFAULT_PROFILES_DIR = Path("/etc/edgeagent/profiles")  # an operator's own device profiles
