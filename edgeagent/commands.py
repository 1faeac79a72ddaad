"""Signed one-off commands to the device: ``refresh`` and ``bench`` (see docs/protocol.md)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from edgeagent.desired import DesiredTracker, refusal_detail
from edgeagent.errors import DocumentRefused, EdgeError, MalformedMessage, SignatureError
from edgeagent.mqtt import Message
from edgeagent.protocol import Command, CommandReply, open_envelope, parse
from edgeagent.served import ServedModels
from edgeagent.signing import KeyRing

log = logging.getLogger(__name__)


class Commands:
    def __init__(
        self,
        device_id: str,
        trusted: KeyRing,
        tracker: DesiredTracker,
        served: ServedModels,
        *,
        insecure: bool,
        refresh: Callable[[], str],
        reply: Callable[[CommandReply], None],
        refused: Callable[[str, str, str, dict[str, Any]], bool],
    ) -> None:
        self.device_id = device_id
        self.trusted = trusted
        self.tracker = tracker
        self.served = served
        self.insecure = insecure
        self.refresh = refresh  # clears failed marks and wakes the engine; returns what it did
        self.reply = reply
        self.refused = refused  # (what, code, reason, detail) -> published (not rate-limited away)

    def on_message(self, message: Message) -> None:
        try:
            command = self.open(message.payload)
        except (MalformedMessage, SignatureError, DocumentRefused) as exc:
            # Rate-limited (edgeagent/ratelimit.py): a suppressed refusal gets no reply either.
            detail = refusal_detail(message.topic, message.payload, exc)
            command_id = _command_id(message.payload)
            if self.refused("a command", exc.code, str(exc), detail) and command_id:
                self.reply(CommandReply(id=command_id, ok=False, code=exc.code, detail=str(exc)))
            return
        # Off the MQTT handler thread: a bench runs the golden set on every served model.
        threading.Thread(target=self.run, args=(command,), name=f"cmd-{command.id}", daemon=True).start()

    def open(self, payload: bytes) -> Command:
        """Check the envelope, the target and the sequence of a command."""
        opened = open_envelope(payload, self.trusted, insecure=self.insecure)
        command = parse(Command, opened.payload, "command")
        if command.target != f"device:{self.device_id}":
            raise MalformedMessage(f"command for {command.target!r} arrived on this device's topic")
        self.tracker.accept_command_seq(command.seq, reset=command.reset_seq)
        return command

    def run(self, command: Command) -> None:
        try:
            if command.name == "refresh":
                reply = CommandReply(id=command.id, ok=True, detail=self.refresh())
            else:
                verdicts = self.served.bench(command.model)
                ok = bool(verdicts) and all(v.passed for v in verdicts.values())
                reply = CommandReply(
                    id=command.id,
                    ok=ok,
                    code="ok" if ok else "acceptance_failed",
                    detail="acceptance re-run on " + (", ".join(verdicts) or "no served model"),
                    result={name: v.model_dump(mode="json") for name, v in verdicts.items()},
                )
        except EdgeError as exc:
            reply = CommandReply(id=command.id, ok=False, code=exc.code, detail=str(exc))
        self.reply(reply)


def _command_id(payload: bytes) -> str | None:
    """The id of a refused command, if it can be read at all, so the sender gets a reply."""
    try:
        body = json.loads(json.loads(payload)["payload"])
        value = body.get("id")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None
