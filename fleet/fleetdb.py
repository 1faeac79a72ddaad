"""The fleet database: what the collector stores (SQLite, WAL) and how the views read it.

One file, written by one collector (the writer thread of :class:`fleet.collector.Collector`)
and read at the same time by any number of views: WAL mode lets readers see the last
committed batch without blocking the writer. Times are Unix seconds; ``at`` is the device's
clock (what plots and windows use), ``received`` the collector's (what retention and
"last seen" use, so a device whose clock is wrong neither vanishes nor lingers).

Tables (see docs/fleet.md for every column):

* ``devices``          one row per device: the retained reported state and when it was last heard
* ``telemetry``        one row per telemetry message, unique by (device, seq): process and system
* ``model_telemetry``  one row per (message, model, version, runtime, delegate): requests, latency
                       percentiles and the mergeable latency histogram, online accuracy, drift
* ``events``           deployment progress and outcomes, de-duplicated by a digest of the payload
* ``meta``             schema version and the collector's heartbeat
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic_core

from edgeagent.errors import MalformedMessage, UsageError
from edgeagent.protocol import Event, Reported, Telemetry

SCHEMA_VERSION = 2
# Older schemas this edgectl still reads, and the statements that bring each one up to the next
# when the collector (the one writer) opens it. Columns are only ever appended, so a migrated
# table and a new one have the same column order (the inserts are positional).
_MIGRATIONS = {1: ("ALTER TABLE telemetry ADD COLUMN power_mode TEXT",)}
READABLE_VERSIONS = frozenset({*_MIGRATIONS, SCHEMA_VERSION})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    online INTEGER,                       -- NULL until a reported state arrives
    groups TEXT NOT NULL DEFAULT '[]',    -- JSON list
    profile TEXT,
    agent_version TEXT,
    hardware TEXT,                        -- JSON object
    models TEXT,                          -- JSON: model name -> ModelStatus
    last_deployment TEXT,                 -- JSON DeploymentOutcome
    reported_at REAL,                     -- the reported state's own time (device clock)
    last_seen REAL                        -- collector clock: last message from the device itself
);
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    received REAL NOT NULL,
    interval_s REAL NOT NULL,
    rss_mb REAL, peak_rss_mb REAL, cpu_percent REAL, threads INTEGER,
    sys_cpu_percent REAL, cpu_count INTEGER, mem_available_mb REAL, mem_total_mb REAL,
    load1 REAL, load5 REAL, load15 REAL,
    temp_max_c REAL, temperatures TEXT, throttled INTEGER, throttling TEXT,
    disk_free_mb REAL, disk_total_mb REAL,
    spool_queued INTEGER, spool_dropped INTEGER, spool_dropped_total INTEGER,
    acceptance TEXT, mqtt TEXT,
    power_mode TEXT,                      -- JSON PowerMode (schema 2), NULL where the board has none
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS telemetry_device_at ON telemetry (device, at);
CREATE INDEX IF NOT EXISTS telemetry_received ON telemetry (received);
CREATE TABLE IF NOT EXISTS model_telemetry (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    received REAL NOT NULL,
    interval_s REAL NOT NULL,
    model TEXT NOT NULL, version TEXT NOT NULL, runtime TEXT NOT NULL, delegate TEXT NOT NULL,
    count INTEGER NOT NULL, client_errors INTEGER NOT NULL, server_errors INTEGER NOT NULL,
    throughput_rps REAL,
    p50_ms REAL, p90_ms REAL, p99_ms REAL, p999_ms REAL, max_ms REAL,
    latency_hist TEXT,                    -- Histogram.to_dict() JSON, seconds
    labelled INTEGER, correct INTEGER, online_accuracy REAL, predicted TEXT, drift REAL
);
CREATE INDEX IF NOT EXISTS model_telemetry_device_at ON model_telemetry (device, model, at);
CREATE INDEX IF NOT EXISTS model_telemetry_received ON model_telemetry (received);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    at REAL NOT NULL,
    received REAL NOT NULL,
    kind TEXT NOT NULL, model TEXT, state TEXT, ok INTEGER, code TEXT, reason TEXT,
    bundle TEXT, version TEXT,
    payload TEXT NOT NULL,
    digest BLOB NOT NULL                  -- of the payload: a QoS 1 redelivery is stored once
);
CREATE UNIQUE INDEX IF NOT EXISTS events_digest ON events (device, digest);
CREATE INDEX IF NOT EXISTS events_device_at ON events (device, at);
CREATE INDEX IF NOT EXISTS events_received ON events (received);
"""

_TELEMETRY_SQL = (
    "INSERT OR IGNORE INTO telemetry VALUES (" + ", ".join("?" * 28) + ")"  # noqa: S608 - placeholders only
)
_MODEL_SQL = "INSERT INTO model_telemetry VALUES (" + ", ".join("?" * 24) + ")"  # noqa: S608
_EVENT_SQL = (
    "INSERT OR IGNORE INTO events (device, at, received, kind, model, state, ok, code, reason, bundle, "
    "version, payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Telemetry creates the device row (groups, profile) when no reported state came yet; a
# reported state owns those fields once it has arrived.
_SEEN_TELEMETRY_SQL = """
INSERT INTO devices (device, groups, profile, last_seen) VALUES (?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    last_seen = max(coalesce(last_seen, 0), excluded.last_seen),
    groups = CASE WHEN reported_at IS NULL THEN excluded.groups ELSE groups END,
    profile = CASE WHEN reported_at IS NULL THEN excluded.profile ELSE profile END
"""
_SEEN_SQL = """
INSERT INTO devices (device, last_seen) VALUES (?, ?)
ON CONFLICT (device) DO UPDATE SET last_seen = max(coalesce(last_seen, 0), excluded.last_seen)
"""
_REPORTED_SQL = """
INSERT INTO devices (device, online, groups, profile, agent_version, hardware, models, last_deployment,
                     reported_at, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device) DO UPDATE SET
    online = excluded.online, groups = excluded.groups, profile = excluded.profile,
    agent_version = excluded.agent_version, hardware = excluded.hardware, models = excluded.models,
    last_deployment = excluded.last_deployment, reported_at = excluded.reported_at,
    last_seen = max(coalesce(last_seen, 0), coalesce(excluded.last_seen, 0))
"""


def _dumps(value: Any) -> str:
    # pydantic-core's encoder: a third of json.dumps's time on a latency histogram, and the
    # writer encodes a few per message.
    return pydantic_core.to_json(value).decode("utf-8")


def open_for_writing(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the fleet database for the one writer."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise UsageError(f"{path}: cannot open as a database ({exc})") from exc
    # NORMAL in WAL mode: a committed batch survives the collector crashing, and only the
    # last batches can be lost to a power cut; FULL would fsync every batch.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    with transaction(conn):
        _create(conn)
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if found is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(found[0]) != SCHEMA_VERSION:
            _migrate(conn, path, int(found[0]))
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Bring an older database up to SCHEMA_VERSION inside the caller's transaction."""
    if version not in _MIGRATIONS:
        raise UsageError(f"{path}: fleet database schema {version}, this edgectl knows {SCHEMA_VERSION}")
    while version < SCHEMA_VERSION:
        for statement in _MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def _create(conn: sqlite3.Connection) -> None:
    # executescript would COMMIT the open transaction; run the statements one by one instead.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def open_for_reading(path: Path) -> sqlite3.Connection:
    """Open an existing fleet database for a view; UsageError when it is missing or not ours."""
    if not path.is_file():
        raise UsageError(f"{path}: no fleet database here (`edgectl fleet collect --db {path}` makes one)")
    try:
        # Not mode=ro: a WAL reader needs to create the -shm file when the collector is not running.
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        raise UsageError(f"{path}: not a fleet database ({exc})") from exc
    if found is None or int(found[0]) not in READABLE_VERSIONS:
        raise UsageError(
            f"{path}: not a fleet database of schema {SCHEMA_VERSION}"
            + (f" (schema {found[0]}: a newer edgectl made it)" if found else "")
        )
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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


def write_batch(conn: sqlite3.Connection, batch: Batch) -> Stored:
    """Store a batch in one transaction; telemetry already stored (same device and seq) is skipped."""
    new: list[tuple[Telemetry, float]] = []
    # One device-row update per device and batch, not per message.
    from_telemetry: dict[str, tuple[str, str | None, float]] = {}
    from_events: dict[str, float] = {}
    with transaction(conn):
        for t, received in batch.telemetry:
            if conn.execute(_TELEMETRY_SQL, _telemetry_row(t, received)).rowcount == 1:
                new.append((t, received))
            from_telemetry[t.device] = (_dumps(t.groups), t.profile, received)
        conn.executemany(_MODEL_SQL, [row for t, received in new for row in _model_rows(t, received)])
        before = conn.total_changes
        conn.executemany(_EVENT_SQL, [_event_row(e, payload, rcv) for e, payload, rcv in batch.events])
        stored_events = conn.total_changes - before
        for event, _payload, received in batch.events:
            from_events[event.device] = received
        conn.executemany(_SEEN_TELEMETRY_SQL, [(d, g, p, r) for d, (g, p, r) in from_telemetry.items()])
        conn.executemany(_SEEN_SQL, list(from_events.items()))
        for device, reported, received, retained in batch.reported:
            if reported is None:
                conn.execute("DELETE FROM devices WHERE device = ?", (device,))
            else:
                conn.execute(_REPORTED_SQL, _reported_row(reported, received, retained))
    duplicates = len(batch.telemetry) - len(new) + len(batch.events) - stored_events
    return Stored(new, stored_events, duplicates)


def is_data_error(exc: BaseException) -> bool:
    """Whether the database refused the data itself (a value it cannot hold, a constraint),
    rather than failing to write at all (disk full, locked, connection lost)."""
    if isinstance(exc, OverflowError | ValueError | sqlite3.IntegrityError | sqlite3.DataError):
        return True
    return type(exc).__module__.startswith("psycopg") and type(exc).__name__ in _PG_DATA_ERRORS


_PG_DATA_ERRORS = frozenset({"DataError", "IntegrityError"}) | {
    "NumericValueOutOfRange", "CharacterNotInRepertoire", "UntranslatableCharacter", "RaiseException",
}  # fmt: skip


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


def delete_older_than(conn: sqlite3.Connection, cutoff: float, chunk: int = 5000) -> int:
    """Delete telemetry and events received before ``cutoff`` (Unix s), ``chunk`` rows per
    transaction so the writer never stalls for long; returns how many rows went."""
    deleted = 0
    for table in ("telemetry", "model_telemetry", "events"):
        while True:
            with transaction(conn):
                n = conn.execute(
                    f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608 - table names are ours
                    f"(SELECT rowid FROM {table} WHERE received < ? LIMIT ?)",
                    (cutoff, chunk),
                ).rowcount
            deleted += n
            if n < chunk:
                break
    return deleted


def write_heartbeat(conn: sqlite3.Connection, stats: dict[str, Any]) -> None:
    """The collector's counters and the time it wrote them, for views to show whether it runs."""
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('collector', ?)", (_dumps({"at": time.time(), **stats}),)
        )


# --- reading ----------------------------------------------------------------------------


def collector_heartbeat(conn: sqlite3.Connection) -> dict[str, Any] | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'collector'").fetchone()
    if row is None:
        return None
    value = json.loads(row[0])
    return value if isinstance(value, dict) else None


def loads(text: str | None, default: Any = None) -> Any:
    """A JSON column's value (``default`` for NULL)."""
    return default if text is None else json.loads(text)


def count_rows(conn: sqlite3.Connection, tables: Sequence[str] = ("telemetry", "events")) -> dict[str, int]:
    return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}  # noqa: S608
