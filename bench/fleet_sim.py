"""Fleet simulator: a 1 MB bundle rolled out to N simulated devices on one machine.

    .venv/bin/python bench/fleet_sim.py --sizes 100,300,1000 --scenarios complete,fail5,slow30

One real Mosquitto, the registry (``edgectl registry serve``) and the collector (``edgectl fleet
collect``) as processes of their own (their CPU time is measured), the simulated devices in a
few worker processes (bench/fleet_sim_device.py: the agent's MQTT session, desired tracker,
block transfer, bundle verification and acceptance), and the rollout controller in this
process. Per run it prints and returns: time to all committed (or to the abort), broker bytes
($SYS), registry and collector CPU seconds, collector lag (device event time to stored), and
the bandwidth bound measured in the same run: N x bundle size at the throughput of one raw
publisher pushing the bundle through the broker to one subscriber.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_sim_device import DeviceSpec, WorkerConfig, worker_main

from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, Topics
from edgeagent.signing import SigningKey, generate_keypair
from fleet.rollout import create as creating
from fleet.rollout.controller import Controller
from fleet.rollout.model import DeviceState, Gates, Pacing, RolloutSpec, RolloutState, Target
from fleet.rollout.publisher import Publisher, connect
from fleet.rollout.store import RolloutStore, open_db

BIN = Path(sys.executable).parent
PREFIX = "sim"
GROUP = "simfleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_bundle(out: Path, key: SigningKey, version: str, seed: int) -> tuple[Path, BundleRef]:
    """A ~1 MB bundle: an MLP whose first layer holds 1 MB of fp32 weights, golden set and gate."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeagent.bundle import AcceptanceGate
    from edgeagent.bundle.create import create_bundle

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.05, (256, 1000)).astype(np.float32)
    w2 = rng.normal(0, 0.05, (1000, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "sim", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    work = out / f"src-{version}"
    work.mkdir(parents=True)
    onnx.save(model, work / "sim.onnx")
    x = rng.normal(0, 1, (32, 256)).astype(np.float32)
    y = np.maximum(x @ w1, 0) @ w2
    np.savez(work / "golden.npz", **{"input.x": x, "output.y": y, "labels": y.argmax(1)})
    created = create_bundle(name="simnet", version=version, models=[work / "sim.onnx"], key=key, out_dir=out,
                            golden=work / "golden.npz", gate=AcceptanceGate(min_top1_agreement=0.95))  # fmt: skip
    ref = BundleRef(name="simnet", version=version, sha256=created.sha256, size=created.path.stat().st_size)
    return created.path, ref


class Processes:
    """Mosquitto, the registry and the collector, stopped in reverse order."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def broker(self) -> None:
        conf = self.work / "mosquitto.conf"
        user = f"user {os.environ.get('USER', 'root')}\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}"
                        "max_inflight_messages 0\nmax_queued_messages 100000\nsys_interval 1\n")  # fmt: skip
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.start([binary, "-c", str(conf)], "mosquitto")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BrokerBytes:
    """$SYS/broker/bytes/{sent,received} (Mosquitto publishes them every sys_interval)."""

    def __init__(self, broker: BrokerConfig) -> None:
        self.values: dict[str, int] = {}
        self.session = MqttSession(broker, f"sys-{os.getpid()}")
        for leaf in ("sent", "received"):
            self.session.subscribe(f"$SYS/broker/bytes/{leaf}", self._on)
        self.session.start().wait_connected(10)

    def _on(self, msg: Any) -> None:
        self.values[msg.topic.rsplit("/", 1)[1]] = int(msg.payload)

    def total(self) -> int:
        time.sleep(1.2)  # the next $SYS update
        return self.values.get("sent", 0) + self.values.get("received", 0)


def raw_throughput(broker: BrokerConfig, payload: bytes, copies: int) -> float:
    """Bytes/s of one publisher -> broker -> one subscriber, QoS 1, 64 KiB messages."""
    got = threading.Event()
    count = [0]
    want = copies * ((len(payload) + 65535) // 65536)

    def on(_msg: Any) -> None:
        count[0] += 1
        if count[0] >= want:
            got.set()

    sub = MqttSession(broker, f"raw-sub-{os.getpid()}", queue_size=100_000)
    sub.subscribe("sim-raw/t", on, inline=True, max_bytes=1 << 20)
    sub.start().wait_connected(10)
    pub = MqttSession(broker, f"raw-pub-{os.getpid()}", max_inflight=64)
    pub.start().wait_connected(10)
    chunks = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]
    started = time.monotonic()
    for _ in range(copies):
        for chunk in chunks:
            while not pub.publish("sim-raw/t", chunk):
                time.sleep(0.001)
    got.wait(120)
    seconds = time.monotonic() - started
    pub.close()
    sub.close()
    return copies * len(payload) / seconds


@dataclass
class Result:
    scenario: str
    devices: int
    state: str
    reason: str | None
    seconds: float
    committed: int
    failed: int
    rolled_back: int
    pending: int
    abort_wave: int | None
    first_bad_wave: int | None
    broker_mb: float
    registry_cpu_s: float
    collector_cpu_s: float
    collector_lag_p99_s: float | None
    bound_s: float
    raw_mb_s: float
    detect_s: float | None  # abort decided this long after the evidence was stored
    devices_cpu_s: float = 0.0  # the simulated devices' worker processes, all together
    broker_cpu_s: float = 0.0


SCENARIOS: dict[str, dict[str, float]] = {
    "oneshot": {"oneshot": 1},  # one wave, no soak: delivery speed against the bandwidth bound
    "complete": {},
    "fail5": {"fail": 0.05},
    "slow30": {"slow": 1 / 3},
    "offline": {"offline": 0.1},
    "accuracy": {"regress": 1},  # every device: online accuracy 0.95 -> 0.80 on the new version
    "rss": {"regress": 1},  # agent RSS 80 -> 130 MB
    "throttle": {"regress": 1},  # the boards start throttling
}


def device_specs(n: int, scenario: str, seed: int = 7) -> list[DeviceSpec]:
    inject = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        slow = i % 3 == 1 and "slow" in inject  # one device class of three (profile sim-b)
        fail = "fail" in inject and i > 0 and rng.random() < inject["fail"]  # never the canary
        offline = "offline" in inject and rng.random() < inject["offline"]
        regress = scenario if "regress" in inject else ""
        profile = "sim-b" if i % 3 == 1 else "sim-a"
        specs.append(DeviceSpec(f"sim{i:05d}", profile, fail, slow, offline, regress))
    return specs


def run_one(scenario: str, n: int, workers: int, telemetry_s: float, keep: bool) -> Result:
    work = Path(tempfile.mkdtemp(prefix=f"fleetsim-{scenario}-{n}-"))
    _, _, _ = generate_keypair("release", work / "keys")
    key = SigningKey.load(work / "keys" / "release.key")
    registry = work / "registry"
    registry.mkdir()
    v1_path, v1 = make_bundle(registry, key, "1.0.0", 1)
    v2_path, v2 = make_bundle(registry, key, "1.1.0", 2)
    procs = Processes(work)
    procs.broker()
    url = f"mqtt://127.0.0.1:{procs.port}"
    broker = BrokerConfig("127.0.0.1", procs.port)
    db_path = work / "fleet.db"
    reg = procs.start([str(BIN / "edgectl"), "registry", "serve", "--dir", str(registry), "--broker", url,
                       "--prefix", PREFIX], "registry")  # fmt: skip
    col = procs.start([str(BIN / "edgectl"), "fleet", "collect", "--broker", url, "--db", str(db_path),
                       "--prefix", PREFIX, "--clean-session", "--stats-every", "0"], "collector")  # fmt: skip
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Queue()
    specs = device_specs(n, scenario)
    children = []
    try:
        for w in range(workers):
            cfg = WorkerConfig((broker.host, broker.port), PREFIX, GROUP, str(work / "keys"), str(work / "devices"),
                               (str(v1_path), v1.model_dump_json()), telemetry_s, tuple(specs[w::workers]))  # fmt: skip
            child = ctx.Process(target=worker_main, args=(cfg, v2.sha256, ready, stop), daemon=True)
            child.start()
            children.append(child)
        for _ in children:
            ready.get(timeout=300)
        wait_devices(db_path, n)
        time.sleep(2.5 * telemetry_s)  # baseline telemetry of 1.0.0
        raw = raw_throughput(broker, v2_path.read_bytes(), 20)
        bytes0, reg0, col0 = BrokerBytes(broker), cpu_seconds(reg.pid), cpu_seconds(col.pid)
        b0 = bytes0.total()
        dev0 = sum(cpu_seconds(c.pid or 0) for c in children)
        mosq0 = cpu_seconds(procs.procs[0].pid)
        result = roll_out(db_path, broker, key, v2, n, scenario, specs, telemetry_s)
        result.devices_cpu_s = sum(cpu_seconds(c.pid or 0) for c in children) - dev0
        result.broker_cpu_s = cpu_seconds(procs.procs[0].pid) - mosq0
        result.broker_mb = (bytes0.total() - b0) / 1e6
        result.registry_cpu_s = cpu_seconds(reg.pid) - reg0
        result.collector_cpu_s = cpu_seconds(col.pid) - col0
        result.raw_mb_s = raw / 1e6
        result.bound_s = n * v2.size / raw
        result.collector_lag_p99_s = collector_lag(db_path)
        bytes0.session.close()
        return result
    finally:
        stop.set()
        for child in children:
            child.join(20)
            if child.is_alive():
                child.kill()
        procs.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def wait_devices(db_path: Path, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as conn:
                    found = conn.execute("SELECT count(*) FROM devices WHERE online = 1").fetchone()[0]
                if found >= n:
                    return
            except sqlite3.Error:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"only some of {n} devices reported within {timeout_s} s")


def roll_out(db_path: Path, broker: BrokerConfig, key: SigningKey, ref: BundleRef, n: int, scenario: str,
             specs: list[DeviceSpec], telemetry_s: float) -> Result:  # fmt: skip
    db = open_db(db_path)
    gates = Gates(max_p99_ratio=1.15, min_requests=200, max_failure_ratio=0.2, max_throttled_ratio=0.2)
    oneshot = "oneshot" in SCENARIOS[scenario]
    spec = RolloutSpec(bundle=ref, target=Target(group=GROUP),
                       waves=["100%"] if oneshot else ["1", "5%", "25%", "100%"],
                       soak_s=0 if oneshot else 2 * telemetry_s, gates=gates,
                       pacing=Pacing(max_in_flight=200, max_start_per_s=200, device_timeout_s=120))  # fmt: skip
    rid = creating.create(db, spec, time.time(), f"{scenario}-{n}")
    store = RolloutStore(db)
    conn, floors = connect(broker, Topics(PREFIX))
    started = time.monotonic()
    try:
        ctl = Controller(store, rid, Publisher(conn, key, "default", floors), time.time, owner="fleet_sim")
        state = ctl.run(poll_s=0.5, say=lambda line: print(f"  {line}", flush=True))
    finally:
        conn.__exit__(None, None, None)
    seconds = time.monotonic() - started
    row = store.get(rid)
    devices = store.devices(rid)
    counts = store.counts(rid)
    bad_waves = [d.wave for d in devices if specs[d.position].fail]
    return Result(
        scenario=scenario, devices=n, state=state.value, reason=row.reason, seconds=seconds,
        committed=counts.get(DeviceState.COMMITTED, 0), failed=counts.get(DeviceState.FAILED, 0),
        rolled_back=counts.get(DeviceState.ROLLED_BACK, 0), pending=counts.get(DeviceState.PENDING, 0),
        abort_wave=row.wave + 1 if state is RolloutState.ABORTED else None,
        first_bad_wave=min(bad_waves) + 1 if bad_waves else None,
        broker_mb=0.0, registry_cpu_s=0.0, collector_cpu_s=0.0, collector_lag_p99_s=None, bound_s=0.0,
        raw_mb_s=0.0, detect_s=detect_delay(db, rid) if state is RolloutState.ABORTED else None,
    )  # fmt: skip


def detect_delay(db: Any, rid: str) -> float | None:
    """Seconds from the first stored evidence (the collector's received time of the first failed
    outcome, or of the slow class's first telemetry of the new version) to the abort decision."""
    row = RolloutStore(db).get(rid)
    aborted_at = row.figures.get("aborted_at")
    version = row.spec.bundle.version
    failed = db.rows("SELECT min(received) FROM events WHERE kind = 'outcome' AND ok = 0 AND version = ?",
                     (version,))[0][0]  # fmt: skip
    slow = db.rows("SELECT min(m.received) FROM model_telemetry m JOIN devices d ON d.device = m.device "
                   "WHERE m.version = ? AND d.profile = 'sim-b'", (version,))[0][0]  # fmt: skip
    evidence = failed if failed is not None else slow
    return None if aborted_at is None or evidence is None else float(aborted_at - evidence)


def collector_lag(db_path: Path) -> float | None:
    with sqlite3.connect(db_path) as conn:
        lags = [r[0] for r in conn.execute("SELECT received - at FROM events WHERE kind = 'outcome'")]
    return float(np.percentile(lags, 99)) if lags else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--scenarios", default="complete")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--telemetry", type=float, default=2.0, help="device telemetry interval, s")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()
    results = []
    for scenario in args.scenarios.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"{scenario} x {n} devices", flush=True)
            result = run_one(scenario, n, args.workers, args.telemetry, args.keep)
            print(json.dumps(asdict(result)), flush=True)
            results.append(asdict(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
