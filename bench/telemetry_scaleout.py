"""Collectors that scale out (issue 21): SQLite and PostgreSQL, 1/2/4 collectors, kill -9.

Run by ``bench/telemetry.py --scaleout``: one Mosquitto with the settings docs/fleet.md gives
for a lossless collector (``max_inflight_messages 1000``, ``max_queued_messages 1000000``), a
PostgreSQL 15 server of its own (initdb in a temporary folder, a Unix socket, run as ``nobody``
when this runs as root), and real ``edgectl fleet collect`` processes, each with
``--ack-after-commit`` (the PostgreSQL ones with ``--share``). For each (database, collectors)
the same ladder of paced rates as the ingest table; a rate is sustained with zero loss and the
collectors caught up within 2 s. Then, at the highest rate two PostgreSQL collectors sustained,
one of them is killed with SIGKILL (its whole process group) a third of the way in and
started again at once with the same client id: the messages lost are what the database lacks
of what the broker acknowledged, with and without ``--ack-after-commit``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.telemetry import Step, run_step, tree_cpu
from bench.transfer import start_broker

BROKER_CONF = "max_inflight_messages 1000\nmax_queued_messages 1000000\n"


def start_postgres(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A PostgreSQL server on a Unix socket in ``workdir``; returns it and a DSN."""
    root = workdir / "pg"
    root.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses root
        os.chown(workdir, pwd.getpwnam("nobody").pw_uid, -1)
        os.chown(root, pwd.getpwnam("nobody").pw_uid, -1)
        prefix = [shutil.which("runuser") or "runuser", "-u", "nobody", "--"]
    initdb = shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb"
    server = shutil.which("postgres") or "/usr/lib/postgresql/15/bin/postgres"
    subprocess.run([*prefix, initdb, "-D", str(root / "data"), "-U", "edge", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    # fsync stays on: the bench measures what a real deployment pays for a commit.
    proc = subprocess.Popen([*prefix, server, "-D", str(root / "data"), "-k", str(root), "-c", "listen_addresses="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    dsn = f"postgresql://edge@/postgres?host={root}"
    import psycopg

    for _ in range(300):
        with contextlib.suppress(psycopg.OperationalError):
            psycopg.connect(dsn).close()
            return proc, dsn
        time.sleep(0.1)
    raise RuntimeError("postgres did not start")


class Collectors:
    """``n`` edgectl fleet collect processes on one database, each in a process group of its own.

    Every configuration has client ids and a shared-subscription group of its own: the stopped
    collectors of an earlier one keep their sessions, and a group member that is away keeps
    getting its share (docs/fleet.md)."""

    def __init__(self, port: int, db: str, n: int, tag: str, *, ack: bool = True) -> None:
        self.port, self.db = port, db
        self.argv = [
            [str(Path(sys.executable).parent / "edgectl"), "fleet", "collect", "--broker", f"mqtt://127.0.0.1:{port}",
             "--db", db, "--prefix", "bench", "--client-id", f"bench-{tag}-c{i}", "--stats-every", "0",
             *(["--share", f"bench-{tag}"] if n > 1 or db.startswith("postgresql") else []),
             *(["--ack-after-commit"] if ack else [])]
            for i in range(n)
        ]  # fmt: skip
        self.procs = [self._start(argv) for argv in self.argv]

    def _start(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.readline()  # "collecting from ...": the database is open
        return proc

    def processes(self) -> list[psutil.Process]:
        alive = []
        for p in self.procs:
            with contextlib.suppress(psutil.Error):  # killed a moment ago
                alive.append(psutil.Process(p.pid))
        return alive

    def kill9_and_restart(self, i: int) -> None:
        os.killpg(self.procs[i].pid, signal.SIGKILL)  # the collector and its MQTT child, as systemd would
        self.procs[i].wait()
        self.procs[i] = self._start(self.argv[i])

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def row_counter(db: str) -> Callable[[], int]:
    if db.startswith("postgresql"):
        import psycopg

        conn = psycopg.connect(db, autocommit=True)

        def pg_rows() -> int:
            row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
            return int(row[0]) if row else 0

        return pg_rows
    import sqlite3

    while not Path(db).exists():
        time.sleep(0.05)
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    return lambda: int(reader.execute("SELECT count(*) FROM telemetry").fetchone()[0])


def fresh_database(db: str, workdir: Path, name: str) -> str:
    if not db.startswith("postgresql"):
        return str(workdir / f"{name}.db")
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return db.replace("/postgres?", f"/{name}?")


def ladder(port: int, servers: list[psutil.Process], db: str, n: int, devices: list[str], args: object,
           tag: str) -> tuple[list[Step], float]:  # fmt: skip
    """The paced rates against ``n`` collectors on ``db``; returns the steps and the CPU share
    (fraction of one core) of ``servers`` (the broker, and PostgreSQL when it is the database)
    over the first step."""
    collectors = Collectors(port, db, n, tag)
    rows = row_counter(db)
    try:
        run_step(
            port, "bench", devices[:10], 1, 100, 0.5, rows, collectors.processes()
        )  # subscriptions settle
        steps = []
        broker_cpu = 0.0
        for rate in args.scaleout_rates:  # type: ignore[attr-defined]
            b0, t0 = tree_cpu(servers), time.time()
            step = run_step(port, "bench", [f"{d}-{tag}-{int(rate)}" for d in devices], args.publishers,  # type: ignore[attr-defined]
                            rate, args.scaleout_seconds, rows, collectors.processes())  # type: ignore[attr-defined]  # fmt: skip
            if not steps:
                broker_cpu = (tree_cpu(servers) - b0) / (time.time() - t0)
            steps.append(step)
            if not step.sustained:
                break  # the next rate would only lag more
    finally:
        collectors.stop()
    return steps, broker_cpu


def kill_run(port: int, db: str, devices: list[str], rate: float, seconds: float, publishers: int, *,
             ack: bool, tag: str) -> Step:  # fmt: skip
    """Two collectors at ``rate``; the first is killed with SIGKILL a third of the way in and restarted."""
    collectors = Collectors(port, db, 2, tag, ack=ack)
    rows = row_counter(db)
    try:
        run_step(port, "bench", devices[:10], 1, 100, 0.5, rows, collectors.processes())
        killer = threading.Timer(seconds / 3, collectors.kill9_and_restart, args=(0,))
        killer.start()
        step = run_step(port, "bench", [f"{d}-{tag}" for d in devices], publishers, rate, seconds, rows,
                        collectors.processes)  # fmt: skip
        killer.join()
    finally:
        collectors.stop()
    return step


def scaleout_section(args: object, workdir: Path) -> str:
    devices = [f"dev-{i:05d}" for i in range(args.devices)]  # type: ignore[attr-defined]
    broker, port = start_broker(workdir, BROKER_CONF)
    pg, dsn = start_postgres(workdir)
    results: list[tuple[str, int, list[Step], float]] = []
    try:
        configs = [("SQLite", 1), ("PostgreSQL", 1), ("PostgreSQL", 2), ("PostgreSQL", 4)]
        for backend, n in configs:
            name = f"{backend.lower()}_{n}"
            db = fresh_database(dsn if backend == "PostgreSQL" else "", workdir, name)
            print(f"scale-out: {backend}, {n} collector(s) ...", flush=True)
            servers = [psutil.Process(broker.pid)] + (
                [psutil.Process(pg.pid)] if backend == "PostgreSQL" else []
            )
            steps, broker_cpu = ladder(port, servers, db, n, devices, args, name)
            results.append((backend, n, steps, broker_cpu))
        best2 = max((s.rate for b, n, st, _ in results if (b, n) == ("PostgreSQL", 2) for s in st if s.sustained),
                    default=args.scaleout_rates[0])  # type: ignore[attr-defined]  # fmt: skip
        kills = []
        for ack in (True, False):
            print(f"kill -9 at {best2:,.0f} msg/s, ack after commit {ack} ...", flush=True)
            db = fresh_database(dsn, workdir, f"kill_{int(ack)}")
            kills.append((ack, kill_run(port, db, devices, best2, args.scaleout_seconds * 2,  # type: ignore[attr-defined]
                                        args.publishers, ack=ack, tag=f"kill{int(ack)}")))  # type: ignore[attr-defined]  # fmt: skip
    finally:
        broker.terminate()
        pg.terminate()
        broker.wait()
        pg.wait()
    return format_scaleout(results, kills, best2)


def format_scaleout(results: list[tuple[str, int, list[Step], float]], kills: list[tuple[bool, Step]],
                    kill_rate: float) -> str:  # fmt: skip
    lines = [
        "| database | collectors | offered msg/s | published | stored | lost | lag s | collectors' CPU | sustained |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for backend, n, steps, _broker in results:
        for s in steps:
            lines.append(f"| {backend} | {n} | {s.rate:,.0f} | {s.published:,} | {s.received:,} | {s.lost:,} | "
                         f"{s.lag_s:.2f} | {s.cpu:.0%} | {'yes' if s.sustained else '**no**'} |")  # fmt: skip
    best = {(b, n): max((s.rate for s in st if s.sustained), default=0.0) for b, n, st, _ in results}
    summary = ", ".join(f"{b} x{n}: **{r:,.0f}**" for (b, n), r in best.items())
    first = {(b, n): (st[0], broker) for b, n, st, broker in results if st}
    cpu = "; ".join(
        f"{b} x{n}: collectors {s.cpu:.0%}, broker{' and PostgreSQL server' if b == 'PostgreSQL' else ''} "
        f"{srv:.0%}"
        for (b, n), (s, srv) in first.items()
    )
    kill_lines = [
        f"- kill -9 of one of two PostgreSQL collectors at {kill_rate:,.0f} msg/s, restarted at once, "
        f"{'with' if ack else 'without'} `--ack-after-commit`: published {s.published:,}, stored {s.received:,}, "
        f"**lost {s.lost:,}**"
        for ack, s in kills
    ]
    return "\n".join(lines) + (
        f"\n\nHighest sustained rate (zero loss, caught up within 2 s): {summary}.\n\n"
        f"CPU at the first rate ({next(iter(first.values()))[0].rate:,.0f} msg/s), of one core: {cpu}.\n\n"
        + "\n".join(kill_lines)
    )
