"""``edgectl rollout create|run|status|pause|resume|abort`` and ``edgectl fleet history|tag``."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from edgeagent.errors import UsageError
from fleet.hostopts import add_broker_options, broker_settings

DESCRIPTION = """\
Roll a bundle out to a group, a tag query or a list of devices in waves, paced, watched by
gates that abort and roll back on failures, acceptance failures, or model KPIs (p99 latency,
online accuracy, memory, throttling) against the version being replaced. The rollout's state
lives in the fleet database (the collector's), so `run` can be stopped and started again.
"""

EPILOG = """\
examples:
  edgectl rollout create out/digits-1.1.0.bundle --group cameras --waves 1,5%,25%,100% \\
      --soak 10m --max-p99-ratio 1.2 --key keys/release.key --registry /srv/bundles --db fleet.db
  edgectl rollout run digits-1.1.0-3fa2c1 --broker mqtt://broker:1883 --key keys/release.key --db fleet.db
  edgectl rollout status --db fleet.db            # every rollout, one line each
  edgectl rollout pause|resume|abort digits-1.1.0-3fa2c1 --db fleet.db

More: docs/fleet.md ("Rollouts").
"""


def _db_target(text: str) -> str | Path:
    """``--db``: a PostgreSQL DSN stays a string, else a path."""
    from fleet.dbbackend import is_postgres

    return text if is_postgres(text) else Path(text)


def _db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", type=_db_target, default=Path("fleet.db"), help="the fleet database (default ./fleet.db)"
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = subparsers.add_parser(
        "rollout", help="staged rollouts with gates, pause/resume/abort", description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    _register_create(sub)
    run = sub.add_parser("run", help="drive rollouts until they complete or abort (restartable)")
    run.add_argument("id", nargs="?", help="the rollout (default with --all: every active one)")
    run.add_argument("--all", action="store_true", help="drive every active rollout (the service does)")
    run.add_argument("--key", required=True, type=Path, help="private key that signs the desired docs")
    add_broker_options(run)  # --broker, TLS, credentials, --prefix: as push and collect take them
    run.add_argument("--poll", type=float, default=1.0, help="seconds between ticks (default 1)")
    run.add_argument("--lease", type=float, default=30.0, help="seconds a dead controller blocks a successor")
    run.add_argument("--json", action="store_true", help="print the final status as JSON")
    _db(run)
    run.set_defaults(handler=_run)
    status = sub.add_parser("status", help="progress of one rollout or all, with per-device detail")
    status.add_argument("id", nargs="?")
    status.add_argument("--devices", action="store_true", help="one line per device")
    status.add_argument("--json", action="store_true")
    _db(status)
    status.set_defaults(handler=_status)
    for name, text in (("pause", "start no more devices"), ("resume", "continue a paused rollout"),
                       ("abort", "stop and roll back every device the rollout updated")):  # fmt: skip
        action = sub.add_parser(name, help=text)
        action.add_argument("id")
        action.add_argument("--reason", default=None, help="recorded with the abort")
        action.add_argument("--json", action="store_true")
        _db(action)
        action.set_defaults(handler=_action, action=name)


def _register_create(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    create = sub.add_parser("create", help="plan a rollout of a bundle (run it with `rollout run`)")
    create.add_argument("bundle", type=Path, metavar="BUNDLE")
    where = create.add_mutually_exclusive_group(required=True)
    where.add_argument("--group", help="devices that report this group (or carry this host-side tag)")
    where.add_argument("--tag", help="tag query: 'a,b,!c' = tagged a and b, not c (groups count as tags)")
    where.add_argument("--devices", help="comma-separated device ids")
    create.add_argument("--key", required=True, type=Path, help="the key the bundle is signed with")
    create.add_argument("--registry", required=True, type=Path, metavar="DIR", help="the registry's folder")
    create.add_argument("--model", default="default", help="model name on the devices (default: %(default)s)")
    create.add_argument(
        "--waves", default="1,10%,100%", help="cumulative counts or percentages (default: %(default)s)"
    )
    create.add_argument("--soak", default="60s", help="watch each finished wave this long (default 60s)")
    create.add_argument("--max-in-flight", type=int, default=50, help="most devices downloading at once")
    create.add_argument("--max-start-rate", type=float, default=20.0, help="most devices started per second")
    create.add_argument("--device-timeout", default="10m", help="a device with no outcome after this failed")
    g = create.add_argument_group("gates (abort criteria; 'off' disables one)")
    g.add_argument("--max-failure-ratio", default="0.1", help="failed/finished above this (default 0.1)")
    g.add_argument("--max-acceptance-failures", default="0", help="devices failing acceptance (default 0)")
    g.add_argument("--max-p99-ratio", default="1.25", help="new/old p99 on any profile (default 1.25)")
    g.add_argument("--max-accuracy-drop", default="0.02", help="online accuracy drop, 0-1 (default 0.02)")
    g.add_argument("--max-rss-growth", default="0.5", help="RSS growth, 0.5 = +50%% (default 0.5)")
    g.add_argument("--max-throttled-ratio", default="off", help="share newly throttling (default off)")
    g.add_argument("--min-requests", type=int, default=50, help="requests per side before the p99 gate")
    create.add_argument("--id", help="name the rollout (default: NAME-VERSION-random)")
    create.add_argument("--json", action="store_true")
    _db(create)
    create.set_defaults(handler=_create)


def _bound(text: str, what: str, cast: type = float) -> Any:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return cast(text)
    except ValueError as exc:
        raise UsageError(f"{what} {text!r}: expected a number or 'off'") from exc


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _create(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgeagent.protocol import BundleRef
    from edgeagent.signing import SigningKey
    from fleet.fleet_cmd import parse_duration
    from fleet.push import add_to_registry, check_registry, verify_own_bundle
    from fleet.rollout import create as creating
    from fleet.rollout.model import Gates, Pacing, RolloutSpec, Target, parse_waves
    from fleet.rollout.store import open_db

    waves = parse_waves(args.waves)
    try:
        gates = Gates(
            max_failure_ratio=float(args.max_failure_ratio),
            max_acceptance_failures=_bound(args.max_acceptance_failures, "--max-acceptance-failures", int),
            max_p99_ratio=_bound(args.max_p99_ratio, "--max-p99-ratio"),
            max_accuracy_drop=_bound(args.max_accuracy_drop, "--max-accuracy-drop"),
            max_rss_growth=_bound(args.max_rss_growth, "--max-rss-growth"),
            max_throttled_ratio=_bound(args.max_throttled_ratio, "--max-throttled-ratio"),
            min_requests=args.min_requests,
        )
        pacing = Pacing(
            max_in_flight=args.max_in_flight, max_start_per_s=args.max_start_rate,
            device_timeout_s=parse_duration(args.device_timeout, "--device-timeout"),
        )  # fmt: skip
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
        target = Target(group=args.group, tag=args.tag, devices=devices)
    except (ValidationError, ValueError) as exc:
        raise UsageError(f"rollout create: {_first_error(exc)}") from exc
    key = SigningKey.load(args.key)
    verified = verify_own_bundle(args.bundle, key)
    check_registry(args.registry)
    m = verified.manifest
    ref = BundleRef(name=m.name, version=m.version, sha256=verified.sha256, size=verified.size)
    soak = parse_duration(args.soak, "--soak") if args.soak.strip() not in ("0", "0s") else 0.0
    spec = RolloutSpec(bundle=ref, model=args.model, target=target, waves=waves, soak_s=soak, pacing=pacing,
                       gates=gates, created_by=whoami())  # fmt: skip
    db = open_db(args.db)
    try:
        add_to_registry(args.bundle, verified, args.registry)
        rid = creating.create(db, spec, time.time(), args.id)
        return _print_status(db, rid, args.json, devices=False)
    finally:
        db.close()


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(exc)


def _run(args: argparse.Namespace) -> int:
    from edgeagent.signing import SigningKey
    from fleet.rollout.runner import drive
    from fleet.rollout.store import open_db

    if (args.id is None) == (not args.all):
        raise UsageError("rollout run: name one rollout, or --all")
    settings = broker_settings(args)
    topics = settings.topics()
    key = SigningKey.load(args.key)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    db = open_db(args.db)
    try:
        broker = settings.broker
        # With --json the progress lines go to stderr, so stdout is one JSON document.
        out = sys.stderr if args.json else sys.stdout

        def say(line: str) -> None:
            print(line, file=out, flush=True)

        states = drive(
            db, broker, topics, key, args.id, stop, args.poll, whoami(), lease_s=args.lease, say=say
        )
        if args.id is None:
            return 0
        if args.json:
            _print_status(db, args.id, True, devices=False)
        # The progress lines were printed while it ran; the status says how it ended.
        return 0 if states.get(args.id) == "completed" else 1
    finally:
        db.close()


def _status(args: argparse.Namespace) -> int:
    from fleet.rollout.store import RolloutStore, open_db

    db = open_db(args.db)
    try:
        if args.id is not None:
            return _print_status(db, args.id, args.json, devices=args.devices)
        rows = RolloutStore(db).rollouts()
        if args.json:
            print(json.dumps([_as_json(db, r.id, False) for r in rows], indent=2))
        elif not rows:
            print("no rollouts yet")
        for r in rows if not args.json else ():
            _print_status(db, r.id, False, devices=False)
        return 0
    finally:
        db.close()


def _action(args: argparse.Namespace) -> int:
    from fleet.rollout.model import RolloutState as S
    from fleet.rollout.store import RolloutStore, open_db

    moves = {
        "pause": ({S.CREATED, S.RUNNING}, S.PAUSED, None),
        "resume": ({S.PAUSED}, S.RUNNING, None),
        "abort": ({S.CREATED, S.RUNNING, S.PAUSED}, S.ABORTING, args.reason or f"aborted by {whoami()}"),
    }
    old, new, reason = moves[args.action]
    db = open_db(args.db)
    try:
        store = RolloutStore(db)
        current = store.get(args.id).state
        if not store.set_state(args.id, old, new, time.time(), reason):
            raise UsageError(f"rollout {args.id} is {current.value}: cannot {args.action} it")
        return _print_status(db, args.id, args.json, devices=False)
    finally:
        db.close()


def _as_json(db: Any, rollout_id: str, devices: bool) -> dict[str, Any]:
    from fleet.rollout.controller import progress_line
    from fleet.rollout.store import RolloutStore

    store = RolloutStore(db)
    row = store.get(rollout_id)
    out: dict[str, Any] = {
        "id": row.id, "state": row.state.value, "reason": row.reason, "wave": row.wave + 1,
        "waves": len(row.wave_ends), "wave_ends": row.wave_ends, "soak_until": row.soak_until,
        "counts": {s.value: n for s, n in store.counts(rollout_id).items()}, "figures": row.figures,
        "bundle": row.spec.bundle.model_dump(), "model": row.spec.model, "target": row.spec.target.describe(),
        "created_at": row.created_at, "created_by": row.spec.created_by, "controller": row.lease_owner,
        "progress": progress_line(store, rollout_id),
    }  # fmt: skip
    if devices:
        out["devices"] = [
            {"device": d.device, "wave": d.wave + 1, "state": d.state.value, "profile": d.profile,
             "code": d.code, "detail": d.detail, "pushed_at": d.pushed_at, "finished_at": d.finished_at}
            for d in store.devices(rollout_id)
        ]  # fmt: skip
    return out


def _print_status(db: Any, rollout_id: str, as_json: bool, *, devices: bool) -> int:
    data = _as_json(db, rollout_id, devices)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(data["progress"])
    for d in data.get("devices", []):
        line = f"  {d['device']:<24} wave {d['wave']}  {d['state']:<11} {d['code'] or ''} {d['detail'] or ''}"
        print(line.rstrip())
    return 0


# --- edgectl fleet history | tag -------------------------------------------------------------


def register_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``edgectl fleet history`` and ``edgectl fleet tag``, added to the ``fleet`` command."""
    history = sub.add_parser("history", help="who pushed what to which device, when, and the outcome")
    history.add_argument("--since", default="7d", metavar="DURATION", help="how far back (default 7d)")
    history.add_argument("--device", help="only this device")
    history.add_argument("--limit", type=int, default=200, help="newest N rows (default 200)")
    history.add_argument("--json", action="store_true")
    _db(history)
    history.set_defaults(handler=_history)
    inventory = sub.add_parser(
        "inventory", help="per device: groups, tags, profile, agent, runtimes, free disk"
    )
    inventory.add_argument("--tag", metavar="QUERY", help="only devices matching a tag query (a,b,!c)")
    inventory.add_argument("--json", action="store_true")
    _db(inventory)
    inventory.set_defaults(handler=_inventory)
    tag = sub.add_parser("tag", help="host-side tags that rollout targets can name (--tag/--group)")
    tag.add_argument("action", choices=("add", "rm", "ls"))
    tag.add_argument("devices", nargs="*", metavar="DEVICE")
    tag.add_argument("--tag", action="append", default=[], help="the tag (repeatable)")
    tag.add_argument("--json", action="store_true")
    _db(tag)
    tag.set_defaults(handler=_tag)


def _history(args: argparse.Namespace) -> int:
    from fleet.fleet_cmd import parse_duration
    from fleet.rollout.store import RolloutStore, open_db

    since = time.time() - parse_duration(args.since, "--since")
    db = open_db(args.db)
    try:
        rows = RolloutStore(db).history(since, args.device, args.limit)
    finally:
        db.close()
    keys = ("at", "who", "rollout", "device", "model", "bundle", "version", "rollback", "state", "code")
    records = [dict(zip(keys, r, strict=True)) for r in rows]
    for r in records:
        r["rollback"] = bool(r["rollback"])
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no pushes recorded in that period")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        what = f"{'rollback to ' if r['rollback'] else ''}{r['bundle']} {r['version']}"
        outcome = r["code"] or r["state"] or "-"
        who, device, rollout = r["who"], r["device"], r["rollout"] or "-"
        print(f"{when}  {who:<20} {device:<20} {r['model']:<10} {what:<28} {rollout:<22} {outcome}")
    return 0


def _tag(args: argparse.Namespace) -> int:
    from edgeagent.protocol import check_id
    from fleet.rollout.store import RolloutStore, open_db

    try:
        for name in [*args.devices, *args.tag]:
            check_id(name, "device or tag")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.action != "ls" and (not args.devices or not args.tag):
        raise UsageError(f"fleet tag {args.action}: name devices and at least one --tag")
    db = open_db(args.db)
    try:
        store = RolloutStore(db)
        if args.action != "ls":
            store.set_tags(args.devices, args.tag, remove=args.action == "rm")
        tags = {
            d: sorted(t) for d, t in sorted(store.tags().items()) if not args.devices or d in args.devices
        }
    finally:
        db.close()
    if args.json:
        print(json.dumps(tags, indent=2))
    else:
        for device, names in tags.items():
            print(f"{device}: {', '.join(names)}")
    return 0


def _inventory(args: argparse.Namespace) -> int:
    from fleet import fleetdb
    from fleet.rollout.create import Known, matches_tags
    from fleet.rollout.views import inventory

    fleetdb.open_for_reading(args.db).close()  # the same one-line refusal as the other views
    records = inventory(args.db)
    if args.tag:
        records = [
            r for r in records
            if matches_tags(args.tag, Known(r["device"], frozenset(r["groups"]), frozenset(r["tags"]),
                                            None, None))
        ]  # fmt: skip
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        models = "; ".join(
            f"{name}={m['bundle']}@{m['version']} {m['runtime']}/{m['delegate']}"
            for name, m in r["models"].items()
        )
        disk = f"{r['disk_free_mb']:.0f} MB free" if r["disk_free_mb"] is not None else "disk ?"
        state = {True: "online", False: "offline", None: "?"}[r["online"]]
        member = ",".join(r["groups"] + [f"#{t}" for t in r["tags"]]) or "-"
        print(f"{r['device']:<22} {state:<7} {r['profile'] or '?':<16} agent {r['agent_version'] or '?':<8} "
              f"{disk:<14} {member:<24} {models}")  # fmt: skip
    return 0
