"""Host identities (issue 19, item 4): one option set for every host command that talks to a
broker, with flag > EDGECTL_* environment > config file > default, and no password in the URL."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from edgeagent.errors import UsageError
from fleet.hostopts import add_broker_options, broker_settings

# Every host command that connects to a broker, with the arguments it needs besides the broker.
BROKER_COMMANDS = [
    ["push", "b.bundle", "--device", "d", "--key", "k", "--registry", "r"],
    ["rollback", "--device", "d", "--key", "k"],
    ["command", "refresh", "--device", "d", "--key", "k"],
    ["registry", "serve", "--dir", "x"],
    ["fleet", "collect"],
]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_broker_options(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("ca", "cert", "key", "ca2", "password"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("secret\n" if name == "password" else "x")
    return files


@pytest.mark.parametrize("argv", BROKER_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_broker_command_has_the_shared_options(argv: list[str]) -> None:
    from edgeagent.cli.common import build_parser
    from fleet.edgectl import COMMANDS, DESCRIPTION

    parser = build_parser("edgectl", DESCRIPTION, COMMANDS)
    args = parser.parse_args([*argv, "--broker", "mqtts://h:8883", "--ca-file", "c", "--cert-file", "c",
                              "--key-file", "k", "--username", "u", "--password-file", "p",
                              "--prefix", "x", "--config", "f.toml"])  # fmt: skip
    assert (args.url, args.username, args.prefix) == ("mqtts://h:8883", "u", "x")


def test_flag_beats_environment_beats_config_file_beats_default(tmp_path: Path, pem: dict[str, Path]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[broker]\nurl = "mqtt://file:1883"\nca_file = "ca2.pem"\nusername = "file-user"\nprefix = "f"\n'
    )
    env = {
        "EDGECTL_CONFIG": str(config),
        "EDGECTL_BROKER": "mqtts://env:8883",
        "EDGECTL_USERNAME": "env-user",
    }
    s = broker_settings(_parse(), env)
    assert (s.broker.host, s.broker.port, s.broker.username, s.prefix) == ("env", 8883, "env-user", "f")
    assert s.broker.tls is not None and s.broker.tls.ca_file == str(pem["ca2"])  # relative to the file
    s = broker_settings(
        _parse("--broker", "mqtt://flag:1", "--username", "flag-user", "--ca-file", str(pem["ca"])), env
    )
    assert (s.broker.host, s.broker.username, s.broker.tls.ca_file) == ("flag", "flag-user", str(pem["ca"]))  # type: ignore[union-attr]
    assert s.origin["url"] == "--broker" and s.origin["prefix"].endswith("[broker] prefix")
    s = broker_settings(_parse("--broker", "mqtt://h"), {"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert s.prefix == "edge" and s.broker.tls is None and s.broker.password is None


def test_the_default_config_file_is_read_from_the_xdg_folder(tmp_path: Path) -> None:
    (tmp_path / "edgectl").mkdir()
    (tmp_path / "edgectl" / "config.toml").write_text('[broker]\nurl = "mqtt://xdg:1883"\n')
    assert broker_settings(_parse(), {"XDG_CONFIG_HOME": str(tmp_path)}).broker.host == "xdg"


def test_the_password_comes_from_a_file_or_the_environment_not_the_url(pem: dict[str, Path]) -> None:
    env = {"XDG_CONFIG_HOME": "/nonexistent"}
    s = broker_settings(
        _parse("--broker", "mqtt://h", "--username", "u", "--password-file", str(pem["password"])), env
    )
    assert (s.broker.username, s.broker.password) == ("u", "secret")
    s = broker_settings(_parse("--broker", "mqtt://h"), {**env, "EDGECTL_PASSWORD": "from-env"})
    assert s.broker.password == "from-env"
    both = {**env, "EDGECTL_PASSWORD": "from-env", "EDGECTL_PASSWORD_FILE": str(pem["password"])}
    assert broker_settings(_parse("--broker", "mqtt://h"), both).broker.password == "from-env"
    flag = _parse("--broker", "mqtt://h", "--password-file", str(pem["password"]))
    assert broker_settings(flag, both).broker.password == "secret"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {}, "no broker given"),
        (("--broker", "mqtt://h", "--ca-file", "/no/ca.pem"), {}, "--ca-file /no/ca.pem: no such file"),
        (
            ("--broker", "mqtt://h"),
            {"EDGECTL_CERT_FILE": "/no/c.pem"},
            "EDGECTL_CERT_FILE /no/c.pem: no such file",
        ),
        (
            ("--broker", "mqtt://h", "--config", "/no/config.toml"),
            {},
            "config file /no/config.toml does not exist",
        ),
        (("--broker", "ftp://h"), {}, "must look like mqtt://"),
        (("--broker", "mqtt://h", "--prefix", "a/#"), {}, "--prefix"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(
    argv: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        broker_settings(_parse(*argv), {"XDG_CONFIG_HOME": "/nonexistent", **env}).topics()
    assert "\n" not in str(info.value)


def test_a_client_certificate_needs_its_key_and_the_config_file_is_checked(
    tmp_path: Path, pem: dict[str, Path]
) -> None:
    env = {"XDG_CONFIG_HOME": "/nonexistent"}
    with pytest.raises(UsageError, match="both a client certificate"):
        broker_settings(_parse("--broker", "mqtt://h", "--cert-file", str(pem["cert"])), env)
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nurl = "mqtt://h"\npasword_file = "p"\n')
    with pytest.raises(UsageError, match=r"unknown key broker\.pasword_file"):
        broker_settings(_parse("--config", str(bad)), env)
    bad.write_text("[broker\n")
    with pytest.raises(UsageError, match=r"bad\.toml"):
        broker_settings(_parse("--config", str(bad)), env)
