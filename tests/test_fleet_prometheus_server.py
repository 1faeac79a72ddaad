"""A real Prometheus (Debian's package) scrapes the collector's exporter on loopback, and its
answers to PromQL queries agree with the fleet database: the fleet p99 per version from the
classic histograms, devices per group from the info metric, failed deployments."""

from __future__ import annotations

import bisect
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from fleet_support import (
    Publisher,
    outcome_event,
    publish_history,
    start_collector,
    subscribed,
    three_devices,
)
from fleet_support import wait_received as wait_stored

from edgeagent.histogram import Histogram
from edgeagent.protocol import Topics
from fleet import exporter, fleetdb
from fleet.state import LATENCY_BOUNDS

pytestmark = pytest.mark.mosquitto
DASHBOARD = Path(__file__).parents[1] / "fleet" / "assets" / "grafana-dashboard.json"
pytest.importorskip("prometheus_client")


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            doc = json.load(response)
        assert doc["status"] == "success", doc
        return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]

    def wait_for(self, promql: str, expected: float, timeout_s: float = 60) -> None:
        """Until ``promql`` answers ``expected`` (a scrape after the collector stored everything)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with _suppress_not_ready():
                got = self.query(promql)
                if got and got[0][1] == expected:
                    return
            assert time.monotonic() < deadline, f"{promql}: never {expected}"
            time.sleep(0.2)


class _suppress_not_ready:  # noqa: N801 - a context manager, used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, _tb: object) -> bool:
        return isinstance(exc, OSError)  # not listening yet, or restarting


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """A Prometheus scraping 127.0.0.1:<port> every second; yields it and the port to serve on."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus; .ci/run does this)")
    target, web = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: edge-fleet\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield Prometheus(web), target
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def db_p99_by_version(db: Path) -> dict[str, float]:
    """The fleet p99 per version from the database: every interval's latency sketch, merged."""
    merged: dict[str, Histogram] = {}
    conn = fleetdb.open_for_reading(db)
    try:
        for row in conn.execute("SELECT version, latency_hist FROM model_telemetry"):
            hist = Histogram.from_dict(fleetdb.loads(row["latency_hist"]))
            if row["version"] in merged:
                merged[row["version"]].merge(hist)
            else:
                merged[row["version"]] = hist
    finally:
        conn.close()
    return {version: hist.quantile(0.99) for version, hist in merged.items()}


def dashboard_queries_run(prom: Prometheus) -> None:
    """Every query of the shipped dashboard, with every group and device chosen, is valid PromQL
    and the panels that must show something do."""
    doc = json.loads(DASHBOARD.read_text())
    answers = {}
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$device", ".*")
                .replace("$group", ".*")
            )
            answers[(panel["title"], target["refId"])] = prom.query(expr)
    assert answers[("Devices online", "A")][0][1] == 3
    assert {lbl["version"] for lbl, _ in answers[("Top 10 devices by p99", "A")]} == {
        "1.0.0",
        "1.1.0",
        "2.0.0",
    }
    assert {lbl["device"] for lbl, _ in answers[("Top 10 agent memory (RSS)", "A")]} == {
        "pi-kitchen", "jetson-yard", "x86-lab"
    }  # fmt: skip


def rollout_queries_agree_with_the_database(prom: Prometheus, db: Path) -> None:
    """A rollout in the fleet database: docs/fleet.md's query names it with its gate figure, and
    the devices per state Prometheus sums are the table's."""
    from edgeagent.protocol import BundleRef
    from fleet.rollout.model import DeviceState, RolloutSpec, RolloutState, Target
    from fleet.rollout.store import RolloutStore, open_db

    store = RolloutStore(open_db(db))
    try:
        now = time.time()
        ref = BundleRef(name="digits", version="1.2.0", sha256="c" * 64, size=1000)
        devices = [(d, "rpi4", None) for d in ("pi-kitchen", "jetson-yard", "x86-lab")]
        store.create("r-canary", RolloutSpec(bundle=ref, target=Target(group="canary"), waves=["1", "100%"]),
                     devices, [1, 3], now)  # fmt: skip
        store.set_device("r-canary", "pi-kitchen", DeviceState.COMMITTED, at=now)
        store.set_device("r-canary", "jetson-yard", DeviceState.PUSHED, at=now)
        assert store.set_state("r-canary", {RolloutState.CREATED}, RolloutState.RUNNING, now)
        assert store.acquire("r-canary", "c1", now, 30)
        assert store.set_progress("r-canary", "c1", 1, None, {"p99_ratio": 1.25}, now)
        expected = {state.value: n for state, n in store.counts("r-canary").items()}
    finally:
        store.db.close()
    prom.wait_for("count(edge_rollout_state_info)", 1)
    gate = prom.query(
        "edge_rollout_p99_ratio * on (rollout) group_left (state) "
        'edge_rollout_state_info{state=~"running|aborting"}'
    )
    assert [(lbl["rollout"], lbl["state"], v) for lbl, v in gate] == [("r-canary", "running", 1.25)]
    per_state = {lbl["state"]: v for lbl, v in prom.query("sum by (state) (edge_rollout_devices)")}
    assert {k: v for k, v in per_state.items() if v} == expected


def test_promql_fleet_p99_per_version_groups_and_deployments_agree_with_the_database(
    mosquitto, tmp_path: Path, prometheus: tuple[Prometheus, int]
) -> None:  # type: ignore[no-untyped-def]
    prom, port = prometheus
    topics = Topics(f"p{uuid.uuid4().hex[:8]}")
    db = tmp_path / "fleet.db"
    collector = start_collector(mosquitto, db, topics)
    server = exporter.serve(collector, f"127.0.0.1:{port}")
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            base = sum(collector.stats.received.values())
            publish_history(pub, three_devices(), intervals=6, end=time.time())
            pub.send("events", outcome_event("pi-kitchen", "default", "digits", "1.1.0", True, "committed"))
            pub.send(
                "events", outcome_event("x86-lab", "default", "digits", "1.2.0", False, "acceptance_failed")
            )
            wait_stored(collector, base + 3 + 18 + 2)
        prom.wait_for('sum(edge_collector_stored_total{kind="telemetry"})', 18)
        prom.wait_for("sum(edge_inference_latency_seconds_count)", 24 * 200)

        answers = prom.query(
            "histogram_quantile(0.99, sum by (version, le) (edge_inference_latency_seconds_bucket))"
        )
        got = {labels["version"]: v for labels, v in answers}
        expected = db_p99_by_version(db)
        assert set(got) == set(expected) == {"1.0.0", "1.1.0", "2.0.0"}
        for version, p99 in expected.items():
            # histogram_quantile interpolates inside the classic bucket that holds the p99, so
            # its answer lies within that bucket's bounds (widened by the sketch's 1%).
            k = bisect.bisect_left(LATENCY_BOUNDS, p99)
            low, high = LATENCY_BOUNDS[k - 1] / 1.01, LATENCY_BOUNDS[k] * 1.01
            assert low <= got[version] <= high, (version, got[version], p99, low, high)

        groups = {
            lbl.get("group", ""): v for lbl, v in prom.query("count by (group) (edge_device_group_info)")
        }
        # Prometheus drops an empty label: the probe device, in no group, has none.
        assert groups == {"canary": 2, "kitchen": 1, "yard": 1, "": 1}
        failed = prom.query('sum by (version, code) (edge_deployment_outcomes_total{result="failed"})')
        conn = fleetdb.open_for_reading(db)
        try:
            rows = conn.execute(
                "SELECT version, code FROM events WHERE kind = 'outcome' AND ok = 0"
            ).fetchall()
        finally:
            conn.close()
        assert [(lbl["version"], lbl["code"], v) for lbl, v in failed] == [
            (r["version"], r["code"], 1.0) for r in rows
        ]
        canary_rss = prom.query(
            "edge_process_resident_memory_bytes"
            ' * on (device) group_left edge_device_group_info{group="canary"}'
        )
        assert {lbl["device"] for lbl, _ in canary_rss} == {"pi-kitchen", "x86-lab"}
        dashboard_queries_run(prom)
        rollout_queries_agree_with_the_database(prom, db)
    finally:
        server.shutdown()
        server.server_close()
        collector.stop()
