"""Creating a rollout: resolve the target to devices from the fleet database, plan the waves,
remember what each device runs now (what a rollback returns to), and store it all."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from edgeagent.errors import UsageError
from edgeagent.protocol import BundleRef
from fleet.rollout.model import RolloutSpec, Target, plan_waves
from fleet.rollout.store import Db, RolloutStore


@dataclass(frozen=True)
class Known:
    """A device as the fleet database knows it."""

    device: str
    groups: frozenset[str]
    tags: frozenset[str]
    profile: str | None
    running: BundleRef | None  # the bundle of the rollout's model name, if any


def known_devices(db: Db, model: str) -> dict[str, Known]:
    tags = RolloutStore(db).tags()
    found: dict[str, Known] = {}
    for device, groups, profile, models in db.rows("SELECT device, groups, profile, models FROM devices"):
        status = (json.loads(models) if models else {}).get(model) or {}
        bundle = status.get("bundle")
        running = BundleRef.model_validate(bundle) if bundle else None
        found[device] = Known(
            device, frozenset(json.loads(groups or "[]")), frozenset(tags.get(device, ())), profile, running
        )
    for device, extra in tags.items():
        found.setdefault(device, Known(device, frozenset(), frozenset(extra), None, None))
    return found


def matches_tags(query: str, known: Known) -> bool:
    """A tag query: comma-separated terms that must all hold; ``!tag`` excludes. A term also
    matches a group the device reports, so groups and host-side tags can be combined."""
    have = known.tags | known.groups
    for term in (t.strip() for t in query.split(",") if t.strip()):
        if term.startswith("!") and term[1:] in have:
            return False
        if not term.startswith("!") and term not in have:
            return False
    return True


def resolve(target: Target, known: dict[str, Known]) -> list[str]:
    """The target's device ids, sorted (the order waves take them in); UsageError when none."""
    if target.devices is not None:
        missing = [d for d in target.devices if d not in known]
        if missing:
            raise UsageError(f"the fleet database has never heard of {', '.join(missing[:5])}")
        devices = list(dict.fromkeys(target.devices))
    elif target.group is not None:
        devices = sorted(d for d, k in known.items() if target.group in k.groups or target.group in k.tags)
    else:
        devices = sorted(d for d, k in known.items() if matches_tags(target.tag or "", k))
    if not devices:
        raise UsageError(
            f"no device of {target.describe()} in the fleet database (is the collector running?)"
        )
    return devices


def create(db: Db, spec: RolloutSpec, now: float, rollout_id: str | None = None) -> str:
    """Store a new rollout; returns its id."""
    known = known_devices(db, spec.model)
    devices = resolve(spec.target, known)
    ends = plan_waves(spec.waves, len(devices))
    rid = rollout_id or f"{spec.bundle.name}-{spec.bundle.version}-{secrets.token_hex(3)}"
    rows = []
    for device in devices:
        k = known[device]
        previous = k.running if k.running is None or k.running.sha256 != spec.bundle.sha256 else None
        rows.append((device, k.profile, previous))
    RolloutStore(db).create(rid, spec, rows, ends, now)
    return rid
