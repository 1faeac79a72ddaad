"""Block transfer vs one raw publish, through a local Mosquitto started by this script.

    .venv/bin/python bench/transfer.py [--size-mb 20] [--quick] [--delivery]

Prints one table: throughput of the registry -> device block transfer for each block size
and window, next to the same bytes sent as one raw QoS-1 publish/subscribe measured in the
same run, and the ratio. The broker runs with Mosquitto's default limits (max_inflight_messages
20, max_queued_messages 1000) so the numbers are what a stock install gives.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, Topics
from edgeagent.transfer import BlockDownloader, TransferConfig, Wanted

KiB = 1024
MiB = 1024 * KiB


def start_broker(workdir: Path, extra_conf: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """A Mosquitto on a free loopback port; ``extra_conf``: more mosquitto.conf lines."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra_conf}")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def raw_publish(port: int, data: bytes) -> float:
    """Seconds from publish to full receipt of one QoS-1 message carrying ``data``."""
    got = threading.Event()
    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub")
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = lambda c, u, m: got.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("bench/raw", qos=1)
    subscribed.wait(5)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    start = time.perf_counter()
    pub.publish("bench/raw", data, qos=1)
    if not got.wait(120):
        raise RuntimeError("raw publish never arrived")
    elapsed = time.perf_counter() - start
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return elapsed


def start_registry(port: int, folder: Path, prefix: str) -> subprocess.Popen[bytes]:
    """The registry in its own process, as in production (and off this process's GIL)."""
    edgectl = Path(sys.executable).parent / "edgectl"
    proc = subprocess.Popen(
        [
            str(edgectl),
            "registry",
            "serve",
            "--dir",
            str(folder),
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--prefix",
            prefix,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "serving N bundles ..." once it is connected and subscribed
    return proc


def block_transfer(
    port: int, ref: BundleRef | Wanted, prefix: str, block: int, window: int, run: int
) -> float:
    broker = BrokerConfig("127.0.0.1", port)
    with tempfile.TemporaryDirectory() as tmp:
        session = MqttSession(broker, f"bench-dev-{block}-{window}-{time.monotonic_ns()}")
        dl = BlockDownloader(
            session, "dev", Path(tmp), topics=Topics(prefix), config=TransferConfig(block, window, run)
        )
        session.start()
        session.wait_connected(5)
        start = time.perf_counter()
        dl.fetch(ref)
        elapsed = time.perf_counter() - start
        session.close()
    return elapsed


def _big_onnx(path: Path, seed: int) -> None:
    """An MLP 64-1200-1000-10 with random weights: about 5 MB of float32."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [64, 1200, 1000, 10]
    nodes, inits = [], []
    prev = "input"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits.append(numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32) * 0.05, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def push_to_active(port: int, workdir: Path, folder: Path) -> None:
    """Seconds from `edgectl push` (publishing the desired doc) to the device reporting it active."""
    from edgeagent.bundle.create import create_bundle
    from edgeagent.signing import SigningKey, generate_keypair
    from fleet.push import FleetConnection, Target, publish_desired, wait_for

    keys = workdir / "keys"
    generate_keypair("bench", keys)
    key = SigningKey.load(keys / "bench.key")
    config = workdir / "agent.toml"
    config.write_text(
        f'device_id = "bench-dev"\nstate_dir = "{workdir / "state"}"\nsocket_path = "{workdir / "a.sock"}"\n'
        f'broker_url = "mqtt://127.0.0.1:{port}"\ntopic_prefix = "bench"\ntrusted_keys = "{keys}"\n'
        'profile = "generic-x86_64"\n'
    )
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "edgeagent"), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    times, size = [], 0
    try:
        with FleetConnection(BrokerConfig("127.0.0.1", port), Topics("bench"), "bench-push") as conn:
            for i in range(3):
                model = workdir / f"big{i}.onnx"
                _big_onnx(model, i)
                created = create_bundle(
                    name="big", version=f"1.0.{i}", models=[model], key=key, out_dir=folder
                )
                size = created.path.stat().st_size
                ref = BundleRef(name="big", version=f"1.0.{i}", sha256=created.sha256, size=size)
                start = time.perf_counter()
                publish_desired(conn, Target("device", "bench-dev"), "default", ref, key)
                result = wait_for(conn, ["bench-dev"], "default", ref, 120, lambda line: None)[0]
                times.append(time.perf_counter() - start)
                if not result.ok:
                    raise RuntimeError(result.detail)
    finally:
        agent.terminate()
        agent.wait()
    print(
        f"\npush -> active for a {size / MiB:.1f} MiB bundle (download, verify, install, acceptance, switch):"
    )
    print(f"  runs {', '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is shown")
    parser.add_argument("--quick", action="store_true", help="fewer cells (a smoke run)")
    parser.add_argument(
        "--delivery",
        action="store_true",
        help="then delivery by content vs the whole bundle, MQTT and HTTP, and HTTP vs curl (bench/delivery.py)",
    )
    args = parser.parse_args()
    size = int(args.size_mb * MiB)
    data = os.urandom(size)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = workdir / "bundles"
        folder.mkdir()
        (folder / "bench.bundle").write_bytes(data)
        ref = BundleRef(name="bench", version="1.0.0", sha256=hashlib.sha256(data).hexdigest(), size=size)
        proc, port = start_broker(workdir)
        registry = start_registry(port, folder, "bench")
        try:
            raw = statistics.median(raw_publish(port, data) for _ in range(args.repeat))
            raw_mbs = size / raw / 1e6
            print(
                f"# {size / MiB:.0f} MiB, {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
            )
            print(f"raw single QoS-1 publish: {raw:.3f} s  {raw_mbs:.1f} MB/s\n")
            print(
                f"{'block':>7} {'window':>6} {'run':>4} {'flight':>9} {'seconds':>8} {'MB/s':>7} {'vs raw':>7}"
            )
            cells = (
                [(64 * KiB, 64, 1)]
                if args.quick
                else [
                    (block, window, 1)
                    for block in (16 * KiB, 64 * KiB, 256 * KiB)
                    for window in (8, 32, 64, 128)
                ]
                + [(256 * KiB, 16, 1), (64 * KiB, 64, 4), (64 * KiB, 64, 8)]
            )
            for block, window, run in cells:
                secs = statistics.median(
                    block_transfer(port, ref, "bench", block, window, run) for _ in range(args.repeat)
                )
                mbs = size / secs / 1e6
                inflight = block * window / MiB
                print(
                    f"{block // KiB:>5}Ki {window:>6} {run:>4} {inflight:>7.1f}Mi {secs:>8.3f} {mbs:>7.1f} {mbs / raw_mbs:>7.2f}"
                )
            # Objects of a delivery index: every block checked against its sha256 on arrival.
            for block, window in ((64 * KiB, 64), (256 * KiB, 32)):
                hashes = tuple(hashlib.sha256(data[i : i + block]).hexdigest() for i in range(0, size, block))
                want = Wanted(ref.sha256, size, block, hashes, ".obj")
                secs = statistics.median(
                    block_transfer(port, want, "bench", block, window, 1) for _ in range(args.repeat)
                )
                mbs = size / secs / 1e6
                print(
                    f"{block // KiB:>5}Ki {window:>6} {1:>4} {'hashed':>9} {secs:>8.3f} {mbs:>7.1f} {mbs / raw_mbs:>7.2f}"
                )
            if not args.quick:
                push_to_active(port, workdir, folder)
        finally:
            registry.terminate()
            registry.wait()
            proc.terminate()
            proc.wait()
    if args.delivery:
        from bench import delivery

        print()
        delivery.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
