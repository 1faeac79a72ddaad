"""What a rollout is: the bundle, the devices, the waves, the pacing and the gates.

Everything here is a value: the spec is stored as JSON in the fleet database when the rollout
is created and never changes afterwards, so a restarted controller drives exactly the rollout
the operator created.
"""

from __future__ import annotations

import enum
import math
import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeagent.errors import UsageError
from edgeagent.protocol import BundleRef

_WAVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


class RolloutState(enum.Enum):
    """A rollout's lifecycle. ``paused`` keeps in-flight devices going but starts none;
    ``aborting`` publishes rollbacks until every updated device has one, then ``aborted``."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"
    ABORTED = "aborted"
    COMPLETED = "completed"

    @property
    def final(self) -> bool:
        return self in (RolloutState.ABORTED, RolloutState.COMPLETED)


class DeviceState(enum.Enum):
    """One device in a rollout: waiting for its wave, pushed (downloading..validating), then an outcome."""

    PENDING = "pending"
    PUSHED = "pushed"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"  # the controller published its rollback document


def parse_waves(text: str) -> list[str]:
    """'1,5%,25%,100%' -> ['1', '5%', '25%', '100%']; UsageError on anything else.

    A plain number is a device count, a percentage a share of the target; both are
    cumulative (wave 3 of '1,5%,25%' ends when 25% of the target has been started)."""
    waves = [w.strip() for w in text.split(",") if w.strip()]
    if not waves:
        raise UsageError(f"--waves {text!r}: expected counts or percentages such as 1,5%,25%,100%")
    for wave in waves:
        match = _WAVE.match(wave)
        if not match or float(match.group(1)) <= 0 or (match.group(2) and float(match.group(1)) > 100):
            raise UsageError(f"--waves: {wave!r} is neither a device count nor a percentage in (0, 100]")
        if not match.group(2) and not match.group(1).isdigit():
            raise UsageError(f"--waves: {wave!r}: a device count is a whole number")
    return waves


def plan_waves(waves: list[str], devices: int) -> list[int]:
    """Cumulative device counts per wave for a target of ``devices``.

    Percentages round up (1% of 50 is one device, never zero); a wave that would add no device
    is dropped, and the last wave always reaches the whole target."""
    ends: list[int] = []
    for wave in waves:
        match = _WAVE.match(wave)
        if match is None:
            raise UsageError(f"--waves: {wave!r} is neither a device count nor a percentage")
        value = float(match.group(1))
        end = math.ceil(devices * value / 100) if match.group(2) else int(value)
        end = min(max(end, 1), devices)
        if not ends or end > ends[-1]:
            ends.append(end)
    if devices and (not ends or ends[-1] < devices):
        ends.append(devices)
    return ends


class Gates(BaseModel):
    """Abort criteria. A None bound is not checked. Ratios compare the new version with the
    version it replaced on the same devices (see docs/fleet.md, "Choosing gates")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_failure_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Failed / finished devices above this aborts (0-1)."
    )
    min_finished_for_ratio: int = Field(
        default=3, ge=1, description="The failure ratio is judged once this many devices finished."
    )
    max_acceptance_failures: int | None = Field(
        default=0, ge=0, description="More devices failing on-device acceptance than this aborts."
    )
    max_p99_ratio: float | None = Field(
        default=1.25, gt=0, description="New p99 / baseline p99 above this (any device profile) aborts."
    )
    max_accuracy_drop: float | None = Field(
        default=0.02, ge=0, le=1, description="Baseline minus new online accuracy above this aborts (0-1)."
    )
    max_rss_growth: float | None = Field(
        default=0.5, ge=0, description="New mean RSS / baseline - 1 above this aborts (0.5 = +50%)."
    )
    max_throttled_ratio: float | None = Field(
        default=None, ge=0, le=1, description="Share of updated devices newly throttling above this aborts."
    )
    min_requests: int = Field(
        default=50, ge=1, description="Requests each side needs before the p99 gate judges a profile."
    )
    min_labels: int = Field(
        default=50, ge=1, description="Labelled predictions each side needs before the accuracy gate judges."
    )


class Pacing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight: int = Field(
        default=50, ge=1, description="Most devices pushed and not yet finished at once (downloading)."
    )
    max_start_per_s: float = Field(default=20.0, gt=0, description="Most devices started per second.")
    device_timeout_s: float = Field(
        default=600.0, gt=0, description="A pushed device with no outcome after this has failed."
    )


class Target(BaseModel):
    """Who receives the bundle: resolved to device ids once, when the rollout is created."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str | None = None
    tag: str | None = None
    devices: list[str] | None = None

    @model_validator(mode="after")
    def _one(self) -> Target:
        if sum(x is not None for x in (self.group, self.tag, self.devices)) != 1:
            raise ValueError("a target is exactly one of a group, a tag query or a device list")
        return self

    def describe(self) -> str:
        if self.group is not None:
            return f"group {self.group}"
        if self.tag is not None:
            return f"tag {self.tag}"
        return f"{len(self.devices or [])} listed devices"


class RolloutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: BundleRef
    model: str = "default"
    target: Target
    waves: list[str] = Field(default_factory=lambda: ["1", "10%", "100%"])
    soak_s: float = Field(default=60.0, ge=0, description="Seconds each wave is watched after it finished.")
    pacing: Pacing = Field(default_factory=Pacing)
    gates: Gates = Field(default_factory=Gates)
    created_by: str = ""
