"""``edgectl demo``: the whole loop on one machine, with no configuration.

Starts a broker (Mosquitto when installed, else the embedded pure-Python amqtt), a registry
and an agent (a real ``edgeagent run`` process) in a temporary folder; converts the digits
model with pruning and int8; pushes the signed bundle; waits until the device reports it
active with its acceptance numbers; sends inference requests over the agent's socket and
the true labels back (online accuracy); prints what the device reported; shows the fleet
status table from the collector's database (telemetry); and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.bundle.reader import verify_bundle
from edgeagent.errors import EdgeError, UsageError
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import BundleRef, Reported, Topics
from edgeagent.signing import KeyRing, SigningKey, generate_keypair
from fleet.collector import Collector
from fleet.push import FleetConnection, Target, add_to_registry, publish_desired, wait_for
from fleet.registry import Registry
from fleet.status import render_status, status_rows

log = logging.getLogger(__name__)

DEVICE = "demo-device"
WIDE_TERMINAL = 100  # columns the fleet table's default view needs
BIN = Path(sys.executable).parent


class DemoError(EdgeError):
    """A step of the demo failed; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise DemoError(f"the broker did not listen on port {port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def embedded_broker(workdir: Path, say: Any, kind: str = "auto") -> Iterator[tuple[int, str]]:
    """Mosquitto on a free loopback port when installed (or asked for), else amqtt in this process."""
    port = _free_port()
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if kind == "mosquitto" and binary is None:
        raise UsageError("mosquitto is not installed (apt-get install mosquitto), try --broker amqtt")
    if binary and kind != "amqtt":
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        with (workdir / "mosquitto.log").open("wb") as out:
            proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_port(port, 10)
            say(f"broker: Mosquitto ({binary}) on 127.0.0.1:{port}")
            yield port, "mosquitto"
        finally:
            proc.terminate()
            proc.wait(10)
        return
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise UsageError(
            "the demo needs a broker: apt-get install mosquitto, or pip install 'edgeagent[demo]' for amqtt"
        ) from exc
    loop = asyncio.new_event_loop()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config, loop=loop)
    thread = threading.Thread(target=loop.run_forever, name="amqtt", daemon=True)
    loop.run_until_complete(broker.start())
    thread.start()
    try:
        why = "as asked" if kind == "amqtt" else "Mosquitto is not installed"
        say(f"broker: embedded amqtt ({why}) on 127.0.0.1:{port}")
        yield port, "amqtt"
    finally:
        # amqtt logs its own task cancellation at shutdown as errors; nothing is wrong.
        for name in ("amqtt", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _run(say: Any, *argv: str | Path) -> None:
    shown = " ".join(str(a) for a in argv)
    say(f"$ {shown}")
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DemoError(f"'{shown}' failed: {last}")
    for line in result.stdout.rstrip().splitlines():
        say(f"    {line}")


def run_demo(workdir: Path, *, keep: bool, broker_kind: str = "auto", say: Any = print) -> int:
    """Run the demo in ``workdir``; return 0 when the device served the pushed bundle."""
    keys = workdir / "keys"
    _, pub, _ = generate_keypair("demo", keys)
    key = SigningKey.load(keys / "demo.key")
    registry_dir = workdir / "registry"
    registry_dir.mkdir()
    model = workdir / "digits_mlp.onnx"
    with resources.as_file(resources.files("fleet") / "assets" / "digits_mlp.onnx") as packaged:
        shutil.copyfile(packaged, model)

    say("\n1. compress the digits model (50% magnitude pruning, then static int8) and package it")
    _run(
        say,
        BIN / "edgectl",
        "convert",
        model,
        "--dataset",
        "digits",
        "--prune",
        "0.5",
        "--quantize",
        "int8",
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--key",
        keys / "demo.key",
        "-o",
        workdir / "convert",
        "--quiet",
    )
    bundle = next((workdir / "convert").glob("*.bundle"), None)
    if bundle is None:
        raise DemoError("the converter wrote no bundle")
    verified = verify_bundle(bundle, KeyRing.from_paths([pub]))

    say("\n2. start a broker, the registry and a device agent")
    with contextlib.ExitStack() as stack:
        port, kind = stack.enter_context(embedded_broker(workdir, say, broker_kind))
        broker = BrokerConfig("127.0.0.1", port)
        registry = Registry(broker, registry_dir, share="registry" if kind == "mosquitto" else None)
        registry.start()
        stack.callback(registry.close)
        say(f"registry: serving {registry_dir}")
        db = workdir / "fleet.db"
        # Not a persistent session: a demo must not leave a queue behind on someone's broker.
        collector = Collector(broker, db, client_id=f"edgectl-demo-collector-{os.getpid()}", persistent=False)
        collector.start()
        stack.callback(collector.stop)
        say(f"collector: telemetry of every device into {db}")
        agent = _start_agent(workdir, port, keys, say)
        stack.callback(_stop_agent, agent)

        say("\n3. push the bundle to the device and wait for its verdict")
        add_to_registry(bundle, verified, registry_dir)
        ref = BundleRef(name="digits", version="1.0.0", sha256=verified.sha256, size=verified.size)
        topics = Topics()
        with FleetConnection(broker, topics, "edgectl-demo") as conn:
            doc = publish_desired(conn, Target("device", DEVICE), "default", ref, key)
            say(f"published the signed desired state for device:{DEVICE} (seq {doc.seq})")
            result = wait_for(conn, [DEVICE], "default", ref, 120, lambda line: say(f"    {line}"))[0]
            if not result.ok:
                raise DemoError(f"the device did not take the bundle: {result.detail}")
            say(f"{DEVICE}: {result.detail}")
            reported = _reported_after(conn, topics, ref)

        say("\n4. ask the device for predictions over its local socket")
        _predict(workdir / "agent.sock", say)

        say("\n5. what the device reports")
        if reported is not None:
            _show_reported(reported, say)

        say(f"\n6. the fleet as the collector sees it (edgectl fleet status --db {db})")
        _show_fleet(collector, say)
    say(f"\ndemo finished; everything it made is in {workdir}" if keep else "\ndemo finished")
    return 0


def _reported_after(
    conn: FleetConnection, topics: Topics, ref: BundleRef, timeout_s: float = 10
) -> Reported | None:
    """The device's retained report once it includes the deployment of ``ref``.

    The outcome event is published just before the new report, so read until it shows up.
    """
    deadline = time.monotonic() + timeout_s
    latest = None
    while time.monotonic() < deadline:
        raw = conn.retained(topics.reported(DEVICE), settle_s=0.3).get(topics.reported(DEVICE))
        if raw:
            latest = Reported.model_validate_json(raw)
            done = latest.last_deployment
            if done is not None and done.bundle.sha256 == ref.sha256:
                return latest
    return latest


def _start_agent(workdir: Path, port: int, keys: Path, say: Any) -> subprocess.Popen[bytes]:
    config = workdir / "agent.toml"
    config.write_text(
        f'device_id = "{DEVICE}"\n'
        f'state_dir = "{workdir / "device"}"\n'
        f'socket_path = "{workdir / "agent.sock"}"\n'
        f'broker_url = "mqtt://127.0.0.1:{port}"\n'
        f'trusted_keys = "{keys}"\n'
        # Faster than the 10 s default so the demo's fleet table fills within a second or two.
        "telemetry_interval_s = 1.0\n"
    )
    with (workdir / "agent.log").open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "edgeagent"), "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    say(f"agent: edgeagent run --config {config} (log: {workdir / 'agent.log'})")
    return proc


def _stop_agent(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _predict(sock: Path, say: Any) -> None:
    from converter.datasets import flat, load_digits_splits
    from edgeagent.client import Client

    data = load_digits_splits()
    x, y = flat(data.x_test[:20]), data.y_test[:20]
    right = 0
    latencies = []
    with Client(sock) as client:
        for i in range(len(x)):
            pred = client.predict(x[i : i + 1])
            right += int(np.argmax(pred.output) == y[i])
            latencies.append(pred.latency_ms)
            # The application learns the true label later and reports it: online accuracy.
            client.feedback(pred.id, int(y[i]))
    say(
        f"20 test digits: {right}/20 correct, served by {pred.model} {pred.version} on "
        f"{pred.runtime}/{pred.delegate}, server time p50 {float(np.median(latencies)):.3f} ms"
    )
    say("sent the 20 true labels back (POST /v1/feedback) for online accuracy")


def _show_fleet(collector: Collector, say: Any, timeout_s: float = 15.0) -> None:
    """Wait until the device's telemetry covers the demo's requests, then print the table."""
    from rich.console import Console

    deadline = time.monotonic() + timeout_s
    rows = []
    while time.monotonic() < deadline:
        collector.flush()
        rows = status_rows(collector.db)
        if any(r.device == DEVICE and r.requests >= 20 and r.online_accuracy is not None for r in rows):
            break
        time.sleep(0.3)
    else:
        say("(no telemetry with the demo's requests arrived in time; the table shows what did)")
    console = Console()
    # The table needs 100 columns (squeezed into 80 it is unreadable); the lines below say the
    # same in words either way.
    if say is print and console.is_terminal and console.width >= WIDE_TERMINAL:
        console.print(render_status(rows))
    for r in rows:
        say(
            f"{r.device}: {r.requests} requests, p50 {r.p50_ms or 0:.3f} ms, p99 {r.p99_ms or 0:.3f} ms, "
            f"RSS {r.rss_mb} MB, online accuracy {r.online_accuracy}"
        )


def _show_reported(reported: Reported, say: Any) -> None:
    model = reported.models.get("default")
    state = "online" if reported.online else "offline"
    say(f"device {reported.device}: {state}, profile {reported.profile}, agent {reported.agent_version}")
    if model and model.bundle:
        say(
            f"  default: {model.bundle.name} {model.bundle.version} ({model.bundle.sha256[:12]}) on "
            f"{model.runtime}/{model.delegate}"
        )
        verdict = model.acceptance
        for check in verdict.checks if verdict is not None else []:
            if check.value is not None:
                say(f"  acceptance {check.name}: {check.value:.4g} (bound {check.op} {check.bound:.4g})")
        if verdict is not None:
            say(
                f"  acceptance latency p50 {verdict.latency.p50_ms:.3f} ms, "
                f"p95 {verdict.latency.p95_ms:.3f} ms"
            )
    if reported.last_deployment:
        outcome = reported.last_deployment
        say(
            f"  last deployment: {outcome.bundle.version} {'ok' if outcome.ok else 'FAILED'} ({outcome.code})"
        )
    log.debug("reported: %s", json.dumps(reported.model_dump(mode="json")))


def demo_main(keep: bool, workdir: Path | None, broker_kind: str = "auto") -> int:
    if workdir is not None:
        if workdir.exists() and not workdir.is_dir():
            raise UsageError(f"{workdir}: exists and is not a folder; the demo needs a fresh folder")
        if workdir.exists() and any(workdir.iterdir()):
            raise UsageError(f"{workdir} is not empty; the demo needs a fresh folder")
        workdir.mkdir(parents=True, exist_ok=True)
        return run_demo(workdir.resolve(), keep=True, broker_kind=broker_kind)
    tmp = Path(tempfile.mkdtemp(prefix="edgectl-demo-"))
    try:
        return run_demo(tmp, keep=keep, broker_kind=broker_kind)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
