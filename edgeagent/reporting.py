"""What the device tells the host: the retained reported state, events, and systemd STATUS=.

Implements the engine's ReporterPort. Every method is safe without a broker (serve-only
agents): events are then only logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from devices.detect import Detection
from edgeagent import __version__, sdnotify
from edgeagent.deploy.device import DeviceStore
from edgeagent.deploy.machine import State
from edgeagent.mqtt import MqttSession
from edgeagent.protocol import BundleRef, DeploymentOutcome, ModelStatus, Reported, Topics
from edgeagent.protocol import Event as EventMsg
from edgeagent.service import read_active_models, status_line
from edgeagent.serving.server import InferenceServer

log = logging.getLogger(__name__)


class Reporter:
    def __init__(
        self,
        device_id: str,
        topics: Topics,
        store: DeviceStore,
        server: InferenceServer,
        detection: Detection,
        *,
        groups: list[str],
        states: Mapping[str, State],
        desired_seqs: Callable[[], dict[str, int]],
        keyset_version: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.device_id = device_id
        self.topics = topics
        self.store = store
        self.server = server
        self.detection = detection
        self.groups = groups
        self.states = states
        self.desired_seqs = desired_seqs
        self.keyset_version = keyset_version
        self.session: MqttSession | None = None
        self.last_outcome: DeploymentOutcome | None = None
        # Store problems found on start, before the broker answered: sent on connect.
        self._held: list[EventMsg] = []

    # --- reported state ---------------------------------------------------------------

    def reported(self, *, online: bool) -> Reported:
        models: dict[str, ModelStatus] = {}
        served = self.server.served()
        refs = self.store.refs
        for name in sorted(set(self.store.store.model_names()) | set(served) | set(self.states)):
            current, previous = self.store.current(name), self.store.previous(name)
            active = served.get(name)
            models[name] = ModelStatus(
                bundle=refs.get(current) if current else None,
                previous=refs.get(previous) if previous else None,
                runtime=active.model.runtime if active else None,
                delegate=active.model.delegate if active else None,
                state=self.states.get(name, State.IDLE).value,
                acceptance=active.verdict if active else None,
            )
        return Reported(
            device=self.device_id,
            online=online,
            agent_version=__version__,
            groups=list(self.groups),
            profile=self.detection.profile,
            hardware=self.detection.model_dump(mode="json", exclude={"candidates"}),
            models=models,
            last_deployment=self.last_outcome,
            desired_seq=self.desired_seqs(),
            keyset_version=self.keyset_version(),
        )

    def publish_reported(self) -> None:
        """Publish the retained reported state (and, first, events held while offline)."""
        if self.session is None:
            return
        held, self._held = self._held, []
        for msg in held:
            self.session.publish(self.topics.events(self.device_id), msg.model_dump_json(), qos=1)
        payload = self.reported(online=True).model_dump_json()
        self.session.publish(self.topics.reported(self.device_id), payload, qos=1, retain=True)

    def event(self, kind: str, **fields: Any) -> None:
        if self.session is None:
            return
        msg = EventMsg(device=self.device_id, kind=kind, **fields)
        self.session.publish(self.topics.events(self.device_id), msg.model_dump_json(), qos=1)

    # --- the engine's ReporterPort ----------------------------------------------------

    def state(self, name: str, ref: BundleRef | None, state: str) -> None:
        self.event("state", model=name, bundle=ref, state=state)
        if state == State.IDLE.value:
            self.publish_reported()
            # Back to the line the service shows between deployments (profile, active bundles).
            active = read_active_models(self.store.store.root)
            sdnotify.notify(f"STATUS={status_line(self.detection, active)}")
        elif ref is not None:
            sdnotify.notify(f"STATUS=deploying {name} {ref.name} {ref.version}: {state}")

    def progress(self, name: str, ref: BundleRef, received: int, total: int) -> None:
        self.event("progress", model=name, bundle=ref, received=received, total=total)

    def outcome(
        self, name: str, ref: BundleRef, *, ok: bool, code: str, reason: str, detail: dict[str, object]
    ) -> None:
        self.last_outcome = DeploymentOutcome(model=name, bundle=ref, ok=ok, code=code, reason=reason)
        if ok:
            served = self.server.served().get(name)
            detail = {**detail, "acceptance": served.verdict if served else None}
        self.event("outcome", model=name, bundle=ref, ok=ok, code=code, reason=reason, detail=detail)
        self.publish_reported()

    def refused(self, name: str, ref: BundleRef, *, code: str, reason: str) -> None:
        self.event("refused", model=name, bundle=ref, code=code, reason=reason)

    def store_event(self, name: str, *, code: str, reason: str, detail: dict[str, object]) -> None:
        """A problem found in the store itself (``store_corrupt``): an error event and the outcome."""
        sha = detail.get("bundle")
        ref = self.store.refs.get(sha) if isinstance(sha, str) else None
        msg = EventMsg(
            device=self.device_id,
            kind="error",
            model=name,
            bundle=ref,
            code=code,
            reason=reason,
            detail=detail,
        )
        if self.session is None or not self.session.connected:
            self._held.append(msg)
        else:
            self.session.publish(self.topics.events(self.device_id), msg.model_dump_json(), qos=1)
        if ref is not None:
            self.last_outcome = DeploymentOutcome(model=name, bundle=ref, ok=False, code=code, reason=reason)
        self.publish_reported()
