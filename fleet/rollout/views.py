"""Read-only views of rollouts and host-side membership for ``fleet status|watch|inventory``.

They open the database the way the other views do (no table is created by looking), and
say nothing when no rollout was ever created there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from fleet.rollout.create import Known, matches_tags
from fleet.rollout.store import Db, RolloutStore, has_table

_T = TypeVar("_T")


def _open(path: str | Path) -> Db:
    from fleet import fleetdb

    return Db.wrap(fleetdb.open_for_reading(path))


def rollout_lines(path: str | Path) -> list[str]:
    """One progress line per active rollout (for ``fleet watch``)."""
    from fleet.rollout.controller import progress_line

    db = _open(path)
    try:
        if not has_table(db, "rollouts"):
            return []
        store = RolloutStore(db)
        return [progress_line(store, r.id) for r in store.rollouts(active_only=True)]
    finally:
        db.close()


def host_tags(path: str | Path) -> dict[str, set[str]]:
    db = _open(path)
    try:
        return RolloutStore(db).tags() if has_table(db, "device_tags") else {}
    finally:
        db.close()


def filter_by_tags(path: str | Path, rows: list[_T], query: str) -> list[_T]:
    """Status rows whose device matches a tag query (host-side tags and reported groups)."""
    tags = host_tags(path)
    out = []
    for row in rows:
        device: str = getattr(row, "device")  # noqa: B009 - any row type with device and groups
        groups: list[str] = getattr(row, "groups")  # noqa: B009
        known = Known(device, frozenset(groups), frozenset(tags.get(device, ())), None, None)
        if matches_tags(query, known):
            out.append(row)
    return out


def inventory(path: str | Path) -> list[dict[str, Any]]:
    """One record per device: membership, profile, agent version, runtime and delegate per
    model, and the free disk of its newest telemetry (where it reports one)."""
    tags = host_tags(path)
    db = _open(path)
    try:
        disk = dict(
            db.rows(
                "SELECT t.device, t.disk_free_mb FROM telemetry t JOIN "
                "(SELECT device, max(seq) AS seq FROM telemetry GROUP BY device) n "
                "ON n.device = t.device AND n.seq = t.seq"
            )
        )
        records = []
        query = "SELECT device, online, groups, profile, agent_version, hardware, models FROM devices"
        for device, online, groups, profile, agent, hardware, models in db.rows(query + " ORDER BY device"):
            running = {}
            for name, status in json.loads(models or "{}").items():
                bundle = status.get("bundle") or {}
                running[name] = {"bundle": bundle.get("name"), "version": bundle.get("version"),
                                 "runtime": status.get("runtime"),
                                 "delegate": status.get("delegate")}  # fmt: skip
            records.append({
                "device": device, "online": None if online is None else bool(online),
                "groups": json.loads(groups or "[]"), "tags": sorted(tags.get(device, ())),
                "profile": profile,
                "agent_version": agent, "machine": json.loads(hardware or "{}").get("machine"),
                "models": running, "disk_free_mb": disk.get(device),
            })  # fmt: skip
        return records
    finally:
        db.close()


def rollout_markers(path: str | Path, since: float) -> list[tuple[float, str]]:
    """(time, label) of rollouts starting (first device pushed) and ending since ``since``."""
    db = _open(path)
    try:
        if not has_table(db, "rollouts"):
            return []
        store = RolloutStore(db)
        markers = []
        for row in store.rollouts():
            pushed = [d.pushed_at for d in store.devices(row.id) if d.pushed_at is not None]
            name = f"{row.spec.bundle.name} {row.spec.bundle.version}"
            if pushed and max(pushed) >= since:
                markers.append((min(pushed), f"▶ {name}"))
            if row.state.final and row.updated_at >= since:
                markers.append((row.updated_at, f"■ {name} {row.state.value}"))
        return markers
    finally:
        db.close()
