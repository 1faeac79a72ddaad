"""Agent telemetry: latency, memory, CPU, temperatures, accuracy, published every interval.

See docs/telemetry.md for the message and what each figure means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeagent.config import AgentConfig
from edgeagent.telemetry.reporter import ActiveModel, TelemetryReporter, session_counters, total_variation
from edgeagent.telemetry.spool import Spool
from edgeagent.telemetry.system import SystemProbe, read_power_mode, read_temperatures, read_throttling

__all__ = [
    "ActiveModel",
    "Spool",
    "SystemProbe",
    "TelemetryReporter",
    "read_power_mode",
    "read_temperatures",
    "read_throttling",
    "reporter_for",
    "total_variation",
]

SPOOL_DIR = "telemetry-spool"


def reporter_for(
    config: AgentConfig, *, session: Any, server: Any, topic: str, profile: str | None
) -> TelemetryReporter:
    """The reporter an agent with ``config`` runs (``server``: the InferenceServer)."""

    def active() -> Mapping[str, ActiveModel]:
        return {
            name: ActiveModel(
                served.version, served.model.runtime, served.model.delegate, served.verdict, served.bundle
            )
            for name, served in server.served().items()
        }

    spool = Spool(
        config.state_dir / SPOOL_DIR,
        max_messages=config.telemetry_spool_max_messages,
        max_bytes=int(config.telemetry_spool_max_mb * 1024 * 1024),
    )
    return TelemetryReporter(
        device_id=config.device_id,
        topic=topic,
        session=session,
        stats=server.stats,
        active=active,
        probe=SystemProbe(config.telemetry_root or config.detect_root, config.state_dir),
        spool=spool,
        interval_s=config.telemetry_interval_s,
        groups=list(config.groups),
        profile=profile,
        mqtt_counters=session_counters(session) if session is not None else None,
    )
