"""The fleet database: what the collector stores and how the views read it.

Two backends (fleet/dbbackend.py): a SQLite file (WAL mode: views read the last committed
batch while the one collector writes), the embedded default, or a PostgreSQL server
(``--db postgresql://...``) that several collectors write and any number of views read, with
the telemetry tables partitioned by day (fleet/pgpartitions.py). Times are Unix seconds;
``at`` is the device's clock (what plots and windows use), ``received`` the collector's (what retention and
"last seen" use, so a device whose clock is wrong neither vanishes nor lingers).

Tables (see docs/fleet.md for every column):

* ``devices``          one row per device: the retained reported state and when it was last heard
* ``telemetry``        one row per telemetry message, unique by (device, seq): process and system
* ``model_telemetry``  one row per (message, model, version, runtime, delegate): requests, latency
                       percentiles and the mergeable latency histogram, online accuracy, drift
* ``events``           deployment progress and outcomes, de-duplicated by a digest of the payload
* ``meta``             schema version and the collectors' heartbeats
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic_core

from edgeagent.errors import MalformedMessage, UsageError
from edgeagent.protocol import Event, Reported, Telemetry
from fleet import pgpartitions
from fleet.dbbackend import Database, connect, is_data_error, is_postgres
from fleet.fleetschema import MIGRATIONS, READABLE_VERSIONS, SCHEMA_VERSION, statements

__all__ = ["Database", "is_data_error", "open_for_reading", "open_for_writing", "write_batch"]

_EVENT_COLUMNS = ("device", "at", "received", "kind", "model", "state", "ok", "code", "reason", "bundle",
                  "version", "payload", "digest")  # fmt: skip
# Telemetry creates the device row (groups, profile) when no reported state came yet; a
# reported state owns those fields once it has arrived.
_SEEN_TELEMETRY_SQL = """
INSERT INTO devices (device, groups, profile, last_seen) VALUES (?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    last_seen = GREATEST(coalesce(devices.last_seen, 0), excluded.last_seen),
    groups = CASE WHEN devices.reported_at IS NULL THEN excluded.groups ELSE devices.groups END,
    profile = CASE WHEN devices.reported_at IS NULL THEN excluded.profile ELSE devices.profile END
"""
_SEEN_SQL = """
INSERT INTO devices (device, last_seen) VALUES (?, ?)
ON CONFLICT (device) DO UPDATE SET last_seen = GREATEST(coalesce(devices.last_seen, 0), excluded.last_seen)
"""
_REPORTED_SQL = """
INSERT INTO devices (device, online, groups, profile, agent_version, hardware, models, last_deployment,
                     reported_at, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    online = excluded.online, groups = excluded.groups, profile = excluded.profile,
    agent_version = excluded.agent_version, hardware = excluded.hardware, models = excluded.models,
    last_deployment = excluded.last_deployment, reported_at = excluded.reported_at,
    last_seen = GREATEST(coalesce(devices.last_seen, 0), coalesce(excluded.last_seen, 0))
"""
_SCHEMA_LOCK = 0x656467655F73  # pg_advisory_xact_lock key ("edge_s"): one schema creator at a time


def _dumps(value: Any) -> str:
    # pydantic-core's encoder: a third of json.dumps's time on a latency histogram, and the
    # writer encodes a few per message.
    return pydantic_core.to_json(value).decode("utf-8")


def open_for_writing(target: str | Path) -> Database:
    """Open (creating or migrating if needed) the fleet database for a writer: a SQLite path or
    a ``postgresql://`` DSN."""
    db = connect(target, writer=True)
    try:
        with db.transaction():
            if db.kind == "postgresql":
                # Two collectors starting at once must not both create the schema.
                db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in statements(db):
                db.execute(statement)
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(found[0]) != SCHEMA_VERSION:
                _migrate(db, int(found[0]))
        if db.kind == "postgresql":
            pgpartitions.ensure_ahead(db)
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: Database, version: int) -> None:
    """Bring an older database up to SCHEMA_VERSION inside the caller's transaction."""
    if version not in MIGRATIONS:
        raise UsageError(f"{db.where}: fleet database schema {version}, this edgectl knows {SCHEMA_VERSION}")
    while version < SCHEMA_VERSION:
        for statement in MIGRATIONS[version]:
            db.execute(statement)
        version += 1
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def open_for_reading(target: str | Path) -> Database:
    """Open an existing fleet database for a view; UsageError when it is missing or not ours."""
    if not is_postgres(target) and not Path(target).is_file():
        raise UsageError(
            f"{target}: no fleet database here (`edgectl fleet collect --db {target}` makes one)"
        )
    # SQLite: not mode=ro, a WAL reader needs to create the -shm file when no collector runs.
    db = connect(target, writer=False)
    try:
        found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except Exception as exc:
        db.close()
        raise UsageError(f"{db.where}: not a fleet database ({str(exc).strip().splitlines()[0]})") from exc
    version = None if found is None else found["value"]
    if version is None or int(version) not in READABLE_VERSIONS:
        db.close()
        raise UsageError(
            f"{db.where}: not a fleet database of schema {SCHEMA_VERSION}"
            + (f" (schema {version}: a newer edgectl made it)" if version else "")
        )
    return db


# --- writing ----------------------------------------------------------------------------


@dataclass
class Batch:
    """Parsed messages to store in one transaction. ``received`` times are the collector's clock."""

    telemetry: list[tuple[Telemetry, float]] = field(default_factory=list)
    reported: list[tuple[str, Reported | None, float, bool]] = field(default_factory=list)
    events: list[tuple[Event, bytes, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.telemetry) + len(self.reported) + len(self.events)

    def split(self) -> Iterator[Batch]:
        """One batch per message, in the order a batch stores them."""
        for t in self.telemetry:
            yield Batch(telemetry=[t])
        for e in self.events:
            yield Batch(events=[e])
        for r in self.reported:
            yield Batch(reported=[r])


@dataclass(frozen=True)
class Stored:
    """What one batch changed: new telemetry (duplicates left out) and how many were duplicates."""

    telemetry: list[tuple[Telemetry, float]]
    events: int
    duplicates: int


INT64_MAX = 2**63 - 1  # SQLite INTEGER and PostgreSQL BIGINT


class OutOfBounds(MalformedMessage):
    """A value that parses but no database column can hold (a seq of 2**70)."""

    code = "out_of_bounds"


def check_bounds(t: Telemetry) -> None:
    """Refuse integers the database cannot store, before they reach a batch: one such message
    would otherwise make the whole batch's transaction fail."""
    p, s, sp = t.process, t.system, t.spool
    named = [("seq", t.seq), ("process.threads", p.threads), ("system.cpu_count", s.cpu_count),
             ("spool.queued", sp.queued), ("spool.dropped", sp.dropped),
             ("spool.dropped_total", sp.dropped_total)]  # fmt: skip
    for m in t.models:
        named += [
            (f"models[{m.model}].{k}", getattr(m, k))
            for k in ("count", "client_errors", "server_errors", "labelled", "correct")
        ]
    for name, value in named:
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise OutOfBounds(f"{name} = {value} does not fit a 64-bit integer")


def _telemetry_row(t: Telemetry, received: float) -> tuple[Any, ...]:
    s, p, sp = t.system, t.process, t.spool
    temps = s.temperatures_c
    throttled = None if s.throttling is None else int(s.throttling.throttled_now)
    return (
        t.device, t.seq, t.at, received, t.interval_s,
        p.rss_mb, p.peak_rss_mb, p.cpu_percent, p.threads,
        s.cpu_percent, s.cpu_count, s.mem_available_mb, s.mem_total_mb, s.load1, s.load5, s.load15,
        max(temps.values()) if temps else None, _dumps(temps) if temps else None,
        throttled, s.throttling.model_dump_json() if s.throttling else None,
        s.disk_free_mb, s.disk_total_mb, sp.queued, sp.dropped, sp.dropped_total,
        _dumps(t.acceptance) if t.acceptance else None, _dumps(t.mqtt) if t.mqtt else None,
        s.power_mode.model_dump_json() if s.power_mode else None,
    )  # fmt: skip


def _model_rows(t: Telemetry, received: float) -> Iterator[tuple[Any, ...]]:
    for m in t.models:
        yield (
            t.device, t.seq, t.at, received, t.interval_s,
            m.model, m.version, m.runtime, m.delegate,
            m.count, m.client_errors, m.server_errors, m.throughput_rps,
            m.p50_ms, m.p90_ms, m.p99_ms, m.p999_ms, m.max_ms,
            _dumps(m.latency_hist) if m.latency_hist else None,
            m.labelled, m.correct, m.online_accuracy, _dumps(m.predicted) if m.predicted else None, m.drift,
        )  # fmt: skip


def write_batch(db: Database, batch: Batch) -> Stored:
    """Store a batch in one transaction; telemetry already stored (same device and seq) is skipped.

    Rows go in (device, seq) order so that two collectors writing overlapping batches (a
    redelivery) take their locks in the same order and never deadlock."""
    telemetry = sorted(batch.telemetry, key=lambda tr: (tr[0].device, tr[0].seq))
    rows = [_telemetry_row(t, received) for t, received in telemetry]
    # One device-row update per device and batch, not per message.
    from_telemetry: dict[str, tuple[str, str | None, float]] = {}
    from_events: dict[str, float] = {}
    with db.transaction():
        keys = db.insert_new("telemetry", rows, (0, 1))
        new = []
        for t, received in telemetry:
            if (t.device, t.seq) in keys:
                keys.discard((t.device, t.seq))  # a copy in the same batch is a duplicate
                new.append((t, received))
        for t, received in telemetry:
            from_telemetry[t.device] = (_dumps(t.groups), t.profile, received)
        db.copy_rows("model_telemetry", [row for t, received in new for row in _model_rows(t, received)])
        events = sorted(
            (_event_row(e, payload, rcv) for e, payload, rcv in batch.events), key=lambda r: r[:2]
        )
        stored_events = len(db.insert_new("events", events, (0, 12), columns=_EVENT_COLUMNS))
        for event, _payload, received in batch.events:
            from_events[event.device] = received
        db.executemany(_SEEN_TELEMETRY_SQL, [(d, *v) for d, v in sorted(from_telemetry.items())])
        db.executemany(_SEEN_SQL, sorted(from_events.items()))
        for device, reported, received, retained in batch.reported:
            if reported is None:
                db.execute("DELETE FROM devices WHERE device = ?", (device,))
            else:
                db.execute(_REPORTED_SQL, _reported_row(reported, received, retained))
    duplicates = len(batch.telemetry) - len(new) + len(batch.events) - stored_events
    return Stored(new, stored_events, duplicates)


def _event_row(e: Event, payload: bytes, received: float) -> tuple[Any, ...]:
    digest = hashlib.blake2b(payload, digest_size=16).digest()
    ok = None if e.ok is None else int(e.ok)
    bundle, version = (e.bundle.name, e.bundle.version) if e.bundle else (None, None)
    text = payload.decode("utf-8")
    return (e.device, e.at, received, e.kind, e.model, e.state, ok, e.code, e.reason, bundle, version,
            text, digest)  # fmt: skip


def reported_seen(r: Reported, received: float, retained: bool) -> float | None:
    """When a reported state says the device was last heard (collector clock, Unix s).

    A retained copy (delivered on subscribe) is not the device speaking now: it counts only
    as far as the state's own time. The last will (online false) is the broker speaking.
    """
    if not r.online:
        return None
    return received if not retained else min(r.at, received)


def _reported_row(r: Reported, received: float, retained: bool) -> tuple[Any, ...]:
    seen = reported_seen(r, received, retained)
    models = {name: status.model_dump(mode="json") for name, status in r.models.items()}
    last = r.last_deployment.model_dump_json() if r.last_deployment else None
    return (
        r.device, int(r.online), _dumps(r.groups), r.profile, r.agent_version,
        _dumps(r.hardware), _dumps(models), last, r.at, seen,
    )  # fmt: skip


def delete_older_than(db: Database, cutoff: float, chunk: int = 5000) -> int:
    """Delete telemetry and events received before ``cutoff`` (Unix s), ``chunk`` rows per
    transaction so the writer never stalls for long; returns how many rows went (PostgreSQL:
    whole days of telemetry go as partitions, see fleet/pgpartitions.py)."""
    deleted = 0
    if db.kind == "postgresql":
        pgpartitions.ensure_ahead(db)
        deleted += pgpartitions.drop_older_than(db, cutoff, chunk)
        tables: tuple[tuple[str, str], ...] = (("events", "id"),)
    else:
        tables = (("telemetry", "rowid"), ("model_telemetry", "rowid"), ("events", "id"))
    for table, key in tables:
        deleted += pgpartitions.delete_received_before(db, table, key, cutoff, chunk)
    return deleted


HEARTBEAT_KEY = "collector"


def write_heartbeat(db: Database, stats: dict[str, Any], name: str = "") -> None:
    """A collector's counters and the time it wrote them, for views to show whether it runs.
    Several collectors of one database each write their own (``name``: the MQTT client id)."""
    key = f"{HEARTBEAT_KEY}:{name}" if name else HEARTBEAT_KEY
    db.execute(
        Database.upsert_sql("meta", ("key", "value"), ("key",), ("value",)),
        (key, _dumps({"at": time.time(), **stats})),
    )


# --- reading ----------------------------------------------------------------------------


def collector_heartbeat(db: Database) -> dict[str, Any] | None:
    """The newest collector heartbeat; with several collectors, ``collectors`` says how many
    wrote one and ``running`` how many within the last minute."""
    beats = []
    for row in db.execute(
        "SELECT value FROM meta WHERE key = ? OR key LIKE ?", (HEARTBEAT_KEY, "collector:%")
    ):
        value = json.loads(row[0])
        if isinstance(value, dict):
            beats.append(value)
    if not beats:
        return None
    newest = max(beats, key=lambda b: float(b.get("at", 0)))
    if len(beats) > 1:
        now = time.time()
        running = sum(1 for b in beats if not b.get("stopped") and now - float(b.get("at", 0)) < 60)
        newest = {**newest, "collectors": len(beats), "running": running}
    return newest


def loads(text: str | None, default: Any = None) -> Any:
    """A JSON column's value (``default`` for NULL)."""
    return default if text is None else json.loads(text)


def count_rows(db: Database, tables: Sequence[str] = ("telemetry", "events")) -> dict[str, int]:
    return {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}  # noqa: S608
