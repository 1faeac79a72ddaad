"""Delivery by content with the agent as a real process: it deploys from the MQTT registry and
from nginx, resumes after a kill -9 and after the server stops mid-file, and reports which
source served each file."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeagent.bundle.golden import load_golden
from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, HttpSource, MqttSource, Topics
from fleet.publish import FolderDestination, publish
from fleet.registry import Registry
from tests.delivery_support import bundle_path, make_bundle
from tests.http_support import Nginx, s3_server
from tests.test_deploy import AgentProcess, Watcher

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
PREFIX = "e2e"  # tests.test_deploy's agent and watcher use it


@dataclass
class Keys:
    keys: Path


class SlowRegistry(Registry):
    """A registry whose replies trickle (time to kill the agent mid-object)."""

    def _send(self, topic: str, data: bytes) -> None:
        time.sleep(0.3)
        super()._send(topic, data)


@pytest.fixture
def world(tmp_path: Path, mosquitto, keypair, model_dir: Path) -> Iterator[dict]:  # type: ignore[no-untyped-def,type-arg]
    registry = tmp_path / "registry"
    registry.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    ref = make_bundle(model_dir, out, keypair.load(), "1.0.0")
    www = tmp_path / "www"
    www.mkdir()
    (tmp_path / "nginx").mkdir()
    nginx = Nginx(tmp_path / "nginx", www, rate=2048).start()
    for dest in (registry, www):  # the registry's folder and the web server's root
        done = publish(bundle_path(out, ref), FolderDestination(dest), block_size=4096)
    ref = ref.model_copy(update={"index": done.index})
    name = f"dlv-{os.getpid()}-{time.monotonic_ns() % 100000}"
    keys = Keys(keypair.public.parent)
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(tmp_path / "agent", mosquitto, keys, name)
    with agent.config.open("a") as fh:
        fh.write('broker_profile = "aws-iot"\n')  # blocks of at most 64 KiB (the index's are 4 KiB)
    watcher = Watcher(mosquitto, name)
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    yield {
        "ref": ref,
        "registry": registry,
        "nginx": nginx,
        "agent": agent,
        "watcher": watcher,
        "broker": broker,
        "key": keypair.load(),
        "key_file": keypair.private,
        "golden": model_dir / "golden_mlp.npz",
        "name": name,
    }
    agent.stop()
    watcher.close()
    nginx.stop()
    s = MqttSession(broker, f"clean-{name}").start()
    s.wait_connected(5)
    for topic in (Topics(PREFIX).device_desired(name), Topics(PREFIX).reported(name)):
        s.publish(topic, b"", retain=True)
    time.sleep(0.1)
    s.close()


def _desire(world: dict, ref: BundleRef) -> None:  # type: ignore[type-arg]
    from fleet.push import FleetConnection, Target, publish_desired

    with FleetConnection(world["broker"], Topics(PREFIX), f"push-{time.monotonic_ns()}") as conn:
        publish_desired(conn, Target("device", world["name"]), "default", ref, world["key"])


def _served_by(world: dict) -> dict[str, str]:  # type: ignore[type-arg]
    event = world["watcher"].wait_event(lambda e: "served_by" in e.get("detail", {}), timeout=90)
    return event["detail"]["served_by"]


def _partial_download(state: Path, suffix: str, at_least: int = 1) -> bool:
    return any(p.stat().st_size >= at_least for p in (state / "downloads").glob(f"*{suffix}"))


def _predict_when_up(agent: AgentProcess, x):  # type: ignore[no-untyped-def]
    """The restarted agent's answer (its socket file may be the old process's for a moment)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return agent.predict(x)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _kill_when(agent: AgentProcess, ready) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready(), "the download never started"
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait()


def test_mqtt_path_deploys_and_resumes_after_kill_9(world) -> None:  # type: ignore[no-untyped-def]
    reg = SlowRegistry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    agent, watcher = world["agent"], world["watcher"]
    try:
        agent.start()
        _desire(world, world["ref"])
        objects = agent.root / "state" / "objects"
        # Killed once two objects are verified in the store and the registry is still serving.
        _kill_when(
            agent, lambda: objects.is_dir() and sum(1 for p in objects.iterdir() if p.name[0] != ".") >= 2
        )
        served_before = reg.stats.blocks_served
        agent.start()
        model = watcher.wait_active(world["ref"], timeout=120)
        served = _served_by(world)
    finally:
        reg.close()
    assert model["runtime"] == "litert"  # the int8 TFLite artifact, the only model fetched
    assert set(served.values()) <= {"mqtt", "store"}
    assert sorted(
        p.name for p in (agent.root / "state" / "bundles" / world["ref"].sha256 / "models").iterdir()
    ) == ["mlp_int8.tflite"]
    assert served_before >= 2
    assert "store" in served.values()  # what was verified before the kill was not fetched again
    # After a restart the partial bundle serves again (selection skips what was not fetched).
    agent.stop()
    agent.start()
    x = load_golden(world["golden"]).only_input[:1]
    assert _predict_when_up(agent, x).version == "1.0.0"


def test_http_path_resumes_after_kill_9_then_falls_back_when_the_server_stops(world) -> None:  # type: ignore[no-untyped-def]
    nginx: Nginx = world["nginx"]
    reg = Registry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    agent, watcher = world["agent"], world["watcher"]
    ref = world["ref"].model_copy(update={"sources": [HttpSource(url=nginx.url + "slow/"), MqttSource()]})
    state = agent.root / "state"
    try:
        agent.start()
        _desire(world, ref)
        # At least one verified 4 KiB block of an object that has more (the golden set).
        _kill_when(agent, lambda: _partial_download(state, ".hpart", at_least=4096))
        agent.start()
        # The restarted agent asks for the rest (a Range request); then the server goes away.
        deadline = time.monotonic() + 60
        while not any(" GET /slow/objects/" in s and s.startswith("206") for s in nginx.statuses()):
            assert time.monotonic() < deadline, nginx.statuses()
            time.sleep(0.05)
        nginx.stop()
        watcher.wait_active(ref, timeout=120)
        served = _served_by(world)
    finally:
        reg.close()
    assert "mqtt" in served.values()  # what nginx did not finish came from the registry


def test_edgectl_push_fills_the_index_and_sources(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from tests.test_deploy import BIN

    reg = Registry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    world["agent"].start()
    broker = f"mqtt://{world['broker'].host}:{world['broker'].port}"
    bundle = next((tmp_path / "out").glob("*.bundle"))
    key = world["key_file"]
    try:
        done = subprocess.run(
            [
                str(BIN / "edgectl"),
                "push",
                str(bundle),
                "--device",
                world["name"],
                "--key",
                str(key),
                "--broker",
                broker,
                "--prefix",
                PREFIX,
                "--registry",
                str(world["registry"]),
                "--http-source",
                world["nginx"].url,
                "--timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        served = _served_by(world)
    finally:
        reg.close()
    assert done.returncode == 0, done.stdout + done.stderr
    # The web root was published with other block hashes, so push's index is only in the
    # registry; every file it names is the same object on both, and came from nginx.
    assert served.pop("(index)") == "mqtt"
    assert set(served.values()) == {"http"}


@pytest.fixture
def s3(monkeypatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    yield from s3_server(monkeypatch)


def test_s3_path_deploys_by_presigned_urls(world, s3: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fleet.publish import S3Destination, presigned_source

    bucket = S3Destination("s3://edge/fleet", endpoint_url=s3)
    done = publish(next((tmp_path / "out").glob("*.bundle")), bucket)
    ref = world["ref"].model_copy(
        update={"index": done.index, "sources": [presigned_source(bucket, done.index.sha256, 600)]}
    )
    world["agent"].start()  # no registry at all: the bucket is the only source
    _desire(world, ref)
    world["watcher"].wait_active(ref, timeout=120)
    assert set(_served_by(world).values()) == {"presigned"}


def test_mqtt_path_resumes_when_the_registry_stops_mid_file(world) -> None:  # type: ignore[no-untyped-def]
    reg = SlowRegistry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    agent, watcher = world["agent"], world["watcher"]
    objects = agent.root / "state" / "objects"
    agent.start()
    _desire(world, world["ref"])
    deadline = time.monotonic() + 60
    while not (objects.is_dir() and sum(1 for p in objects.iterdir() if p.name[0] != ".") >= 2):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reg.close()  # mid-delivery: blocks in flight are lost
    time.sleep(2)
    reg = Registry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    try:
        watcher.wait_active(world["ref"], timeout=120)
        served = _served_by(world)
    finally:
        reg.close()
    assert "mqtt" in served.values()


def test_a_tampered_object_is_refused_and_the_previous_model_keeps_serving(
    world, tmp_path: Path, model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    from fleet.publish import build

    reg = Registry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    agent, watcher = world["agent"], world["watcher"]
    v2 = make_bundle(model_dir, tmp_path / "out", world["key"], "1.1.0")
    bundle = bundle_path(tmp_path / "out", v2)
    v2 = v2.model_copy(
        update={"index": publish(bundle, FolderDestination(world["registry"]), block_size=4096).index}
    )
    # Every file of 1.1.0 but its manifest is in the device's store after 1.0.0 (same bytes,
    # same objects): the manifest is what 1.1.0 must fetch, so that is what the registry breaks.
    manifest = world["registry"] / "objects" / build(bundle, 4096)[0].files["manifest.json"].wire_sha256
    try:
        agent.start()
        _desire(world, world["ref"])
        watcher.wait_active(world["ref"], timeout=120)
        manifest.write_bytes(bytes(b ^ 0x33 for b in manifest.read_bytes()))
        watcher.drain()
        _desire(world, v2)
        outcome = watcher.wait_event(lambda e: e.get("kind") == "outcome", timeout=180)
    finally:
        reg.close()
    assert outcome["ok"] is False and outcome["code"] == "hash_mismatch", outcome
    x = load_golden(world["golden"]).only_input[:1]
    assert _predict_when_up(agent, x).version == "1.0.0"
    assert not (agent.root / "state" / "bundles" / v2.sha256).exists()
