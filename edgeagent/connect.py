"""How an agent reaches the outside: its MQTT session (TLS, last will) and its trusted keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgeagent.config import AgentConfig
from edgeagent.errors import UsageError
from edgeagent.mqtt import BrokerConfig, MqttSession, TLSConfig
from edgeagent.protocol import Reported, Topics
from edgeagent.signing import KeyRing


def agent_session(*, config: AgentConfig, topics: Topics, on_connect: Callable[[], None]) -> MqttSession:
    """The device's MQTT session; its last will marks the device offline (retained)."""
    tls = TLSConfig.from_files(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
    broker = BrokerConfig.from_url(config.broker_url or "", protocol=config.mqtt_protocol, tls=tls)
    will = (
        topics.reported(config.device_id),
        Reported(device=config.device_id, online=False).model_dump_json().encode(),
    )
    return MqttSession(broker, f"edgeagent-{config.device_id}", will=will, on_connect=on_connect)


def load_trusted(folder: Path, insecure: bool) -> KeyRing:
    """Trusted keys; a missing folder is only fatal when something must be verified."""
    if not folder.is_dir():
        if insecure:
            return KeyRing()
        raise UsageError(f"trusted key folder {folder} does not exist (set trusted_keys in agent.toml)")
    return KeyRing.from_paths([folder])
