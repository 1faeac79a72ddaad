"""A real PostgreSQL server for the fleet database tests, started once per test session.

Debian's PostgreSQL 15 (``initdb`` and ``postgres`` on PATH, /usr/local/bin or
/usr/lib/postgresql/*/bin), a temporary data folder, a Unix socket in a temporary folder and no
TCP listener. PostgreSQL refuses to run as root, so as root the server runs as ``nobody`` (the
folder is made theirs). Each test gets a database of its own (``pg_dsn``). Skipped, with the
reason, only where the binaries are missing or the server cannot start.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)


@dataclass
class PostgresServer:
    socket_dir: Path
    user: str = "edge"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}"

    def create_database(self) -> str:
        import psycopg

        name = f"fleet_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)


def _as_server_user() -> tuple[list[str], int | None]:
    """The command prefix that runs the server as a non-root user, and that user's uid."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("PostgreSQL cannot run as root, and runuser (util-linux) is not here to drop to nobody")
    return [runuser, "-u", "nobody", "--"], pwd.getpwnam("nobody").pw_uid


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    initdb, server = _binary("initdb"), _binary("postgres")
    if initdb is None or server is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does this)")
    pytest.importorskip("psycopg", reason="pip install 'edgeagent[postgres]'")
    prefix, uid = _as_server_user()
    # Not pytest's tmp_path: its folders are private to root, and the server runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
    if uid is not None:
        os.chown(root, uid, -1)
    data = root / "data"
    init = subprocess.run(
        [*prefix, initdb, "-D", str(data), "-U", "edge", "--auth=trust", "-E", "UTF8", "--no-sync"],
        capture_output=True,
        text=True,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
    log = open(root / "server.log", "wb")  # noqa: SIM115 - the server writes it while it runs
    proc = subprocess.Popen(
        [*prefix, server, "-D", str(data), "-k", str(root), "-c", "listen_addresses=",
         "-c", "fsync=off", "-c", "max_connections=100"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    pg = PostgresServer(root)
    try:
        _wait_ready(pg, proc, root)
        yield pg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(pg: PostgresServer, proc: subprocess.Popen[bytes], root: Path) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.skip(f"postgres exited: {(root / 'server.log').read_text(errors='replace')[-300:]}")
        try:
            psycopg.connect(pg.dsn(), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                pytest.skip("postgres did not accept connections within 30 s")
            time.sleep(0.1)


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres.create_database()
