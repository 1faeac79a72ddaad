"""The agent's configuration: ``/etc/edgeagent/agent.toml`` plus ``EDGEAGENT_*`` variables.

Precedence, lowest first: the defaults below, the TOML file, then one environment variable
per top-level setting (``EDGEAGENT_STATE_DIR=/data/edgeagent``), which is how a systemd
drop-in or a container changes one value without editing the file. ``EDGEAGENT_CONFIG``
names the file itself. Unknown keys and unknown ``EDGEAGENT_*`` variables are errors that
name the key: a misspelt option must not be silently ignored on a device nobody watches.

Later issues add sections (``[mqtt]``, ``[telemetry]``, ...) as nested models; every field
has a description, and ``systemd/agent.toml.example`` documents each one (a test keeps the
two in step).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from devices.errors import UnknownProfile
from devices.profile import DEFAULT_PROFILES_DIR, Precision, list_profiles
from edgeagent.defaults import CONFIG_ENV, DEFAULT_CONFIG_PATH
from edgeagent.errors import UsageError
from edgeagent.validation import problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 devices only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ENV_PREFIX = "EDGEAGENT_"


class ConfigError(UsageError):
    """The agent configuration cannot be read or is invalid; the message names the key."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key


def _hostname() -> str:
    # An MQTT topic level cannot hold '/', '+' or '#'; a hostname never does.
    return socket.gethostname().split(".", 1)[0] or "edgeagent"


DeviceId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Up to 64 letters, digits, '.', '_' or '-'; starts with a letter or digit.",
    ),
]


class AgentConfig(BaseModel):
    """Everything the agent reads at start-up. Every field has a default that works on a device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId = Field(
        default_factory=_hostname,
        description="This device's id in MQTT topics and fleet views; defaults to the short hostname.",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/edgeagent"),
        description="The store: downloads, verified bundles, per-model current/previous links, journal.",
    )
    profiles_dir: Path = Field(
        default=DEFAULT_PROFILES_DIR,
        description=(
            "Folder of local device profiles (<name>.toml); one named like a shipped profile replaces it."
        ),
    )
    profile: str | None = Field(
        default=None,
        description="Device profile to use instead of detecting one (`edgeagent detect`); unset = detect.",
    )
    precision: list[Precision] = Field(
        default_factory=list,
        description=(
            "Artifact precisions every model may be served from, most preferred first (e.g. fp32, int8); "
            "empty = the profile's order."
        ),
    )
    model_precision: dict[str, list[Precision]] = Field(
        default_factory=dict,
        description="Per model name, the same list; wins over `precision` for that model.",
    )
    detect_root: Path = Field(
        default=Path("/"),
        description="Root filesystem that hardware detection reads (/proc, /sys, /dev, /etc, libraries).",
    )
    socket_path: Path = Field(
        default=Path("/run/edgeagent/agent.sock"),
        description="Unix socket of the local inference endpoint (HTTP/1.1; see docs/runtimes.md).",
    )
    max_sessions: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="Stateful models: client sessions kept (the least recently used is evicted).",
    )
    session_idle_s: float = Field(
        default=600.0,
        gt=0,
        description="Stateful models: seconds after which an idle session's state is dropped.",
    )
    status_interval_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds between re-reads of the store to refresh the status line systemd shows.",
    )
    watchdog_fraction: float = Field(
        default=0.5,
        ge=0.1,
        le=0.9,
        description="Fraction of systemd's WatchdogSec between WATCHDOG=1 pings (0.5 = twice per period).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level of `edgeagent run` (to stderr, which journald collects)."
    )
    broker_url: str | None = Field(
        default=None,
        description="MQTT broker, mqtt://host:1883 or mqtts://host:8883; unset = no deployment, serve only.",
    )
    mqtt_protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT protocol version.")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle for the broker's certificate (mqtts)."
    )
    tls_cert_file: Path | None = Field(default=None, description="Client certificate for mutual TLS.")
    tls_key_file: Path | None = Field(default=None, description="Private key of the client certificate.")
    groups: list[str] = Field(
        default_factory=list,
        description="Groups this device belongs to; their desired docs apply, the device's own doc wins.",
    )
    topic_prefix: str = Field(default="edge", description="First level of every MQTT topic.")
    trusted_keys: Path = Field(
        default=Path("/etc/edgeagent/keys"),
        description="Folder of trusted Ed25519 public keys (*.pub) for bundles and desired docs.",
    )
    trust_root: Path | None = Field(
        default=None,
        description=(
            "Public key of the offline root that signs key sets (edge/v1/trust); unset = the "
            "trusted_keys folder only, forever."
        ),
    )
    insecure: bool = Field(
        default=False,
        description="Accept unsigned desired docs and bundles. Only for the local demo; logged loudly.",
    )
    keep_bundles: int = Field(
        default=3, ge=1, le=100, description="Installed bundles kept, current/previous included."
    )
    max_bundle_mb: float = Field(
        default=2048.0,
        gt=0,
        le=65536,
        description="Largest bundle (MiB) a desired doc may name; a larger one is refused unread.",
    )
    free_space_margin_mb: float = Field(
        default=16.0,
        ge=0,
        le=65536,
        description="Free space (MiB) a download must leave after the bundle and its extraction.",
    )
    store_check_interval_s: float = Field(
        default=3600.0,
        ge=0,
        le=7 * 86400,
        description="Seconds between checks of the active bundles against their signed manifests "
        "(also on every start); 0 = only on start.",
    )
    deploy_max_attempts: int = Field(
        default=5, ge=1, le=100, description="Starts of one bundle's deployment before it is given up."
    )
    retry_base_s: float = Field(
        default=10.0, gt=0, le=3600, description="First wait (s) before a transient failure is retried."
    )
    retry_cap_s: float = Field(
        default=600.0, gt=0, le=86400, description="Longest wait (s) between retries (backoff with jitter)."
    )
    transfer_block_kib: int = Field(
        default=256, ge=4, le=256, description="Block size of bundle downloads in KiB (bench/transfer.py)."
    )
    transfer_window: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Blocks in flight; download memory is about window x block size.",
    )

    telemetry_interval_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="Seconds between telemetry messages (latency, memory, accuracy); 0 = no telemetry.",
    )
    telemetry_root: Path | None = Field(
        default=None,
        description="Root whose /sys telemetry reads (temperatures, throttling); unset = detect_root.",
    )
    telemetry_spool_max_messages: int = Field(
        default=8640,
        ge=1,
        le=1_000_000,
        description="Telemetry messages kept on disk while the broker is away (8640 = one day at 10 s).",
    )
    telemetry_spool_max_mb: float = Field(
        default=32.0,
        gt=0,
        le=4096,
        description="Disk the telemetry spool may use in MB; past either bound the oldest are dropped.",
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        known = list_profiles(info.data.get("profiles_dir"))  # validated before: declared before
        if value not in known:
            raise ValueError(str(UnknownProfile(value, known)))
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # EDGEAGENT_PRECISION=fp32,int8 arrives as one string.
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

    @field_validator("precision", "model_precision")
    @classmethod
    def _no_repeats(cls, value: list[str] | dict[str, list[str]]) -> list[str] | dict[str, list[str]]:
        for listed in value.values() if isinstance(value, dict) else [value]:
            if len(set(listed)) != len(listed):
                raise ValueError(f"{listed} names a precision twice")
        return value

    def precision_for(self, model: str) -> list[Precision]:
        """The precision override for the model served as ``model`` (empty: none)."""
        return self.model_precision.get(model, self.precision)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``EDGEAGENT_<FIELD>`` values for top-level settings; an empty value means unset."""
    fields = AgentConfig.model_fields
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in fields:
            known = ", ".join(ENV_PREFIX + k.upper() for k in fields)
            raise ConfigError(f"unknown environment variable {name} (known: {known}, {CONFIG_ENV})", key=name)
        overrides[key] = value if value != "" else None
    return overrides


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load the configuration from ``path`` (or ``$EDGEAGENT_CONFIG``, or the default path).

    A missing file at the *default* path gives the defaults, so a fresh install runs; a
    missing file that was asked for explicitly is an error.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or CONFIG_ENV in environ
    path = path or Path(environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist", path=str(path)) from None
        data = {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", path=str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", path=str(path)) from exc
    overrides = _env_overrides(environ)
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    return _validate(data, path=path, from_env=set(overrides))


def _validate(data: Mapping[str, Any], *, path: Path, from_env: set[str]) -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        top = str(first["loc"][0]) if first["loc"] else ""
        source = f"{ENV_PREFIX}{top.upper()}" if top in from_env else str(path)
        message = f"{source}: {problems(exc, known=AgentConfig.model_fields)}"
        raise ConfigError(message, path=str(path), key=key) from exc
