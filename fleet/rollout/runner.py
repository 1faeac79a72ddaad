"""``edgectl rollout run``: one MQTT connection, one controller per rollout it drives."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

from edgeagent.errors import UsageError
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import Topics
from edgeagent.signing import SigningKey
from fleet.rollout.controller import DEFAULT_LEASE_S, Controller, LeaseHeld, progress_line
from fleet.rollout.publisher import Publisher, connect
from fleet.rollout.store import Db, RolloutStore

log = logging.getLogger(__name__)


def drive(
    db: Db,
    broker: BrokerConfig,
    topics: Topics,
    key: SigningKey,
    rollout_id: str | None,
    stop: threading.Event,
    poll_s: float,
    who: str,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """Drive one rollout (or, with None, every active one, forever) until it is final or ``stop``
    is set; returns the last state of each rollout driven."""
    store = RolloutStore(db)
    owner = f"{who}:{os.getpid()}:{secrets.token_hex(2)}"
    if rollout_id is not None and store.get(rollout_id).state.final:
        return {rollout_id: store.get(rollout_id).state.value}
    conn, floors = connect(broker, topics, f"edgectl-rollout-{os.getpid()}-{secrets.token_hex(2)}")
    controllers: dict[str, Controller] = {}
    states: dict[str, str] = {}
    shown: dict[str, str] = {}
    try:
        while True:
            ids = [rollout_id] if rollout_id is not None else [r.id for r in store.rollouts(active_only=True)]
            for rid in ids:
                if rid not in controllers:
                    model = store.get(rid).spec.model
                    controllers[rid] = Controller(
                        store, rid, Publisher(conn, key, model, floors), time.time, owner=owner
                    )
                try:
                    states[rid] = controllers[rid].tick().value
                except LeaseHeld as exc:
                    if rollout_id is not None:
                        raise UsageError(str(exc)) from exc
                    continue
                line = progress_line(store, rid)
                if shown.get(rid) != line:
                    say(line)
                    shown[rid] = line
            done = rollout_id is not None and states.get(rollout_id) in ("completed", "aborted")
            if done or stop.wait(poll_s):
                return states
    finally:
        for rid in controllers:
            store.release(rid, owner)
        conn.__exit__(None, None, None)
