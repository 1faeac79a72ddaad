"""AgentConfig: defaults, the TOML file, EDGEAGENT_* overrides, and errors that name the key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgeagent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config
from edgeagent.errors import EdgeError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_every_field_is_described() -> None:
    missing = [name for name, field in AgentConfig.model_fields.items() if not field.description]
    assert missing == []


def test_defaults_when_the_default_file_is_absent(tmp_path: Path) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    config = load_config(environ={})
    assert config.device_id == socket.gethostname().split(".")[0]
    assert config.state_dir == Path("/var/lib/edgeagent")
    assert config.profile is None
    assert config.socket_path == Path("/run/edgeagent/agent.sock")


def test_file_then_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'device_id = "pi-kitchen-01"\nstatus_interval_s = 5\nprofile = "rpi4"\n')
    config = load_config(
        path, environ={"EDGEAGENT_STATUS_INTERVAL_S": "2.5", "EDGEAGENT_STATE_DIR": "/data/ea"}
    )
    assert (config.device_id, config.status_interval_s, config.state_dir) == (
        "pi-kitchen-01",
        2.5,
        Path("/data/ea"),
    )
    assert config.profile == "rpi4"


def test_empty_environment_value_means_default(tmp_path: Path) -> None:
    path = write(tmp_path, 'profile = "rpi4"\n')
    assert load_config(path, environ={"EDGEAGENT_PROFILE": ""}).profile is None


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'device_id = "from-env-file"\n')
    assert load_config(environ={"EDGEAGENT_CONFIG": str(path)}).device_id == "from-env-file"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("stat_dir = '/x'\n", {}, "agent.toml: unknown key 'stat_dir' (known: device_id, state_dir,"),
        (
            "profile = 'pi4'\n",
            {},
            "agent.toml: profile: unknown device profile 'pi4' (known: coral-devboard,",
        ),
        ("device_id = 'a/b'\n", {}, "agent.toml: device_id: String should match pattern"),
        ("status_interval_s = 0\n", {}, "agent.toml: status_interval_s: Input should be greater than 0"),
        ("watchdog_fraction = 1.0\n", {}, "watchdog_fraction: Input should be less than or equal to 0.9"),
        ("", {"EDGEAGENT_LOG_LEVEL": "LOUD"}, "EDGEAGENT_LOG_LEVEL: log_level: Input should be 'DEBUG'"),
        ("", {"EDGEAGENT_STATEDIR": "/x"}, "unknown environment variable EDGEAGENT_STATEDIR (known: "),
        ("device_id = \n", {}, "agent.toml is not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=environ)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, EdgeError)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})
