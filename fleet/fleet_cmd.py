"""``edgectl fleet collect|status|watch|report``: store what the fleet reports, and look at it."""

from __future__ import annotations

import argparse
import gc
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgeagent.errors import UsageError
from fleet.hostopts import add_broker_options, broker_settings

if TYPE_CHECKING:
    from rich.console import Console

    from fleet.collector import Collector
    from fleet.status import StatusRow

DESCRIPTION = """\
Watch the fleet. `collect` subscribes to every device's reported state, deployment events
and telemetry and stores them in a SQLite file or a PostgreSQL database (and, with
--prometheus, serves them as Prometheus metrics); `status`, `watch` and `report` read that
database, also while the collector writes to it.
"""

EPILOG = """\
examples:
  edgectl fleet collect --broker mqtt://broker:1883 --db fleet.db --retention 7d --prometheus :9108
  edgectl fleet status --db fleet.db                      # one row per device and model
  edgectl fleet status --db fleet.db --group canary --bundle digits@1.1.0 --json
  edgectl fleet watch --db fleet.db                       # the same, live; Ctrl-C leaves
  edgectl fleet report --db fleet.db --html fleet.html --since 24h

Latency percentiles merge the devices' latency histograms (1% relative error) over a
window instead of averaging percentiles. More: docs/fleet.md.
"""

COLLECT_DESCRIPTION = """\
Subscribe (QoS 1) to every device's reported state, events and telemetry and store them
in a SQLite file (WAL: views read while it writes) or, with --db postgresql://..., a
PostgreSQL database that several collectors share (--share). Runs until Ctrl-C or SIGTERM,
printing a line of counters every --stats-every seconds. SIGUSR1 (or --retire, for a stopped
one) retires this client id for good without losing its share (docs/fleet.md).

The MQTT session is persistent: what devices send while the collector restarts waits at
the broker, up to Mosquitto's max_queued_messages (1000 by default; raise it for large
fleets, see docs/fleet.md). Malformed messages are counted and logged, never fatal;
telemetry sent twice (same device and seq) is stored once.
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, what: str) -> float:
    """'90s', '5m', '24h', '7d', '2w' or plain seconds -> seconds (> 0); UsageError otherwise."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{what} {text!r}: expected a positive duration such as 90s, 30m, 24h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = subparsers.add_parser(
        "fleet",
        help="collect telemetry into a database; status table, live view, HTML report, Prometheus",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    _register_collect(sub)
    views = (
        ("status", "one row per device and model: health, latency, memory, accuracy", _status),
        ("watch", "the status table, refreshed live (Ctrl-C leaves)", _watch),
    )
    for name, text, handler in views:
        view = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _db_option(view)
        view.add_argument("--group", metavar="G", help="only devices of this group")
        view.add_argument("--bundle", metavar="NAME[@VERSION]", help="only models running this bundle")
        # rollout (issue 20): host-side tags
        view.add_argument("--tag", metavar="QUERY", help="only devices matching a tag query (a,b,!c)")
        view.add_argument(
            "--window",
            default="5m",
            metavar="DURATION",
            help="latency/throughput over this much of each device's newest telemetry (default 5m)",
        )
        view.add_argument(
            "--wide", action="store_true", help="all columns (the default fits 100 terminal columns)"
        )
        if name == "status":
            view.add_argument(
                "--json", action="store_true", help="print JSON (for scripts) instead of a table"
            )
        else:
            view.add_argument(
                "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
            )
        view.set_defaults(handler=handler)
    report = sub.add_parser(
        "report",
        help="write a self-contained HTML page with latency and memory plots",
        description="Write one HTML file (inline SVG and CSS, no script, no network) with p50/p99 latency "
        "and RSS memory over time per device and per bundle version, and the status table.",
    )
    _db_option(report)
    report.add_argument(
        "--html", required=True, type=Path, metavar="OUT.html", help="where to write the page"
    )
    report.add_argument("--since", default="24h", metavar="DURATION", help="period to plot (default 24h)")
    report.set_defaults(handler=_report)
    # --- rollout (issue 20): `fleet history` and `fleet tag` live in fleet/rollout/cli.py
    from fleet.rollout.cli import register_fleet

    register_fleet(sub)
    # --- end rollout


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=_db_target,
        default=Path("fleet.db"),
        metavar="PATH|DSN",
        help="the fleet database: a SQLite file (default: ./fleet.db) or a PostgreSQL DSN, "
        "postgresql://USER@HOST/DB (password from PGPASSWORD or ~/.pgpass, not the command line)",
    )


def _db_target(text: str) -> str | Path:
    """``--db``: a PostgreSQL DSN stays a string, anything else is a SQLite path."""
    from fleet.dbbackend import is_postgres

    return text if is_postgres(text) else Path(text)


def _register_collect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    collect = sub.add_parser(
        "collect",
        help="store every device's reported state, events and telemetry (runs until stopped)",
        description=COLLECT_DESCRIPTION,
        epilog="examples:\n"
        "  edgectl fleet collect --broker mqtt://localhost:1883 --db fleet.db\n"
        "  EDGECTL_PASSWORD_FILE=/etc/edgectl/password edgectl fleet collect --broker mqtts://broker:8883 "
        "--username collector --ca-file ca.pem "
        "--db /var/lib/edgectl/fleet.db --retention 30d --prometheus 127.0.0.1:9108\n"
        "  # two of these (client ids c1, c2) share the load and one PostgreSQL database:\n"
        "  edgectl fleet collect --broker mqtt://broker:1883 --db postgresql://edge@db/fleet "
        "--share collectors --client-id c1 --ack-after-commit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _db_option(collect)
    collect.add_argument(
        "--retention",
        default="7d",
        metavar="DURATION",
        help="delete telemetry and events older than this (default 7d; e.g. 12h, 30d)",
    )
    collect.add_argument(
        "--prometheus",
        metavar="[HOST]:PORT",
        help="serve Prometheus metrics here, e.g. :9108 (all interfaces)",
    )
    collect.add_argument(
        "--client-id",
        default="edgectl-collector",
        help="MQTT client id; the broker keeps this id's session between runs (default: %(default)s). "
        "Two collectors need two ids.",
    )
    collect.add_argument(
        "--clean-session", action="store_true", help="do not keep a session at the broker between runs"
    )
    collect.add_argument(
        "--share",
        metavar="GROUP",
        help="split telemetry and events with the other collectors of GROUP (MQTT shared subscription "
        "$share/GROUP/...); each needs its own --client-id, and all write one PostgreSQL --db",
    )
    collect.add_argument(
        "--ack-after-commit",
        action="store_true",
        help="acknowledge each message to the broker only once it is committed, so a killed collector "
        "loses nothing (the broker sends it again); needs the broker settings of docs/fleet.md",
    )
    collect.add_argument(
        "--retire",
        action="store_true",
        help="retire this --client-id for good without losing its share: unsubscribe, store and "
        "acknowledge what its session holds at the broker, remove the session, exit (SIGUSR1 does "
        "the same to a running collector)",
    )
    collect.add_argument(
        "--stats-every",
        type=float,
        default=60.0,
        metavar="S",
        help="print a line of counters every S seconds (default 60; 0: only at exit)",
    )
    add_broker_options(collect)
    collect.set_defaults(handler=_collect)


def _collect(args: argparse.Namespace) -> int:
    from fleet import exporter
    from fleet.collector import Collector

    retention = parse_duration(args.retention, "--retention")
    settings = broker_settings(args)
    broker = settings.broker
    if args.prometheus:
        exporter.require_prometheus_client()
        exporter.parse_listen(args.prometheus)
    topics = settings.topics()
    if not args.client_id:
        raise UsageError("--client-id must not be empty")
    collector = Collector(
        broker,
        args.db,
        topics=topics,
        client_id=args.client_id,
        persistent=not args.clean_session,
        retention_s=retention,
        share=args.share,
        ack_after_commit=args.ack_after_commit,
    )
    server = exporter.serve(collector, args.prometheus) if args.prometheus else None
    stop = threading.Event()
    retiring = threading.Event()
    if args.retire:
        retiring.set()
        stop.set()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            retiring.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    # Each message makes ~100 short-lived objects; at the default threshold (700) the cyclic
    # collector ran every few messages and took a sixth of the writer's time. This process
    # makes no long-lived cycles worth collecting that often.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    collector.start()
    where = ""
    if args.prometheus:
        host, port = exporter.parse_listen(args.prometheus)
        everywhere = host in ("0.0.0.0", "::")  # noqa: S104 - comparing, not binding
        where = f"; metrics at http://{'localhost' if everywhere else host}:{port}/metrics"
        where += " (all interfaces)" if everywhere else ""
    print(
        f"collecting from {broker.url} into {args.db} (retention {args.retention}){where}; Ctrl-C stops",
        flush=True,
    )
    try:
        if not collector.wait_connected(10) and not stop.is_set():
            print(
                f"still trying to reach the broker at {broker.url} (retrying with backoff)",
                file=sys.stderr,
                flush=True,
            )
        last = (time.monotonic(), 0)
        while not stop.wait(args.stats_every if args.stats_every > 0 else None):
            last = _print_stats(collector, last)
    finally:
        retired = collector.retire() if retiring.is_set() else None
        if retired is None:
            collector.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
    _print_stats(collector, None)
    if retired is not None:
        if not retired:
            raise UsageError(f"{args.client_id}: not retired (see above); session kept, run --retire again")
        print(f"{args.client_id}: retired; its session is removed at the broker", flush=True)
    return 0


def _print_stats(collector: Collector, last: tuple[float, int] | None) -> tuple[float, int]:
    s = collector.stats
    received = sum(s.received.values())
    now = time.monotonic()
    rate = ""
    if last is not None and now > last[0]:
        rate = f"; {(received - last[1]) / (now - last[0]):,.0f} msg/s"
    kinds = ", ".join(f"{k} {s.received[k]:,}" for k in ("telemetry", "reported", "events"))
    malformed = sum(s.malformed.values())
    stored = sum(s.stored.values())
    print(
        f"{'stopped: ' if last is None else ''}received {received:,} ({kinds}); stored {stored:,}, "
        f"{s.duplicates:,} duplicates, {malformed:,} malformed, {s.dropped:,} dropped{rate}; "
        f"queue {collector.queue_depth:,}; {'connected' if collector.connected else 'not connected'}",
        flush=True,
    )
    return now, received


def _view_rows(args: argparse.Namespace) -> tuple[list[StatusRow], dict[str, Any] | None]:
    from fleet import fleetdb
    from fleet.status import status_rows

    window = parse_duration(args.window, "--window")
    conn = fleetdb.open_for_reading(args.db)
    try:
        rows = status_rows(conn, group=args.group, bundle=args.bundle, window_s=window)
        heartbeat = fleetdb.collector_heartbeat(conn)
    finally:
        conn.close()
    if args.tag:  # rollout (issue 20): host-side tags
        from fleet.rollout.views import filter_by_tags

        rows = filter_by_tags(args.db, rows, args.tag)
    return rows, heartbeat


def _status(args: argparse.Namespace) -> int:
    from fleet.status import render_status, summary

    rows, heartbeat = _view_rows(args)
    if args.json:
        doc = {
            "generated_at": time.time(),
            "window_s": parse_duration(args.window, "--window"),
            "collector": heartbeat,
            "rows": [r.as_json() for r in rows],
        }
        print(json.dumps(doc, indent=2))
        return 0
    console = _console(args.wide)
    console.print(render_status(rows, wide=args.wide))
    console.print(summary(rows, heartbeat), style="dim", highlight=False)
    return 0


def _console(wide: bool) -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped to a file or a pager: the table's own width, not rich's 80-column guess.
        return Console(width=240 if wide else 100)
    return console


def _watch(args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from fleet.status import render_status, summary

    if args.interval <= 0:
        raise UsageError("--interval must be positive")

    def frame() -> Group:
        rows, heartbeat = _view_rows(args)
        line = f"{summary(rows, heartbeat)} · {time.strftime('%H:%M:%S')} · Ctrl-C leaves"
        from fleet.rollout.views import rollout_lines  # rollout (issue 20): active rollouts

        rollouts = [Text(r, style="bold") for r in rollout_lines(args.db)]
        return Group(render_status(rows, wide=args.wide), *rollouts, Text(line, style="dim"))

    try:
        with Live(frame(), console=_console(args.wide), auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0  # leaving is how a watch ends


def _report(args: argparse.Namespace) -> int:
    from fleet.report import build_report

    since = parse_duration(args.since, "--since")
    if args.html.is_dir():
        raise UsageError(f"--html {args.html} is a folder; name the file to write")
    if not args.html.parent.is_dir():
        raise UsageError(f"--html {args.html}: folder {args.html.parent} does not exist")
    report = build_report(
        args.db, since_s=since, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    from edgeagent.storage import atomic_writer

    with atomic_writer(args.html) as out:
        out.write(report.html.encode("utf-8"))
    print(f"wrote {args.html} ({len(report.html) / 1024:.0f} KiB): {report.devices} devices, "
          f"{report.charts} charts from {report.rows:,} telemetry intervals")  # fmt: skip
    return 0
