"""The fleet database's two backends behind one small interface: SQLite (one file, the embedded
default) and PostgreSQL (one server that several collectors and views share).

Code that stores something in the fleet database (the collector, the rollout controller) writes
its SQL once, in the dialect both servers speak, and runs it through :class:`Database`:

* placeholders are ``?`` (translated to ``%s`` for PostgreSQL); a literal ``%`` needs no escaping;
* ``GREATEST(a, b)`` is SQLite's two-argument ``max(a, b)``;
* upserts are ``INSERT ... ON CONFLICT (key) DO NOTHING`` or ``DO UPDATE SET c = excluded.c``
  (:meth:`Database.upsert_sql` builds them); ``INSERT OR IGNORE``/``OR REPLACE`` are SQLite only;
* DDL uses ``TEXT``, ``INTEGER`` (64-bit in both), ``REAL``, ``BLOB`` and ``ID`` for an
  auto-numbered primary key, translated by :meth:`Database.ddl`;
* :meth:`Database.transaction` is one write transaction (SQLite: ``BEGIN IMMEDIATE``, so two
  writers queue instead of failing at commit); outside one, each statement commits on its own.

Rows of a reading connection are read by position, by column name (``row["device"]``) and
``row.keys()`` (sqlite3.Row, or :class:`Row` for PostgreSQL); a SQLite writing connection
returns plain tuples.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from edgeagent.errors import UsageError

Kind = Literal["sqlite", "postgresql"]
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
PSYCOPG_HINT = "a PostgreSQL fleet database needs psycopg: pip install 'edgeagent[postgres]'"


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def redact(target: str | Path) -> str:
    """The database's name for messages: a DSN without its password."""
    text = str(target)
    if not is_postgres(text):
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Database:
    """One connection to the fleet database (either backend). Not thread-safe: one per thread."""

    kind: Kind
    where: str  # the path or the DSN without password, for messages

    def __init__(self, conn: Any, kind: Kind, where: str) -> None:
        self.conn = conn
        self.kind = kind
        self.where = where

    # --- SQL in both dialects ---------------------------------------------------------------

    def sql(self, text: str) -> str:
        return _translate(text, self.kind)

    def ddl(self, text: str) -> str:
        return _translate_ddl(text, self.kind)

    @staticmethod
    def upsert_sql(table: str, columns: Sequence[str], key: Sequence[str], update: Sequence[str] = ()) -> str:
        """``INSERT INTO table (columns) VALUES (?, ...) ON CONFLICT (key)``: DO NOTHING, or
        set the ``update`` columns to the new row's values."""
        action = (
            "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in update) if update else "DO NOTHING"
        )
        names, marks = ", ".join(columns), ", ".join("?" * len(columns))
        # The names are the caller's own identifiers; values travel as parameters.
        return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT ({', '.join(key)}) {action}"  # noqa: S608

    # --- running it -------------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the cursor (``fetchone``, ``fetchall``, iteration, ``rowcount``)."""
        return self.conn.execute(self.sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.kind == "sqlite":
            self.conn.executemany(self.sql(sql), rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.sql(sql), rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self.kind == "postgresql":
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def insert_new(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        key: Sequence[int],
        columns: Sequence[str] | None = None,
    ) -> set[tuple[Any, ...]]:
        """Insert rows (all columns of ``table``, or ``columns``), skipping those a unique key
        already holds; returns the keys (the values at positions ``key``: the unique key's
        columns) of the rows that were new. Runs inside the caller's transaction."""
        if not rows:
            return set()
        width = len(rows[0])
        into = f"{table} ({', '.join(columns)})" if columns else table
        if self.kind == "sqlite":
            sql = f"INSERT OR IGNORE INTO {into} VALUES ({', '.join('?' * width)})"  # noqa: S608
            return {tuple(r[i] for i in key) for r in rows if self.conn.execute(sql, r).rowcount == 1}
        names = list(columns) if columns else [d.name for d in self._columns(table)]
        cols, keys = ", ".join(names), ", ".join(names[i] for i in key)
        staging = f"_in_{table}"
        # COPY into a per-connection staging table, then one INSERT ... SELECT: a multi-row VALUES
        # statement of thousands of parameters spent most of its time in the driver parsing it.
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS "  # noqa: S608 - our names
                f"SELECT {cols} FROM {table} WITH NO DATA"
            )
            with cur.copy(f"COPY {staging} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(
                # In key order, so two collectors inserting the same keys lock them in one order.
                f"INSERT INTO {into} SELECT {cols} FROM {staging} ORDER BY {keys} "  # noqa: S608
                f"ON CONFLICT DO NOTHING RETURNING {keys}"
            )
            new = {tuple(r) for r in cur.fetchall()}
            cur.execute(f"TRUNCATE {staging}")  # the next call in this transaction starts empty
        return new

    def copy_rows(self, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """Append rows to a table without unique keys (PostgreSQL: COPY, the fastest path)."""
        if not rows:
            return
        if self.kind == "sqlite":
            self.conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)  # noqa: S608
            return
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    @functools.cache  # noqa: B019 - one connection lives as long as its columns
    def _columns(self, table: str) -> tuple[Any, ...]:
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {table} LIMIT 0")  # noqa: S608 - our own table names
            return tuple(cur.description)

    def close(self) -> None:
        self.conn.close()


@functools.lru_cache(maxsize=512)
def _translate(text: str, kind: Kind) -> str:
    if kind == "sqlite":
        return text.replace("GREATEST(", "max(")
    return text.replace("%", "%%").replace("?", "%s")


_DDL_TYPES = {
    "postgresql": (
        (re.compile(r"\bID\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
        (re.compile(r"\bINTEGER\b"), "BIGINT"),
        (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
        (re.compile(r"\bBLOB\b"), "BYTEA"),
    ),
    "sqlite": ((re.compile(r"\bID\b"), "INTEGER PRIMARY KEY"),),
}


def _translate_ddl(text: str, kind: Kind) -> str:
    for pattern, replacement in _DDL_TYPES[kind]:
        text = pattern.sub(replacement, text)
    return text


# --- connecting -------------------------------------------------------------------------------


def connect_sqlite(path: Path, *, writer: bool) -> Database:
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        if writer:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed batch survives the collector crashing, and only the
            # last batches can be lost to a power cut; FULL would fsync every batch.
            conn.execute("PRAGMA synchronous=NORMAL")
        else:
            conn.row_factory = sqlite3.Row
    except sqlite3.Error as exc:
        raise UsageError(f"{path}: cannot open as a database ({exc})") from exc
    return Database(conn, "sqlite", str(path))


def connect_postgres(dsn: str, *, writer: bool) -> Database:
    try:
        import psycopg
    except ImportError:
        raise UsageError(PSYCOPG_HINT) from None
    where = redact(dsn)
    try:
        conn = psycopg.connect(dsn, autocommit=True, application_name="edgectl-fleet", connect_timeout=10)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{where}: cannot connect ({first})") from exc
    conn.row_factory = _row_factory
    return Database(conn, "postgresql", where)


class Row(tuple):  # type: ignore[type-arg]
    """A PostgreSQL row read like a sqlite3.Row: by position, by column name, and ``keys()``."""

    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = {d.name: i for i, d in enumerate(cursor.description or ())}
    row_type = type("Row", (Row,), {"_names": names})
    return row_type


def connect(target: str | Path, *, writer: bool) -> Database:
    if is_postgres(target):
        return connect_postgres(str(target), writer=writer)
    return connect_sqlite(Path(target), writer=writer)


def is_data_error(exc: BaseException) -> bool:
    """Whether the database refused the data itself (a value it cannot hold, a constraint),
    rather than failing to write at all (disk full, locked, connection lost)."""
    if isinstance(exc, OverflowError | ValueError | sqlite3.IntegrityError | sqlite3.DataError):
        return True
    if not type(exc).__module__.startswith("psycopg"):
        return False
    import psycopg

    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError | psycopg.errors.RaiseException)
