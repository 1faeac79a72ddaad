"""The fleet database's schema: its tables in the dialect both backends speak, the PostgreSQL
partitioning of the telemetry tables, and the migrations from older schema versions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.dbbackend import Database

SCHEMA_VERSION = 2
# Older schemas this edgectl still reads, and the statements that bring each one up to the next
# when a collector opens it. Columns are only ever appended, so a migrated table and a new one
# have the same column order (the inserts are positional).
MIGRATIONS = {1: ("ALTER TABLE telemetry ADD COLUMN power_mode TEXT",)}
READABLE_VERSIONS = frozenset({*MIGRATIONS, SCHEMA_VERSION})

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
    PRIMARY KEY (device, seq)  -- PostgreSQL: (device, seq, at), the partition key
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
    id ID,
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
# PostgreSQL: the telemetry tables are partitioned by day of ``at`` (fleet/pgpartitions.py), and
# a unique key must hold the partition key.
_PARTITIONED = {
    "telemetry": ("PRIMARY KEY (device, seq)", "PRIMARY KEY (device, seq, at)"),
    "model_telemetry": None,
}


def statements(db: Database) -> Iterator[str]:
    for statement in _SCHEMA.split(";"):
        text = statement.strip()
        if not text:
            continue
        if db.kind == "postgresql":
            text = re.sub(r"--[^\n]*", "", text)
            table = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", text)
            if table and table.group(1) in _PARTITIONED:
                key = _PARTITIONED[table.group(1)]
                if key:
                    text = text.replace(*key)
                yield db.ddl(text + " PARTITION BY RANGE (at)")
                name = table.group(1)
                yield f"CREATE TABLE IF NOT EXISTS {name}_default PARTITION OF {name} DEFAULT"
                continue
            # Only the default partitions are trimmed row by row (days go whole): only they
            # need an index on received.
            text = re.sub(r"_received ON (telemetry|model_telemetry) ", r"_received ON \1_default ", text)
        yield db.ddl(text)
