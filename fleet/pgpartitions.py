"""Daily partitions of the PostgreSQL fleet database's telemetry tables, and retention by dropping them.

``telemetry`` and ``model_telemetry`` are partitioned by range of ``at`` (the device's clock, the
same for a message and its redelivery, so the primary key ``(device, seq, at)`` still stores a
redelivered message once). Each UTC day has a partition named ``<table>_pYYYYMMDD``; the
collectors create today's and the next two days' ahead of time, never past ones. A message
whose day has no partition (a device clock far off, a spool older than the database) lands in
``<table>_default``, which retention empties row by row by ``received``; whole days go with
``DROP TABLE`` once the day ended before the retention cutoff (no row-by-row delete, no bloat).

Several collectors share one database: every change of partitions runs under one advisory
lock, so two collectors never race to create or drop the same one.
"""

from __future__ import annotations

import calendar
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.dbbackend import Database

log = logging.getLogger(__name__)

PARTITIONED = ("telemetry", "model_telemetry")
DAY_S = 86400
AHEAD_DAYS = 2
_LOCK = 0x656467655F70  # pg_advisory_xact_lock key shared by every collector ("edge_p")


def _day(t: float) -> int:
    return int(t // DAY_S)


def _name(table: str, day: int) -> str:
    return f"{table}_p{time.strftime('%Y%m%d', time.gmtime(day * DAY_S))}"


def existing(db: Database, table: str) -> dict[str, tuple[int, int]]:
    """Partition name -> (first day, day after) of a partitioned table (default left out)."""
    rows = db.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ?",
        (table,),
    ).fetchall()
    found = {}
    for (name,) in rows:
        stamp = name.rsplit("_p", 1)[-1]
        if name.endswith("_default") or not stamp.isdigit():
            continue
        day = _day(calendar.timegm(time.strptime(stamp, "%Y%m%d")))
        found[name] = (day, day + 1)
    return found


def ensure_ahead(db: Database, now: float | None = None) -> None:
    """Create today's partitions and the next AHEAD_DAYS days' (idempotent, safe to race)."""
    today = _day(time.time() if now is None else now)
    for table in PARTITIONED:
        have = existing(db, table)
        for day in range(today, today + AHEAD_DAYS + 1):
            name = _name(table, day)
            if name in have:
                continue
            try:
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK,))
                    db.execute(
                        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
                        f"FOR VALUES FROM ({day * DAY_S}) TO ({(day + 1) * DAY_S})"
                    )
            except Exception as exc:  # rows of that day already sit in the default partition
                log.warning(
                    "could not create partition %s (%s); its rows stay in %s_default", name, exc, table
                )


def drop_older_than(db: Database, cutoff: float, chunk: int = 5000) -> int:
    """Drop every day partition that ended before ``cutoff`` and delete the default partitions'
    rows received before it; returns about how many rows went (a dropped partition counts its
    planner estimate, which a count(*) of millions of rows would cost)."""
    deleted = 0
    for table in PARTITIONED:
        for name, (_first, after) in sorted(existing(db, table).items()):
            if after * DAY_S > cutoff:
                continue
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(?)", (_LOCK,))
                found = db.execute("SELECT reltuples FROM pg_class WHERE relname = ?", (name,)).fetchone()
                if found is None:
                    continue  # another collector dropped it first
                deleted += max(0, int(found[0]))
                db.execute(f"DROP TABLE IF EXISTS {name}")
        deleted += delete_received_before(db, f"{table}_default", "ctid", cutoff, chunk)
    return deleted


def delete_received_before(db: Database, table: str, key: str, cutoff: float, chunk: int) -> int:
    """Delete ``table``'s rows received before ``cutoff``, ``chunk`` rows per transaction
    (short transactions: the collectors keep writing meanwhile). Returns how many went."""
    deleted = 0
    while True:
        with db.transaction():
            n: int = db.execute(
                f"DELETE FROM {table} WHERE {key} IN "  # noqa: S608 - table names are ours
                f"(SELECT {key} FROM {table} WHERE received < ? LIMIT ?)",
                (cutoff, chunk),
            ).rowcount
        deleted += n
        if n < chunk:
            return deleted
