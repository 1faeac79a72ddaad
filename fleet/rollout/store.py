"""The rollout tables in the fleet database, and the controller's lease.

The SQL is portable on purpose (no ``INSERT OR ...``, no ``rowid``, no ``AUTOINCREMENT``; upserts
with ``ON CONFLICT``; every state change a compare-and-set ``UPDATE ... WHERE``), so these tables
live in either backend of the fleet database (SQLite or PostgreSQL) through one code path:
:class:`fleet.dbbackend.Database` translates the placeholders. The lease is one conditional
``UPDATE`` whose row count says who won: PostgreSQL re-checks the ``WHERE`` of a row another
transaction changed meanwhile, SQLite has one writer at a time, so two controllers never both
hold it. The collector owns its own tables; these are written by the rollout
controller and by ``edgectl rollout`` commands, read by the views.

* ``rollouts``         one row per rollout: its spec (JSON), state, current wave, soak deadline,
                       why it stopped, the latest gate figures, and the lease (owner, expiry)
* ``rollout_devices``  one row per (rollout, device): its place in the order, wave, state, the
                       bundle it ran before (what a rollback returns to), times and outcome
* ``push_history``     one row per desired document the controller published: who, what, to whom
* ``device_tags``      host-side membership: (device, tag) pairs that targets can name
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.errors import UsageError
from edgeagent.protocol import BundleRef
from fleet.dbbackend import Database, connect, is_postgres
from fleet.rollout.model import DeviceState, RolloutSpec, RolloutState

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        wave INTEGER NOT NULL DEFAULT 0,
        wave_ends TEXT NOT NULL,
        soak_until DOUBLE PRECISION,
        reason TEXT,
        figures TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        lease_owner TEXT,
        lease_expires DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout TEXT NOT NULL,
        device TEXT NOT NULL,
        position INTEGER NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL,
        profile TEXT,
        previous TEXT,
        pushed_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        code TEXT,
        detail TEXT,
        PRIMARY KEY (rollout, device)
    )""",
    "CREATE INDEX IF NOT EXISTS rollout_devices_state ON rollout_devices (rollout, state)",
    """CREATE TABLE IF NOT EXISTS push_history (
        at DOUBLE PRECISION NOT NULL,
        who TEXT NOT NULL,
        rollout TEXT,
        device TEXT NOT NULL,
        model TEXT NOT NULL,
        bundle TEXT NOT NULL,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        seq BIGINT NOT NULL,
        rollback INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS push_history_at ON push_history (at)",
    """CREATE TABLE IF NOT EXISTS device_tags (
        device TEXT NOT NULL,
        tag TEXT NOT NULL,
        PRIMARY KEY (device, tag)
    )""",
)


class Db(Database):
    """The fleet database (either backend, :class:`fleet.dbbackend.Database`) with ``rows``:
    every statement here is the same SQL on SQLite and PostgreSQL."""

    @classmethod
    def wrap(cls, db: Database) -> Db:
        return cls(db.conn, db.kind, db.where)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.execute(sql, params).fetchall()]


_SCHEMA_LOCK = 0x656467655F72  # pg_advisory_xact_lock key ("edge_r"): one creator of these tables


def has_table(db: Database, name: str) -> bool:
    """Whether the table exists (a view creates nothing by looking)."""
    if db.kind == "postgresql":
        return db.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None
    sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(sql, (name,)).fetchone() is not None


def open_db(path: str | Path, *, create: bool = False) -> Db:
    """The fleet database (a SQLite path or a ``postgresql://`` DSN) with the rollout tables
    created; UsageError when a SQLite file is missing or the server refuses."""
    if not is_postgres(path) and not create and not Path(path).is_file():
        raise UsageError(f"{path}: no fleet database here (`edgectl fleet collect --db {path}` makes one)")
    db = Db.wrap(connect(path, writer=True))
    try:
        if db.kind == "sqlite":
            db.execute("PRAGMA busy_timeout=10000")  # a controller waits out the collector's commits
        with db.transaction():
            if db.kind == "postgresql":
                # Two controllers starting at once must not both create the tables.
                db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in SCHEMA:
                db.execute(db.ddl(statement))
    except Exception as exc:
        db.close()
        if isinstance(exc, UsageError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{db.where}: cannot open as a fleet database ({first})") from exc
    return db


@dataclass
class RolloutRow:
    id: str
    spec: RolloutSpec
    state: RolloutState
    wave: int
    wave_ends: list[int]
    soak_until: float | None
    reason: str | None
    figures: dict[str, float]
    created_at: float
    updated_at: float
    lease_owner: str | None
    lease_expires: float | None


@dataclass
class DeviceRow:
    device: str
    position: int
    wave: int
    state: DeviceState
    profile: str | None
    previous: BundleRef | None
    pushed_at: float | None
    finished_at: float | None
    code: str | None
    detail: str | None


_ROLLOUT_COLS = (
    "id, spec, state, wave, wave_ends, soak_until, reason, figures, created_at, updated_at, "
    "lease_owner, lease_expires"
)
_DEVICE_COLS = "device, position, wave, state, profile, previous, pushed_at, finished_at, code, detail"


def _rollout(row: tuple[Any, ...]) -> RolloutRow:
    return RolloutRow(
        id=row[0],
        spec=RolloutSpec.model_validate_json(row[1]),
        state=RolloutState(row[2]),
        wave=int(row[3]),
        wave_ends=[int(x) for x in json.loads(row[4])],
        soak_until=row[5],
        reason=row[6],
        figures=json.loads(row[7]) if row[7] else {},
        created_at=row[8],
        updated_at=row[9],
        lease_owner=row[10],
        lease_expires=row[11],
    )


def _device(row: tuple[Any, ...]) -> DeviceRow:
    previous = BundleRef.model_validate_json(row[5]) if row[5] else None
    return DeviceRow(row[0], int(row[1]), int(row[2]), DeviceState(row[3]), row[4], previous, *row[6:])


class RolloutStore:
    """Reads and compare-and-set writes of one fleet database's rollout tables."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def create(
        self,
        rollout_id: str,
        spec: RolloutSpec,
        devices: list[tuple[str, str | None, BundleRef | None]],
        wave_ends: list[int],
        now: float,
    ) -> None:
        """Store a new rollout over ``devices`` (id, profile, bundle it runs now), in order."""
        rows = []
        for position, (device, profile, previous) in enumerate(devices):
            wave = next(i for i, end in enumerate(wave_ends) if position < end)
            prev = previous.model_dump_json() if previous else None
            rows.append((rollout_id, device, position, wave, DeviceState.PENDING.value, profile, prev))
        with self.db.transaction():
            if self.db.rows("SELECT id FROM rollouts WHERE id = ?", (rollout_id,)):
                raise UsageError(f"a rollout named {rollout_id} exists already")
            self.db.execute(
                "INSERT INTO rollouts (id, spec, state, wave, wave_ends, created_at, updated_at) "
                "VALUES (?, ?, ?, 0, ?, ?, ?)",
                (
                    rollout_id,
                    spec.model_dump_json(),
                    RolloutState.CREATED.value,
                    json.dumps(wave_ends),
                    now,
                    now,
                ),
            )
            self.db.executemany(
                "INSERT INTO rollout_devices (rollout, device, position, wave, state, profile, previous) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def get(self, rollout_id: str) -> RolloutRow:
        found = self.db.rows(f"SELECT {_ROLLOUT_COLS} FROM rollouts WHERE id = ?", (rollout_id,))  # noqa: S608
        if not found:
            raise UsageError(f"no rollout named {rollout_id} in this fleet database")
        return _rollout(found[0])

    def rollouts(self, *, active_only: bool = False) -> list[RolloutRow]:
        query = f"SELECT {_ROLLOUT_COLS} FROM rollouts ORDER BY created_at"  # noqa: S608
        rows = [_rollout(r) for r in self.db.rows(query)]
        return [r for r in rows if not (active_only and r.state.final)]

    def devices(self, rollout_id: str) -> list[DeviceRow]:
        return [
            _device(r)
            for r in self.db.rows(
                f"SELECT {_DEVICE_COLS} FROM rollout_devices WHERE rollout = ? ORDER BY position",  # noqa: S608
                (rollout_id,),
            )
        ]

    def counts(self, rollout_id: str) -> dict[DeviceState, int]:
        found = self.db.rows(
            "SELECT state, count(*) FROM rollout_devices WHERE rollout = ? GROUP BY state", (rollout_id,)
        )
        return {DeviceState(state): int(n) for state, n in found}

    # --- compare-and-set writes -------------------------------------------------------------

    def set_state(
        self,
        rollout_id: str,
        old: set[RolloutState],
        new: RolloutState,
        now: float,
        reason: str | None = None,
    ) -> bool:
        """Move to ``new`` only from one of ``old``: an operator's pause and the controller's
        abort cannot overwrite each other."""
        marks = ", ".join("?" for _ in old)
        cur = self.db.execute(
            f"UPDATE rollouts SET state = ?, updated_at = ?, reason = coalesce(?, reason) "  # noqa: S608
            f"WHERE id = ? AND state IN ({marks})",
            (new.value, now, reason, rollout_id, *(s.value for s in old)),
        )
        return bool(cur.rowcount == 1)

    def set_progress(
        self,
        rollout_id: str,
        owner: str,
        wave: int,
        soak_until: float | None,
        figures: dict[str, float],
        now: float,
    ) -> bool:
        cur = self.db.execute(
            "UPDATE rollouts SET wave = ?, soak_until = ?, figures = ?, updated_at = ? "
            "WHERE id = ? AND lease_owner = ?",
            (wave, soak_until, json.dumps(figures), now, rollout_id, owner),
        )
        return bool(cur.rowcount == 1)

    def set_device(
        self, rollout_id: str, device: str, state: DeviceState, *, at: float, code: str | None = None,
        detail: str | None = None,
    ) -> None:  # fmt: skip
        # ROLLED_BACK keeps pushed_at/finished_at: the history of the attempt stays readable.
        column = {DeviceState.PUSHED: "pushed_at", DeviceState.COMMITTED: "finished_at",
                  DeviceState.FAILED: "finished_at"}.get(state)  # fmt: skip
        assignments = "state = ?, code = coalesce(?, code), detail = coalesce(?, detail)"
        params: list[Any] = [state.value, code, detail]
        if column is not None:
            assignments += f", {column} = ?"
            params.append(at)
        self.db.execute(
            f"UPDATE rollout_devices SET {assignments} WHERE rollout = ? AND device = ?",  # noqa: S608
            (*params, rollout_id, device),
        )

    # --- the lease --------------------------------------------------------------------------

    def acquire(self, rollout_id: str, owner: str, now: float, ttl_s: float) -> bool:
        """Take or renew the lease; False while another live controller holds it."""
        cur = self.db.execute(
            "UPDATE rollouts SET lease_owner = ?, lease_expires = ? WHERE id = ? AND "
            "(lease_owner IS NULL OR lease_owner = ? OR lease_expires < ?)",
            (owner, now + ttl_s, rollout_id, owner, now),
        )
        return bool(cur.rowcount == 1)

    def release(self, rollout_id: str, owner: str) -> None:
        self.db.execute(
            "UPDATE rollouts SET lease_owner = NULL, lease_expires = NULL WHERE id = ? AND lease_owner = ?",
            (rollout_id, owner),
        )

    # --- history and tags -------------------------------------------------------------------

    def record_push(
        self, at: float, who: str, rollout_id: str | None, device: str, model: str, ref: BundleRef, seq: int,
        rollback: bool,
    ) -> None:  # fmt: skip
        self.db.execute(
            "INSERT INTO push_history (at, who, rollout, device, model, bundle, version, sha256, seq, "
            "rollback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at, who, rollout_id, device, model, ref.name, ref.version, ref.sha256, seq, int(rollback)),
        )

    def history(self, since: float, device: str | None = None, limit: int = 200) -> list[tuple[Any, ...]]:
        """Pushes newest first, each with the device's outcome in its rollout when there is one."""
        sql = (
            "SELECT h.at, h.who, h.rollout, h.device, h.model, h.bundle, h.version, h.rollback, d.state, "
            "d.code FROM push_history h LEFT JOIN rollout_devices d "
            "ON d.rollout = h.rollout AND d.device = h.device "
            "WHERE h.at >= ?"
        )
        params: list[Any] = [since]
        if device is not None:
            sql += " AND h.device = ?"
            params.append(device)
        return self.db.rows(sql + " ORDER BY h.at DESC LIMIT ?", (*params, limit))

    def set_tags(self, devices: list[str], tags: list[str], *, remove: bool = False) -> None:
        with self.db.transaction():
            for device in devices:
                for tag in tags:
                    if remove:
                        self.db.execute("DELETE FROM device_tags WHERE device = ? AND tag = ?", (device, tag))
                    else:
                        self.db.execute(
                            "INSERT INTO device_tags (device, tag) VALUES (?, ?) "
                            "ON CONFLICT (device, tag) DO NOTHING",
                            (device, tag),
                        )

    def tags(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for device, tag in self.db.rows("SELECT device, tag FROM device_tags"):
            found.setdefault(device, set()).add(tag)
        return found
