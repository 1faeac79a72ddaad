"""How every host command reaches the broker: one option set, one resolution, one builder.

``push``, ``rollback``, ``command``, ``registry serve`` and ``fleet collect`` share
:func:`add_broker_options` and :func:`broker_settings`. Each setting comes from the first of:
the command-line flag, its ``EDGECTL_*`` environment variable, the ``[broker]`` table of the
edgectl config file, the default (docs/cli.md). The password never has to be in the URL
(where ``ps`` shows it): ``--password-file``, ``EDGECTL_PASSWORD`` or ``EDGECTL_PASSWORD_FILE``.

Nothing heavy is imported at module level: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.defaults import DEFAULT_PREFIX
from edgeagent.errors import UsageError

if TYPE_CHECKING:
    from edgeagent.mqtt import BrokerConfig
    from edgeagent.protocol import Topics

log = logging.getLogger(__name__)

CONFIG_ENV = "EDGECTL_CONFIG"
PASSWORD_ENV = "EDGECTL_PASSWORD"  # noqa: S105 - the variable's name, not a password
# Setting -> (flag, environment variable); the config file's [broker] keys are the settings' names.
SETTINGS: dict[str, tuple[str, str]] = {
    "url": ("--broker", "EDGECTL_BROKER"),
    "ca_file": ("--ca-file", "EDGECTL_CA_FILE"),
    "cert_file": ("--cert-file", "EDGECTL_CERT_FILE"),
    "key_file": ("--key-file", "EDGECTL_KEY_FILE"),
    "username": ("--username", "EDGECTL_USERNAME"),
    "password_file": ("--password-file", "EDGECTL_PASSWORD_FILE"),
    "prefix": ("--prefix", "EDGECTL_PREFIX"),
}
PATHS = ("ca_file", "cert_file", "key_file", "password_file")


def default_config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgectl" / "config.toml"


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    """The broker options of a host command (all optional here: they may come from elsewhere)."""
    group = parser.add_argument_group(
        "broker connection",
        "each also from $EDGECTL_<NAME> or the config file's [broker] table (docs/cli.md)",
    )
    group.add_argument("--broker", dest="url", metavar="URL", help="mqtt://host:1883 or mqtts://host:8883")
    group.add_argument(
        "--ca-file", type=Path, metavar="PEM", help="CA bundle that signed the broker's certificate"
    )
    group.add_argument("--cert-file", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--key-file", type=Path, metavar="PEM", help="private key of the client certificate")
    group.add_argument("--username", metavar="NAME", help="MQTT user name")
    group.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="file holding the MQTT password (or $EDGECTL_PASSWORD)",
    )
    group.add_argument(
        "--prefix",
        "--topic-prefix",
        dest="prefix",
        metavar="PREFIX",
        help=f"topic prefix (default: {DEFAULT_PREFIX})",
    )
    group.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="edgectl config file (default: ~/.config/edgectl/config.toml)",
    )


@dataclass(frozen=True)
class BrokerSettings:
    broker: BrokerConfig
    prefix: str
    origin: dict[str, str]  # setting -> where it came from ('--broker', 'EDGECTL_BROKER', file path)

    def topics(self) -> Topics:
        from edgeagent.protocol import Topics

        try:
            return Topics(self.prefix)
        except ValueError as exc:
            raise UsageError(f"{self.origin.get('prefix', 'prefix')}: {exc}") from exc


def broker_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BrokerSettings:
    """Resolve the broker options (flag > environment > config file > default); UsageError if unusable."""
    from edgeagent.mqtt import BrokerConfig, TLSConfig

    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    file_values, file_path = _config_file(getattr(args, "config", None), environ)
    for name, (flag, env) in SETTINGS.items():
        for value, where in ((getattr(args, name, None), flag), (environ.get(env) or None, env)):
            if value is not None:
                values[name], origin[name] = value, where
                break
        else:
            if name in file_values:
                values[name], origin[name] = file_values[name], f"{file_path} [broker] {name}"
    if "url" not in values:
        raise UsageError(
            "no broker given: use --broker URL, $EDGECTL_BROKER or url in the config file's [broker]"
        )
    for name in PATHS:
        if name in values:
            values[name] = Path(values[name]).expanduser()
            if not values[name].is_file():
                raise UsageError(f"{origin[name]} {values[name]}: no such file")
    if ("cert_file" in values) != ("key_file" in values):
        raise UsageError("mutual TLS needs both a client certificate (--cert-file) and its key (--key-file)")
    tls = None
    if any(name in values for name in ("ca_file", "cert_file")):
        found = {n: str(values[n]) if n in values else None for n in ("ca_file", "cert_file", "key_file")}
        tls = TLSConfig(ca_file=found["ca_file"], cert_file=found["cert_file"], key_file=found["key_file"])
    broker = BrokerConfig.from_url(str(values["url"]), tls=tls)
    if broker.password is not None:
        log.warning(
            "the broker URL carries a password, which `ps` shows; use --password-file or $EDGECTL_PASSWORD"
        )
    password = _password(values, origin, environ)
    username = values.get("username") or broker.username
    broker = _replace(
        broker, username=username, password=password if password is not None else broker.password
    )
    return BrokerSettings(broker, str(values.get("prefix") or DEFAULT_PREFIX), origin)


def _password(values: dict[str, Any], origin: dict[str, str], environ: Mapping[str, str]) -> str | None:
    # --password-file > $EDGECTL_PASSWORD > $EDGECTL_PASSWORD_FILE > the file's password_file
    if origin.get("password_file") == "--password-file" or PASSWORD_ENV not in environ:
        path = values.get("password_file")
        if path is None:
            return None
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{origin['password_file']} {path}: cannot read it ({exc})") from exc
    origin["password"] = PASSWORD_ENV
    return environ[PASSWORD_ENV]


def _replace(broker: BrokerConfig, **changes: Any) -> BrokerConfig:
    import dataclasses

    return dataclasses.replace(broker, **changes)


def _config_file(flag: Path | None, environ: Mapping[str, str]) -> tuple[dict[str, Any], Path | None]:
    """The [broker] table of the config file; missing is fine only at the default path."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

    explicit = flag if flag is not None else (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    path = explicit or default_config_path(environ)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit is not None:
            raise UsageError(f"config file {path} does not exist") from None
        return {}, None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path}: {exc}") from exc
    unknown = sorted(set(data) - {"broker"})
    table = data.get("broker", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [broker] must be a table")
    unknown += [f"broker.{k}" for k in sorted(set(table) - set(SETTINGS))]
    if unknown:
        known = ", ".join(SETTINGS)
        raise UsageError(f"{path}: unknown key {', '.join(unknown)} (known in [broker]: {known})")
    for name, value in table.items():
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}: broker.{name} must be a non-empty string")
        if name in PATHS:  # relative to the file, not to wherever the command runs
            table[name] = str((path.parent / Path(value).expanduser()).resolve())
    return table, path
