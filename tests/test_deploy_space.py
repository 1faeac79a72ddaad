"""A full disk and a corrupted store, end to end: a real agent process on a real small
filesystem (tmpfs), a real Mosquitto and registry, real ONNX Runtime / LiteRT sessions."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import BundleRef, Topics
from fleet.registry import Registry
from tests.test_deploy import PREFIX, AgentProcess, Bundles, Load, Watcher, _push

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

MiB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small real filesystem at ``path``; skips where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _big_model(model_dir: Path, out: Path, pad_bytes: int) -> Path:
    """mlp.onnx with an unused initializer of ``pad_bytes``: the same answers, a bigger bundle."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "mlp.onnx"))
    pad = np.random.default_rng(0).standard_normal(pad_bytes // 4).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(pad, name="padding"))
    path = out / "mlp.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, model_dir) -> Bundles:  # type: ignore[no-untyped-def]
    return Bundles(tmp_path_factory.mktemp("bundles"), model_dir)


@pytest.fixture
def registry(mosquitto, bundles: Bundles) -> Iterator[Registry]:  # type: ignore[no-untyped-def]
    with Registry(
        BrokerConfig(mosquitto.host, mosquitto.port), bundles.registry, topics=Topics(PREFIX)
    ) as reg:
        yield reg


@pytest.fixture(scope="module")
def big(tmp_path_factory, model_dir, bundles: Bundles) -> BundleRef:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("big")
    created = create_bundle(
        name="digits",
        version="1.5.0",
        models=[_big_model(model_dir, work, MiB)],
        key=bundles.key,
        out_dir=bundles.registry,
        golden=model_dir / "golden_mlp.npz",
        gate=AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95),
    )
    return BundleRef(name="digits", version="1.5.0", sha256=created.sha256, size=created.path.stat().st_size)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_disk_keeps_the_model_serving_and_recovers_by_itself(
    tmp_path: Path, mosquitto, bundles: Bundles, registry, big: BundleRef
) -> None:  # type: ignore[no-untyped-def]
    name = f"full-{time.monotonic_ns() % 100000}"
    with tmpfs(tmp_path / "state", "4m") as state:
        agent = AgentProcess(tmp_path, mosquitto, bundles, name)
        with agent.config.open("a") as f:
            f.write("free_space_margin_mb = 0.25\n")
        watcher = Watcher(mosquitto, name)
        filler = state / "filler"
        try:
            agent.start()
            assert _push(mosquitto, bundles, name, bundles.refs["v1"]).ok
            # Leave room for journals but not for the 1 MiB bundle and its extraction.
            filler.write_bytes(b"\0" * (_free(state) - MiB))
            x = bundles.golden.only_input[:1]
            with Load(agent, x) as load:
                result = _push(mosquitto, bundles, name, big)
                assert not result.ok and result.detail.startswith("insufficient_space"), result.detail
                time.sleep(0.2)
            assert load.failures == [] and load.ok > 0, "the previous model kept serving"
            assert agent.predict(x).version == "1.0.0"
            assert watcher.reported["last_deployment"]["code"] == "insufficient_space"
            assert list((state / "downloads").iterdir()) == [], "nothing left behind"
            assert sorted(p.name for p in (state / "bundles").iterdir()) == [bundles.refs["v1"].sha256]
            # Space comes back; the next push goes through without anyone touching the device.
            filler.unlink()
            result = _push(mosquitto, bundles, name, big)
            assert result.ok, result.detail
            assert agent.predict(x).version == "1.5.0"
        finally:
            agent.stop()
            watcher.close()


def test_corrupt_active_model_falls_back_to_the_previous_and_heals(
    tmp_path: Path, mosquitto, bundles: Bundles
) -> None:  # type: ignore[no-untyped-def]
    name = f"rot-{time.monotonic_ns() % 100000}"
    agent = AgentProcess(tmp_path, mosquitto, bundles, name)
    watcher = Watcher(mosquitto, name)
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    v1, v2 = bundles.refs["v1"], bundles.refs["v2"]
    try:
        with Registry(broker, bundles.registry, topics=Topics(PREFIX)) as reg:
            assert reg.session.wait_connected(5)
            agent.start()
            assert _push(mosquitto, bundles, name, v1).ok
            assert _push(mosquitto, bundles, name, v2).ok
        agent.stop()
        # One changed byte in the active model file.
        model = tmp_path / "state" / "bundles" / v2.sha256 / "models" / "mlp_int8.tflite"
        model.chmod(0o644)
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
        # No registry yet: the fallback is all the device can do at first.
        agent.start()
        deadline = time.monotonic() + 60
        while not agent.socket.exists():
            assert time.monotonic() < deadline, "the agent did not come back"
            time.sleep(0.1)
        x = bundles.golden.only_input[:1]
        with Load(agent, x) as load:
            assert agent.predict(x).version == "1.0.0", "served the intact previous bundle"
            event = watcher.wait_event(lambda e: e["kind"] == "error")
            assert event["code"] == "store_corrupt" and event["detail"]["fallback"] == v1.sha256
            assert "mlp_int8.tflite does not match" in event["reason"]
            assert agent.current() == v1.sha256
            # The desired state still names v2: once the registry is back it is downloaded
            # again, intact, and switched in.
            with Registry(broker, bundles.registry, topics=Topics(PREFIX)) as reg:
                assert reg.session.wait_connected(5)
                watcher.wait_active(v2, timeout=60)
                time.sleep(0.2)
        assert load.failures == [] and load.ok > 0
        assert agent.predict(x).version == "1.1.0"
    finally:
        agent.stop()
        watcher.close()


def test_sigterm_during_a_stalled_download_stops_within_5_s_and_resumes(
    tmp_path: Path, mosquitto, bundles: Bundles, big: BundleRef
) -> None:  # type: ignore[no-untyped-def]
    from fleet.push import FleetConnection, Target, publish_desired

    name = f"term-{time.monotonic_ns() % 100000}"
    agent = AgentProcess(tmp_path, mosquitto, bundles, name)
    watcher = Watcher(mosquitto, name)
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    try:
        agent.start()
        # No registry answers: the download waits for blocks.
        with FleetConnection(broker, Topics(PREFIX), f"p-{name}") as conn:
            publish_desired(conn, Target("device", name), "default", big, bundles.key)
        watcher.wait_event(lambda e: e["kind"] == "state" and e["state"] == "downloading")
        assert agent.proc is not None
        started = time.monotonic()
        agent.proc.terminate()
        assert agent.proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 5, "stopped within 5 s of SIGTERM"
        journal = (tmp_path / "state" / "journal" / "default.json").read_text()
        assert '"state": "downloading"' in journal and '"attempts": 0' in journal
        # With a registry back, the next start resumes the download and commits.
        with Registry(broker, bundles.registry, topics=Topics(PREFIX)) as reg:
            assert reg.session.wait_connected(5)
            agent.start()
            watcher.wait_active(big, timeout=60)
    finally:
        agent.stop()
        watcher.close()
