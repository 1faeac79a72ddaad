"""The controller: drives one rollout from its state in the fleet database, one tick at a time.

A tick takes (or renews) the lease, reads what the devices reported since the last tick,
judges the gates, then either starts devices of the current wave (paced), advances the wave
after its soak, or, when aborting, publishes signed rollbacks. Every decision is written to the
database before it is acted on (a device is marked pushed before its document is published),
so a controller killed at any point is replaced by one that continues: on its first tick it
republishes the documents of devices still marked pushed, which the agents treat as nothing new.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from edgeagent.errors import EdgeError
from edgeagent.protocol import BundleRef
from fleet.rollout.evidence import EvidenceReader
from fleet.rollout.gates import Evidence, Verdict, judge
from fleet.rollout.model import DeviceState, RolloutState
from fleet.rollout.store import DeviceRow, RolloutRow, RolloutStore

log = logging.getLogger(__name__)

BASELINE_WINDOW_S = 900.0  # telemetry of the replaced version this long before creation counts
DEFAULT_LEASE_S = 30.0
_TOUCHED = (DeviceState.PUSHED, DeviceState.COMMITTED, DeviceState.FAILED)


class LeaseHeld(EdgeError):
    """Another controller holds this rollout's lease; ``owner`` says which."""

    def __init__(self, message: str, *, owner: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner


class DesiredPublisher(Protocol):
    def publish(self, device: str, ref: BundleRef, *, rollback: bool = False) -> int:
        """Publish the device's signed desired document; returns its sequence number."""


class Controller:
    def __init__(
        self,
        store: RolloutStore,
        rollout_id: str,
        publisher: DesiredPublisher,
        clock: Callable[[], float],
        *,
        owner: str,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.store = store
        self.id = rollout_id
        self.publisher = publisher
        self.clock = clock
        self.owner = owner
        self.lease_s = lease_s
        self.reader: EvidenceReader | None = None
        self.verdict = Verdict(None)
        self._tokens = 1.0  # the first device starts on the first tick
        self._last: float | None = None

    # --- one tick ---------------------------------------------------------------------------

    def tick(self) -> RolloutState:
        now = self.clock()
        if not self.store.acquire(self.id, self.owner, now, self.lease_s):
            row = self.store.get(self.id)
            until = time.strftime("%H:%M:%S", time.localtime(row.lease_expires or now))
            raise LeaseHeld(
                f"rollout {self.id} is driven by {row.lease_owner}; if that controller is dead, its lease "
                f"expires at {until} and a controller started after that continues the rollout",
                owner=row.lease_owner,
            )
        row = self.store.get(self.id)
        if row.state.final:
            return row.state
        if self.reader is None:
            self._recover(row, now)
        if row.state is RolloutState.CREATED:
            self.store.set_state(self.id, {RolloutState.CREATED}, RolloutState.RUNNING, now)
        devices = self.store.devices(self.id)
        self._observe(row, devices, now)
        row = self.store.get(self.id)
        if row.state in (RolloutState.RUNNING, RolloutState.PAUSED):
            self.verdict = self._judge(row, devices, now)
            if self.verdict.abort:
                self.verdict = Verdict(self.verdict.reason, {**self.verdict.figures, "aborted_at": now})
                log.warning("rollout %s: aborting: %s", self.id, self.verdict.reason)
                self.store.set_state(
                    self.id, {RolloutState.RUNNING, RolloutState.PAUSED}, RolloutState.ABORTING, now,
                    self.verdict.reason,
                )  # fmt: skip
        row = self.store.get(self.id)
        if row.state is RolloutState.ABORTING:
            self._roll_back(row, devices, now)
        elif row.state is RolloutState.RUNNING:
            self._advance(row, devices, now)
        else:
            self.store.set_progress(self.id, self.owner, row.wave, row.soak_until, self.verdict.figures, now)
        return self.store.get(self.id).state

    def _recover(self, row: RolloutRow, now: float) -> None:
        spec = row.spec
        self.reader = EvidenceReader(
            self.store.db, spec.model, spec.bundle, row.created_at - BASELINE_WINDOW_S
        )
        if row.state in (RolloutState.RUNNING, RolloutState.PAUSED):
            # A predecessor may have died between marking a device pushed and publishing.
            for device in self.store.devices(self.id):
                if device.state is DeviceState.PUSHED:
                    self._publish(device.device, spec.model, spec.bundle, now, rollback=False)
        self._last = now

    def _observe(self, row: RolloutRow, devices: list[DeviceRow], now: float) -> None:
        assert self.reader is not None
        pushed = {d.device: d.pushed_at or 0.0 for d in devices if d.state is DeviceState.PUSHED}
        by_name = {d.device: d for d in devices}
        for outcome in self.reader.outcomes(pushed):
            state = DeviceState.COMMITTED if outcome.ok else DeviceState.FAILED
            self.store.set_device(
                self.id, outcome.device, state, at=now, code=outcome.code, detail=outcome.reason
            )
            by_name[outcome.device].state, by_name[outcome.device].finished_at = state, now
            by_name[outcome.device].code = outcome.code
            del pushed[outcome.device]
        timeout = row.spec.pacing.device_timeout_s
        for device, at in pushed.items():
            if now - at > timeout:
                detail = f"no outcome within {timeout:.0f} s"
                self.store.set_device(
                    self.id, device, DeviceState.FAILED, at=now, code="timeout", detail=detail
                )
                by_name[device].state, by_name[device].code, by_name[device].finished_at = (
                    DeviceState.FAILED, "timeout", now,
                )  # fmt: skip

    def _judge(self, row: RolloutRow, devices: list[DeviceRow], now: float) -> Verdict:
        assert self.reader is not None
        self.reader.refresh(row.created_at - BASELINE_WINDOW_S)
        committed = [d for d in devices if d.state is DeviceState.COMMITTED]
        failed = {d.device: d.code or "failed" for d in devices if d.state is DeviceState.FAILED}
        baseline, new = self.reader.sides(committed)
        evidence = Evidence(finished=len(committed) + len(failed), failed=failed, baseline=baseline, new=new)
        return judge(evidence, row.spec.gates)

    # --- acting -----------------------------------------------------------------------------

    def _publish(self, device: str, model: str, ref: BundleRef, now: float, *, rollback: bool) -> None:
        seq = self.publisher.publish(device, ref, rollback=rollback)
        self.store.record_push(now, self.owner, self.id, device, model, ref, seq, rollback)

    def _advance(self, row: RolloutRow, devices: list[DeviceRow], now: float) -> None:
        pacing = row.spec.pacing
        last = self._last if self._last is not None else now
        self._tokens = min(
            max(1.0, pacing.max_start_per_s), self._tokens + (now - last) * pacing.max_start_per_s
        )
        self._last = now
        end = row.wave_ends[row.wave]
        in_wave = [d for d in devices if d.position < end]
        pending = [d for d in in_wave if d.state is DeviceState.PENDING]
        in_flight = sum(d.state is DeviceState.PUSHED for d in devices)
        room = min(len(pending), pacing.max_in_flight - in_flight, int(self._tokens))
        for device in pending[: max(room, 0)]:
            # Write-ahead: a crash after this line republishes on recovery, never skips the device.
            self.store.set_device(self.id, device.device, DeviceState.PUSHED, at=now)
            self._publish(device.device, row.spec.model, row.spec.bundle, now, rollback=False)
            device.state = DeviceState.PUSHED
            self._tokens -= 1
        wave, soak_until = row.wave, row.soak_until
        if all(d.state in (DeviceState.COMMITTED, DeviceState.FAILED) for d in in_wave):
            if soak_until is None:
                soak_until = now + row.spec.soak_s
                log.info("rollout %s: wave %d finished; soaking until %.0f", self.id, wave + 1, soak_until)
            if now >= soak_until:
                if wave + 1 >= len(row.wave_ends):
                    self.store.set_state(self.id, {RolloutState.RUNNING}, RolloutState.COMPLETED, now)
                else:
                    wave, soak_until = wave + 1, None
                    log.info("rollout %s: wave %d of %d starts", self.id, wave + 1, len(row.wave_ends))
        self.store.set_progress(self.id, self.owner, wave, soak_until, self.verdict.figures, now)

    def _roll_back(self, row: RolloutRow, devices: list[DeviceRow], now: float) -> None:
        """Return every device this rollout touched to the bundle it ran before; then aborted."""
        for device in devices:
            if device.state not in _TOUCHED:
                continue
            if device.previous is None:
                self.store.set_device(
                    self.id, device.device, DeviceState.ROLLED_BACK, at=now, code="no_previous",
                    detail="ran no bundle for this model before; nothing to return to",
                )  # fmt: skip
                continue
            self._publish(device.device, row.spec.model, device.previous, now, rollback=True)
            self.store.set_device(
                self.id, device.device, DeviceState.ROLLED_BACK, at=now,
                detail=f"rolled back to {device.previous.name} {device.previous.version}",
            )  # fmt: skip
        self.store.set_state(self.id, {RolloutState.ABORTING}, RolloutState.ABORTED, now)
        self.store.set_progress(self.id, self.owner, row.wave, row.soak_until, self.verdict.figures, now)

    # --- the loop ---------------------------------------------------------------------------

    def run(
        self,
        poll_s: float = 1.0,
        stop: threading.Event | None = None,
        say: Callable[[str], None] | None = None,
    ) -> RolloutState:
        """Tick until the rollout is completed or aborted (or ``stop`` is set); the lease is
        released on the way out so a successor need not wait for it to expire."""
        stop = stop or threading.Event()
        shown = ""
        try:
            while True:
                state = self.tick()
                if say is not None:
                    line = progress_line(self.store, self.id)
                    if line != shown:
                        say(line)
                        shown = line
                if state.final or stop.wait(poll_s):
                    return state
        finally:
            self.store.release(self.id, self.owner)


def progress_line(store: RolloutStore, rollout_id: str) -> str:
    """'412/1000 committed, 3 failed, wave 3 of 4, p99 1.04x baseline' and the state."""
    row = store.get(rollout_id)
    counts = store.counts(rollout_id)
    total = sum(counts.values())
    parts = [
        f"{row.id}: {row.state.value}",
        f"{counts.get(DeviceState.COMMITTED, 0)}/{total} committed",
        f"{counts.get(DeviceState.FAILED, 0)} failed",
    ]
    if counts.get(DeviceState.PUSHED):
        parts.append(f"{counts[DeviceState.PUSHED]} in flight")
    if counts.get(DeviceState.ROLLED_BACK):
        parts.append(f"{counts[DeviceState.ROLLED_BACK]} rolled back")
    parts.append(f"wave {min(row.wave + 1, len(row.wave_ends))} of {len(row.wave_ends)}")
    if "p99_ratio" in row.figures:
        parts.append(f"p99 {row.figures['p99_ratio']:.2f}x baseline")
    line = ", ".join(parts)
    return line + (f" ({row.reason})" if row.reason and row.state is not RolloutState.RUNNING else "")
