"""``edgeagent status``: what the store and the deployment journals say, without the agent."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

EPILOG = """\
Reads the state folder only (journals, links, refs.json), so it works while the agent runs,
after it crashed, and on a mounted SD card (--state-dir).

examples:
  edgeagent status
  edgeagent status --json
  edgeagent status --state-dir /mnt/sdcard/var/lib/edgeagent
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show each model's active and previous bundle, its deployment journal and last outcome",
        description="Show each model's active and previous bundle, deployment state and last outcome.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="agent.toml whose state_dir to read")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="state folder (overrides the config)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from edgeagent.errors import UsageError

    state_dir = args.state_dir
    if state_dir is None:
        from edgeagent.config import load_config

        state_dir = load_config(args.config).state_dir
    if not state_dir.is_dir():
        raise UsageError(f"state folder {state_dir} does not exist (no agent has run with it)")
    status = read_status(state_dir)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def read_status(state_dir: Path) -> dict[str, Any]:
    """Every model's bundles, journal and last outcome, plus the store's free space (bytes)."""
    from edgeagent.deploy.device import DeviceStore
    from edgeagent.deploy.journal import JournalFile, journal_names
    from edgeagent.signing import KeyRing
    from edgeagent.store import Store

    store = DeviceStore(Store(state_dir, read_only=True), KeyRing(), allow_unsigned=True, keep_bundles=1)
    names = sorted(set(store.store.model_names()) | set(journal_names(store.store.journal_dir)))
    models = {}
    for name in names:
        journal = JournalFile(store.store.journal_dir, name).load()
        models[name] = {
            "active": _bundle(store, store.current(name)),
            "previous": _bundle(store, store.previous(name)),
            "journal": json.loads(journal.to_json()),
            "last_outcome": _outcome(journal),
        }
    return {"state_dir": str(state_dir), "free_bytes": store.free_bytes(), "models": models}


def _bundle(store: Any, sha: str | None) -> dict[str, Any] | None:
    if sha is None:
        return None
    ref = store.refs.get(sha)
    version = ref.version if ref else store.version_of(sha)
    return {"sha256": sha, "name": ref.name if ref else None, "version": version}


def _outcome(journal: Any) -> dict[str, Any] | None:
    if journal.target is None or journal.state.value != "idle":
        return None
    ok = not journal.code
    return {
        "ok": ok,
        "code": "committed" if ok else journal.code,
        "reason": journal.reason,
        "version": journal.target.version,
        "at": journal.updated,
    }


def format_status(status: dict[str, Any]) -> str:
    lines = [f"state folder {status['state_dir']}: {status['free_bytes'] / 2**20:.0f} MiB free"]
    if not status["models"]:
        lines.append("no model installed")
    for name, m in status["models"].items():
        j = m["journal"]
        lines.append(f"{name}:")
        lines.append(f"  active    {_describe(m['active'])}")
        lines.append(f"  previous  {_describe(m['previous'])}")
        target = (j.get("target") or {}).get("version", "-")
        state = f"  journal   {j['state']} (target {target}, attempts {j['attempts']}"
        if j["retry_at"] > time.time():
            state += f", retry in {j['retry_at'] - time.time():.0f} s"
        lines.append(state + ")")
        out = m["last_outcome"]
        if out is not None:
            word = "ok" if out["ok"] else "FAILED"
            lines.append(f"  last      {word} {out['code']} {out['version']} {out['reason']}".rstrip())
        for failed in j["failed"]:
            lines.append(f"  not retried: {failed['sha256'][:12]} from {failed['source']} ({failed['code']})")
    return "\n".join(lines)


def _describe(bundle: dict[str, Any] | None) -> str:
    if bundle is None:
        return "none"
    return f"{bundle['name'] or '?'} {bundle['version'] or '?'} ({bundle['sha256'][:12]})"
