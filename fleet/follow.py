"""Follow a push to its real outcome on every device: committed, failed, refused (with the
device's code and reason), superseded by a concurrent push, or no outcome in time.

Subscribe before publishing (:class:`Follower` does so when it is made), so an immediate
refusal is not missed. A refusal is this push's when it carries the digest of the exact
message published (from an older agent: when it names the doc's topic and seq).

Concurrent pushes of one model race at the broker: the retained doc is the last one the
broker received, the device holds the highest seq it received. When a device holds a seq
at least ours with another doc, the retained doc decides: if it is still ours, this push was
the last writer and republishes with a higher seq (so device and broker agree again);
otherwise another push replaced ours and this one reports ``superseded``.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from edgeagent.desired import payload_digest
from edgeagent.mqtt import Message
from edgeagent.protocol import BundleRef, Event, Reported, verdict_in
from fleet.push import FleetConnection, Published, PushError, Result

MAX_REPUBLISH = 10

Republish = Callable[[int], Published]


class Follower:
    def __init__(
        self,
        conn: FleetConnection,
        devices: list[str],
        model: str,
        ref: BundleRef,
        say: Callable[[str], None],
    ) -> None:
        self.conn, self.devices, self.model, self.ref, self.say = conn, devices, model, ref, say
        self.inbox: queue.Queue[Message] = queue.Queue()
        for device in devices:
            conn.session.subscribe(conn.topics.events(device), self.inbox.put, max_bytes=1 << 20)
            conn.session.subscribe(conn.topics.reported(device), self.inbox.put, max_bytes=1 << 20)
        self.published: Published | None = None
        self.republish: Republish | None = None
        self.republished = 0
        self.results: dict[str, Result] = {}
        self.in_flight: set[str] = set()  # devices deploying our bundle right now
        self.overtaken: dict[str, Result] = {}  # superseded while our deployment still ran
        self.last_pct: dict[str, int] = {}

    def follow(
        self, published: Published | None, timeout_s: float, republish: Republish | None = None
    ) -> list[Result]:
        """Until every device has an outcome or ``timeout_s`` passes; results in device order."""
        self.published, self.republish = published, republish
        deadline = time.monotonic() + timeout_s
        while len(self.results) < len(self.devices) and (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            who = self.conn.topics.device_of(msg.topic)
            if who is None or who not in self.devices or who in self.results:
                continue
            if msg.topic.endswith("/reported"):
                self._on_reported(who, msg.payload)
            else:
                self._on_event(who, msg.payload)
        for device in self.devices:
            if device not in self.results:
                self.results[device] = self.overtaken.get(device) or Result(
                    device, False, f"no outcome within {timeout_s:.0f} s", "timeout"
                )
        return [self.results[d] for d in self.devices]

    @property
    def key(self) -> str | None:
        """The devices' seq key of our doc ('device:ID/MODEL' or 'group:G/MODEL')."""
        return None if self.published is None else f"{self.published.doc.target}/{self.model}"

    def _on_reported(self, who: str, payload: bytes) -> None:
        try:
            reported = Reported.model_validate_json(payload)
        except ValueError:
            return
        status = reported.models.get(self.model)
        if status and status.bundle and status.bundle.sha256 == self.ref.sha256 and status.state == "idle":
            self._done(who, Result(who, True, f"active on {status.runtime}/{status.delegate}"))
            return
        # A reset doc is lower than what the device holds until the device takes it.
        if self.published is not None and self.key is not None and not self.published.doc.reset_seq:
            held = reported.desired_seq.get(self.key, 0)
            if held > self.published.seq and who not in self.overtaken:
                self._overtaken(who, held)

    def _on_event(self, who: str, payload: bytes) -> None:
        try:
            event = Event.model_validate_json(payload)
        except ValueError:
            return
        if event.kind == "refused":
            self._on_refused(who, event)
            return
        if event.bundle is None or event.bundle.sha256 != self.ref.sha256 or event.model != self.model:
            return
        if event.kind == "progress" and event.total:
            self.in_flight.add(who)
            pct = int(100 * (event.received or 0) / event.total)
            if pct // 10 != self.last_pct.get(who, -1) // 10:
                self.last_pct[who] = pct
                self.say(f"{who}: downloading {pct}%")
        elif event.kind == "state":
            self.in_flight.add(who)
            self.say(f"{who}: {event.state}")
        elif event.kind == "outcome" and event.ok:
            self._done(who, Result(who, True, f"committed; acceptance: {_checks(event.detail)}"))
        elif event.kind == "outcome":
            self._done(who, Result(who, False, f"{event.code}: {event.reason}", "failed"))

    def _on_refused(self, who: str, event: Event) -> None:
        if event.code == "refusals_suppressed":
            self.say(f"{who}: {event.reason}")
            return
        detail: dict[str, Any] = event.detail
        if not self._is_ours(event):
            return
        if event.code == "replayed" and self.published is not None:
            last = detail.get("last")
            self._overtaken(who, last if type(last) is int else self.published.seq)
            return
        self._done(who, Result(who, False, f"refused ({event.code}): {event.reason}", "refused"))

    def _is_ours(self, event: Event) -> bool:
        if event.bundle is not None:  # refused at deployment (a downgrade): it names the bundle
            return event.bundle.sha256 == self.ref.sha256 and event.model in (self.model, None)
        if self.published is None:
            return True
        detail = event.detail
        if "digest" in detail:  # the digest of the exact message: a forged one cannot match
            return bool(detail["digest"] == payload_digest(self.published.payload))
        # An older agent: the topic and the seq (a hint when the signature was not checked).
        return detail.get("topic") == self.published.topic and detail.get("seq") in (None, self.published.seq)

    def _overtaken(self, who: str, held: int) -> None:
        """The device holds seq ``held`` (>= ours) from another doc for our model."""
        assert self.published is not None
        retained = self.conn.retained(self.published.topic).get(self.published.topic)
        if retained == self.published.payload and self.republish and self.republished < MAX_REPUBLISH:
            old = self.published.seq
            try:
                self.published = self.republish(max(held, old))
            except PushError as exc:  # the device's seq is too far ahead to outbid
                self._done(who, Result(who, False, f"refused (replayed): {exc}", "refused"))
                return
            self.republished += 1
            new = self.published.seq
            self.say(f"{who}: seq {old} was overtaken by a concurrent push; republished as seq {new}")
            return
        if retained == self.published.payload:
            result = Result(who, False, f"refused (replayed): the device holds seq {held}", "refused")
        else:
            reason = (
                f"superseded: another push replaced the desired doc of {self.model!r} "
                f"(the device holds seq {held}, this push {self.published.seq})"
            )
            result = Result(who, False, reason, "superseded")
        if who in self.in_flight:
            self.overtaken[who] = result  # our deployment may still finish: its outcome is the real one
        else:
            self._done(who, result)

    def _done(self, who: str, result: Result) -> None:
        self.in_flight.discard(who)
        self.results[who] = result


def _checks(detail: dict[str, Any]) -> str:
    verdict = verdict_in(detail)
    checks = ", ".join(
        f"{c.name} {c.value:.4g} (bound {c.op} {c.bound:.4g})"
        for c in (verdict.checks if verdict is not None else [])
        if c.value is not None
    )
    return checks or "no bounds"
