"""The fleet status table: one row per device and model, read from the collector's database.

Latency percentiles are not averaged: each row merges the latency histograms of the
device's telemetry over a window (default the last 5 minutes *of that device's telemetry*,
so an offline device still shows what it last measured) and reads p50/p95/p99 from the
merge, within the histogram's 1% relative error. Only intervals of the row's current
(version, runtime, delegate) are merged, so a rollout never mixes two versions in one row.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.histogram import Histogram
from fleet import fleetdb

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_WINDOW_S = 300.0


@dataclass(frozen=True)
class StatusRow:
    """One device x model. Times are Unix seconds; ms are milliseconds; MB are MiB; ratios 0-1."""

    device: str
    online: bool | None
    last_seen: float | None
    groups: list[str] = field(default_factory=list)
    profile: str | None = None
    model: str | None = None
    bundle: str | None = None
    version: str | None = None
    runtime: str | None = None
    delegate: str | None = None
    state: str | None = None
    requests: int = 0  # in the window
    errors: int = 0
    rps: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    rss_mb: float | None = None
    cpu_percent: float | None = None  # the agent process, % of one core
    system_cpu_percent: float | None = None
    mem_available_mb: float | None = None
    temperature_c: float | None = None  # the hottest zone
    temperature_zone: str | None = None
    throttled: bool | None = None
    power_mode: str | None = None  # Jetson nvpmodel: its name ("15W"), or "mode N" when unnamed
    acceptance_passed: bool | None = None
    acceptance_accuracy: float | None = None
    online_accuracy: float | None = None
    drift: float | None = None
    last_deployment: str | None = None  # "committed 1.1.0" or "failed acceptance_failed 1.2.0"
    last_deployment_ok: bool | None = None
    telemetry_at: float | None = None  # end of the newest telemetry interval (device clock)

    @property
    def runtime_label(self) -> str | None:
        """``runtime/delegate``, with a Jetson's power mode after it (``@15W``): the same model is
        several times slower in a 7 W mode than in MAXN."""
        if not self.runtime:
            return None
        return f"{self.runtime}/{self.delegate}" + (f" @{self.power_mode}" if self.power_mode else "")

    def as_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def status_rows(
    db: Path | sqlite3.Connection,
    *,
    group: str | None = None,
    bundle: str | None = None,
    window_s: float = DEFAULT_WINDOW_S,
) -> list[StatusRow]:
    """Rows for every device (filtered by group and ``NAME`` or ``NAME@VERSION`` of the bundle)."""
    conn = fleetdb.open_for_reading(db) if isinstance(db, Path) else db
    try:
        conn.row_factory = sqlite3.Row
        rows: list[StatusRow] = []
        for device in conn.execute("SELECT * FROM devices ORDER BY device"):
            groups = fleetdb.loads(device["groups"], [])
            if group is not None and group not in groups:
                continue
            rows.extend(_device_rows(conn, device, groups, window_s))
    finally:
        if isinstance(db, Path):
            conn.close()
    if bundle is not None:
        name, _, version = bundle.partition("@")
        rows = [r for r in rows if r.bundle == name and (not version or r.version == version)]
    return rows


def _device_rows(
    conn: sqlite3.Connection, device: sqlite3.Row, groups: list[str], window_s: float
) -> list[StatusRow]:
    name = device["device"]
    latest = conn.execute(
        "SELECT * FROM telemetry WHERE device = ? ORDER BY seq DESC LIMIT 1", (name,)
    ).fetchone()
    reported_models: dict[str, Any] = fleetdb.loads(device["models"], {})
    acceptance: dict[str, Any] = fleetdb.loads(latest["acceptance"], {}) if latest else {}
    windows = _model_windows(conn, name, latest["at"] - window_s if latest else None)
    outcomes = _last_outcomes(conn, name, fleetdb.loads(device["last_deployment"]))
    base: dict[str, Any] = {
        "device": name,
        "online": None if device["online"] is None else bool(device["online"]),
        "last_seen": device["last_seen"],
        "groups": groups,
        "profile": device["profile"],
    }
    if latest is not None:
        temps: dict[str, float] = fleetdb.loads(latest["temperatures"], {})
        hottest = max(temps, key=lambda z: temps[z]) if temps else None
        base |= {
            "rss_mb": latest["rss_mb"],
            "cpu_percent": latest["cpu_percent"],
            "system_cpu_percent": latest["sys_cpu_percent"],
            "mem_available_mb": latest["mem_available_mb"],
            "temperature_c": temps[hottest] if hottest else None,
            "temperature_zone": hottest,
            "throttled": None if latest["throttled"] is None else bool(latest["throttled"]),
            "power_mode": _power_mode(latest),
            "telemetry_at": latest["at"],
        }
    models = sorted(set(reported_models) | set(windows) | set(acceptance))
    if not models:
        return [StatusRow(**base)]
    rows = []
    for model in models:
        fields = dict(base, model=model)
        status = reported_models.get(model) or {}
        ref = status.get("bundle") or {}
        fields |= {
            "bundle": ref.get("name"),
            "version": ref.get("version"),
            "runtime": status.get("runtime"),
            "delegate": status.get("delegate"),
            "state": status.get("state"),
        }
        if model in windows:
            # What answered in the newest interval (the percentiles are its) wins over what the
            # reported state says, which lags an activation by a message.
            fields |= windows[model]
        fields |= _acceptance(acceptance.get(model), status.get("acceptance"))
        if model in outcomes:
            fields["last_deployment"], fields["last_deployment_ok"] = outcomes[model]
        rows.append(StatusRow(**fields))
    return rows


def _model_windows(conn: sqlite3.Connection, device: str, since: float | None) -> dict[str, dict[str, Any]]:
    """Per model: the window's figures for the (version, runtime, delegate) of its newest interval."""
    if since is None:
        return {}
    found: dict[str, dict[str, Any]] = {}
    keys: dict[str, tuple[str, str, str]] = {}
    hists: dict[str, Histogram] = {}
    rows = conn.execute(
        "SELECT * FROM model_telemetry WHERE device = ? AND at >= ? ORDER BY at DESC, seq DESC",
        (device, since),
    ).fetchall()
    for row in rows:  # newest first: the first row of a model fixes its key
        model = row["model"]
        key = (row["version"], row["runtime"], row["delegate"])
        if keys.setdefault(model, key) != key:
            continue
        agg = found.setdefault(
            model,
            {
                "version": key[0],
                "runtime": key[1],
                "delegate": key[2],
                "requests": 0,
                "errors": 0,
                "interval_s": 0.0,
                "online_accuracy": row["online_accuracy"],
                "drift": row["drift"],
            },
        )
        agg["requests"] += row["count"]
        agg["errors"] += row["client_errors"] + row["server_errors"]
        agg["interval_s"] += row["interval_s"]
        if row["latency_hist"]:
            hist = Histogram.from_dict(fleetdb.loads(row["latency_hist"]))
            if model in hists:
                hists[model].merge(hist)
            else:
                hists[model] = hist
    for model, agg in found.items():
        interval = agg.pop("interval_s")
        agg["rps"] = agg["requests"] / interval if interval else None
        merged = hists.get(model)
        if merged is not None and merged.count:
            agg["p50_ms"], agg["p95_ms"], agg["p99_ms"] = (
                q * 1000 for q in merged.quantiles((0.5, 0.95, 0.99))
            )
    return found


def _acceptance(from_telemetry: dict[str, Any] | None, reported: dict[str, Any] | None) -> dict[str, Any]:
    """Passed and accuracy of a model's acceptance: the newest telemetry's, else the reported verdict's."""
    from pydantic import ValidationError

    from edgeagent.protocol import AcceptanceSummary, Verdict

    summary: AcceptanceSummary | None = None
    try:
        if from_telemetry:
            summary = AcceptanceSummary.model_validate(from_telemetry)
        elif reported:
            verdict = Verdict.model_validate(reported)
            summary = AcceptanceSummary.of(
                verdict, version="", runtime=verdict.runtime, delegate=verdict.delegate
            )
    except ValidationError:  # a row written by an older or newer agent: show nothing, not a crash
        return {}
    if summary is None:
        return {}
    return {"acceptance_passed": summary.passed, "acceptance_accuracy": summary.accuracy}


def _last_outcomes(
    conn: sqlite3.Connection, device: str, last_deployment: dict[str, Any] | None
) -> dict[str, tuple[str, bool]]:
    """Model -> (text, ok) of its newest deployment outcome (events first, then the reported state)."""
    outcomes: dict[str, tuple[str, bool]] = {}
    for row in conn.execute(
        "SELECT model, ok, code, version FROM events WHERE device = ? AND kind = 'outcome' ORDER BY at DESC",
        (device,),
    ):
        model = row["model"] or "default"
        if model not in outcomes:
            outcomes[model] = _outcome_text(bool(row["ok"]), row["code"], row["version"])
    if last_deployment and last_deployment.get("model") not in outcomes:
        ok = bool(last_deployment.get("ok"))
        version = (last_deployment.get("bundle") or {}).get("version")
        outcomes[last_deployment["model"]] = _outcome_text(ok, last_deployment.get("code"), version)
    return outcomes


def _outcome_text(ok: bool, code: str | None, version: str | None) -> tuple[str, bool]:
    if ok:
        return f"committed {version or ''}".strip(), True
    return f"failed {code or 'error'} {version or ''}".strip(), False


# --- rendering --------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """'4s', '3m', '2h', '5d' ('-' when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _power_mode(latest: sqlite3.Row) -> str | None:
    # sqlite3.Row: `in` would search the values, not the column names.
    if "power_mode" not in latest.keys():  # noqa: SIM118 - a schema 1 database, not yet migrated
        return None
    mode: dict[str, Any] = fleetdb.loads(latest["power_mode"], {})
    if not mode:
        return None
    return str(mode.get("name") or f"mode {mode.get('id')}")


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


#: Columns of the default view and their widest cell (longer text ends in '…'), chosen so the
#: table fits 100 terminal columns: online and seen share a cell, a throttled temperature is
#: marked '!', acceptance is 'ok'/'FAIL'. ``wide`` shows every column in full.
NARROW = {
    "device": 16, "model": 8, "online": 7, "bundle": 14, "runtime/delegate": 14,
    "p95 ms": 6, "RSS MB": 4, "temp °C": 5, "acceptance": 10,
}  # fmt: skip
_NARROW_HEADERS = {"runtime/delegate": "runtime", "RSS MB": "RSS", "temp °C": "°C"}
WIDE = (
    "device", "model", "online", "seen", "bundle", "runtime/delegate", "req/s", "p50/p95/p99 ms",
    "RSS MB", "CPU %", "temp °C", "acceptance", "online acc", "last deployment",
)  # fmt: skip
_RIGHT = {"seen", "req/s", "p95 ms", "p50/p95/p99 ms", "RSS MB", "CPU %", "temp °C", "online acc"}


def render_status(
    rows: list[StatusRow], *, title: str | None = None, now: float | None = None, wide: bool = False
) -> Table:
    """A rich Table of the rows (print it with ``rich.console.Console().print``).

    The default columns fit 100 terminal columns (see :data:`NARROW`); ``wide`` adds req/s,
    p50/p99, CPU, online accuracy and the last deployment.
    """
    from rich.table import Table

    now = time.time() if now is None else now
    columns = WIDE if wide else tuple(NARROW)
    table = Table(title=title, title_justify="left", header_style="bold", pad_edge=False, box=None)
    for name in columns:
        table.add_column(
            name if wide else _NARROW_HEADERS.get(name, name),
            justify="right" if name in _RIGHT else "left",
            no_wrap=not wide,
            overflow="ellipsis",
            max_width=None if wide else NARROW[name],
        )
    for r in rows:
        cells = _cells(r, now, wide)
        table.add_row(*(cells[name] for name in columns))
    return table


def _cells(r: StatusRow, now: float, wide: bool) -> dict[str, str]:
    seen = age(None if r.last_seen is None else now - r.last_seen)
    online = "-" if r.online is None else ("[green]yes[/]" if r.online else "[red]no[/]")
    if not wide:
        online = f"{online} {seen}"
    percentiles = "-" if r.p50_ms is None else f"{r.p50_ms:.2f}/{r.p95_ms:.2f}/{r.p99_ms:.2f}"
    temp = _num(r.temperature_c)
    if r.throttled:
        temp = f"[red]{temp} throttled[/]" if wide else f"[red]{temp}![/]"
    if r.acceptance_passed is None:
        acceptance = "-"
    else:
        passed, failed = ("passed", "FAILED") if wide else ("ok", "FAIL")
        mark = f"[green]{passed}[/]" if r.acceptance_passed else f"[red]{failed}[/]"
        acceptance = f"{mark} {_num(r.acceptance_accuracy, '.2f')}" if r.acceptance_accuracy else mark
    deployment = r.last_deployment or "-"
    if r.last_deployment_ok is False:
        deployment = f"[red]{deployment}[/]"
    return {
        "device": r.device,
        "model": r.model or "-",
        "online": online,
        "seen": seen,
        "bundle": f"{r.bundle or '?'} {r.version}" if r.version else (r.bundle or "-"),
        "runtime/delegate": r.runtime_label or "-",
        "req/s": _num(r.rps),
        "p95 ms": _num(r.p95_ms, ".2f"),
        "p50/p95/p99 ms": percentiles,
        "RSS MB": _num(r.rss_mb, ".0f"),
        "CPU %": _num(r.cpu_percent),
        "temp °C": temp,
        "acceptance": acceptance,
        "online acc": _num(r.online_accuracy, ".2f"),
        "last deployment": deployment,
    }


def summary(rows: list[StatusRow], heartbeat: dict[str, Any] | None, now: float | None = None) -> str:
    """One line under the table: devices, online, and whether the collector is writing."""
    now = time.time() if now is None else now
    devices = {r.device for r in rows}
    online = {r.device for r in rows if r.online}
    text = f"{len(devices)} device{'' if len(devices) == 1 else 's'}, {len(online)} online"
    if heartbeat is None:
        return text + "; no collector has written to this database yet"
    wrote = age(now - float(heartbeat.get("at", 0)))
    if heartbeat.get("stopped"):
        return text + f"; the collector stopped {wrote} ago (data may be stale)"
    return text + f"; collector heartbeat {wrote} ago"
