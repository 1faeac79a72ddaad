"""The fleet database's backend interface (fleet/dbbackend.py), the same SQL run against SQLite and a
real PostgreSQL 15: DDL types, placeholders, upserts, GREATEST, a literal %, insert_new's keys,
rows read by position and by name, and a transaction that rolls back."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import fleetdb
from fleet.dbbackend import Database, connect, redact

pytest_plugins = ["postgres_support"]  # the postgres and pg_dsn fixtures

DDL = """CREATE TABLE IF NOT EXISTS waves (
    id ID, rollout TEXT NOT NULL, wave INTEGER NOT NULL, share REAL, token BLOB, done_at REAL,
    UNIQUE (rollout, wave)
)"""


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


def test_one_dialect_runs_on_both(target: str) -> None:
    db = connect(target, writer=True)
    try:
        db.execute(db.ddl(DDL))
        upsert = Database.upsert_sql("waves", ("rollout", "wave", "share", "token", "done_at"),
                                     ("rollout", "wave"), ("share", "done_at"))  # fmt: skip
        with db.transaction():
            db.execute(upsert, ("r1", 1, 0.1, b"\x00\xff", None))
            db.execute(upsert, ("r1", 2, 0.5, b"", None))
            db.execute(upsert, ("r1", 1, 0.2, b"ignored", 100.0))  # updates share and done_at only
        db.execute(
            "UPDATE waves SET done_at = GREATEST(coalesce(done_at, 0), ?) WHERE rollout = ?", (50.0, "r1")
        )
        rows = db.execute("SELECT wave, share, token, done_at FROM waves WHERE rollout LIKE ? ORDER BY wave",
                          ("r%",)).fetchall()  # fmt: skip
        assert [tuple(r) for r in rows] == [(1, 0.2, b"\x00\xff", 100.0), (2, 0.5, b"", 50.0)]
        assert db.execute("SELECT count(*) FROM waves WHERE rollout LIKE '%1'").fetchone()[0] == 2
        with pytest.raises(RuntimeError), db.transaction():
            db.execute(upsert, ("r2", 1, 0.3, b"", None))
            raise RuntimeError("the caller failed: nothing of this transaction stays")
        assert db.execute("SELECT count(*) FROM waves WHERE rollout = ?", ("r2",)).fetchone()[0] == 0
        with db.transaction():
            new = db.insert_new("waves", [("r1", 2, 0.9, b"", None), ("r3", 1, 0.9, b"", None)], (0, 1),
                                columns=("rollout", "wave", "share", "token", "done_at"))  # fmt: skip
        assert new == {("r3", 1)}
    finally:
        db.close()


def test_views_read_rows_by_name_on_both(target: str) -> None:
    fleetdb.open_for_writing(target).close()
    db = fleetdb.open_for_reading(target)
    try:
        row = db.execute("SELECT key, value FROM meta WHERE key = ?", ("schema_version",)).fetchone()
        assert row["value"] == row[1] == "2" and list(row.keys()) == ["key", "value"]
    finally:
        db.close()


def test_a_dsn_is_shown_without_its_password() -> None:
    assert (
        redact("postgresql://u:pw@db/fleet?sslmode=require") == "postgresql://u:***@db/fleet?sslmode=require"
    )
    assert redact("postgresql://u@db/fleet") == "postgresql://u@db/fleet"
    assert redact(Path("fleet.db")) == "fleet.db"
