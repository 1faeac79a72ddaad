"""Concurrent pushes and real outcomes (issue 19, item 3): 10 simultaneous `edgectl push`
processes to one real agent through a real Mosquitto end with the device and the retained
documents in agreement, no model entry lost, and each push reporting what happened."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, DesiredState, Topics, sign_document
from edgeagent.signing import SigningKey, generate_keypair
from fleet.registry import Registry
from tests.security_support import AgentProcess

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

EDGECTL = Path(sys.executable).parent / "edgectl"
PREFIX = "conc"
T = Topics(PREFIX)


class Fleet:
    """Ten bundles (versions 1.0.0-1.0.9 of the MLP) in a registry folder, and the keys."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.keys = root / "keys"
        generate_keypair("release", self.keys)
        generate_keypair("intruder", root / "intruder")
        self.key_file = self.keys / "release.key"
        self.intruder_file = root / "intruder" / "intruder.key"
        self.registry = root / "registry"
        self.registry.mkdir()
        gate = AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95)
        self.files: list[Path] = []
        self.refs: list[BundleRef] = []
        for i in range(10):
            created = create_bundle(
                name="digits",
                version=f"1.0.{i}",
                models=[model_dir / "mlp.onnx"],
                key=SigningKey.load(self.key_file),
                out_dir=self.registry,
                golden=model_dir / "golden_mlp.npz",
                gate=gate,
            )
            self.files.append(created.path)
            self.refs.append(
                BundleRef(
                    name="digits", version=f"1.0.{i}", sha256=created.sha256, size=created.path.stat().st_size
                )
            )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Fleet:
    return Fleet(tmp_path_factory.mktemp("conc"), model_dir)


class Device:
    def __init__(self, root: Path, broker: Any, fleet: Fleet, name: str) -> None:
        self.name, self.broker = name, broker
        self.agent = AgentProcess(root, broker, fleet.keys, name, prefix=PREFIX)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reported: dict[str, Any] = {}
        self.session = MqttSession(BrokerConfig(broker.host, broker.port), f"watch-{name}")
        self.session.subscribe(T.events(name), lambda m: self.events.put(json.loads(m.payload)))
        self.session.subscribe(T.reported(name), self._on_reported)
        self.session.start()
        assert self.session.wait_connected(10)

    def _on_reported(self, msg: Any) -> None:
        if msg.payload:
            self.reported = json.loads(msg.payload)

    def wait(self, pred: Any, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.reported):
                return
            time.sleep(0.2)
        raise AssertionError(
            f"device did not get there; reported: {self.reported}\n{self.agent.log.read_text()[-3000:]}"
        )

    def retained(self, topic_filter: str) -> dict[str, bytes]:
        got: dict[str, bytes] = {}
        s = MqttSession(BrokerConfig(self.broker.host, self.broker.port), f"read-{time.monotonic_ns()}")
        s.subscribe(topic_filter, lambda m: got.__setitem__(m.topic, m.payload) if m.retain else None)
        s.start()
        assert s.wait_connected(10)
        time.sleep(1.5)
        s.close()
        return got

    def committed(self) -> set[str]:
        found = set()
        while not self.events.empty():
            ev = self.events.get_nowait()
            if ev["kind"] == "outcome" and ev.get("ok"):
                found.add(ev["bundle"]["sha256"])
        return found


@pytest.fixture
def device(tmp_path: Path, mosquitto: Any, fleet: Fleet) -> Iterator[Device]:
    registry = Registry(BrokerConfig(mosquitto.host, mosquitto.port), fleet.registry, topics=T).start()
    dev = Device(tmp_path, mosquitto, fleet, f"dev-{os.getpid()}-{time.monotonic_ns() % 100000}")
    dev.agent.start()
    try:
        dev.wait(lambda r: r.get("online"), 60)
        yield dev
    finally:
        dev.agent.stop()
        dev.session.close()
        registry.close()


def _push(
    fleet: Fleet, device: Device, bundle: Path, *extra: str, key: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(EDGECTL), "push", str(bundle), "--device", device.name, "--key", str(key or fleet.key_file),
         "--broker", f"mqtt://{device.broker.host}:{device.broker.port}", "--prefix", PREFIX,
         "--registry", str(fleet.registry), "--timeout", "180", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=300), p.communicate()[0]) for p in procs]


def _last_seq(output: str) -> int:
    """The seq of the push's last doc: the first line's, or the last republished one."""
    return int(re.findall(r"(?:, seq|republished as seq) (\d+)", output)[-1])


def test_ten_concurrent_pushes_of_one_model_agree_with_the_device(fleet: Fleet, device: Device) -> None:
    # The set-up: the device's seq for the model is ahead of the clock (within the
    # allowance), so every push computes the same 'previous + 1'.
    ahead = DesiredState(
        seq=int(time.time() * 1000) + 3_600_000,
        target=f"device:{device.name}",
        models={"default": fleet.refs[0]},
    )
    seeder = MqttSession(BrokerConfig(device.broker.host, device.broker.port), f"seed-{device.name}").start()
    assert seeder.wait_connected(10)
    seeder.publish(
        T.device_desired_model(device.name, "default"),
        sign_document(ahead, SigningKey.load(fleet.key_file)),
        retain=True,
    )
    device.wait(
        lambda r: (
            (r.get("models", {}).get("default", {}).get("bundle") or {}).get("sha256") == fleet.refs[0].sha256
        )
    )
    seeder.close()

    results = _finish(
        [_push(fleet, device, fleet.files[i], "--rollback") for i in range(1, 10)]
        + [_push(fleet, device, fleet.files[0], "--rollback")]
    )
    codes = [rc for rc, _ in results]
    assert set(codes) <= {0, 4}, results  # committed, or replaced by a concurrent push
    assert all("no outcome" not in out and "Traceback" not in out for _, out in results), results

    topic = T.device_desired_model(device.name, "default")
    retained = DesiredState.model_validate_json(json.loads(device.retained(topic)[topic])["payload"])
    key = f"device:{device.name}/default"
    final = retained.models["default"]
    device.wait(lambda r: r.get("desired_seq", {}).get(key) == retained.seq
                and (r["models"]["default"].get("bundle") or {}).get("sha256") == final.sha256
                and r["models"]["default"]["state"] == "idle")  # fmt: skip
    # The push whose doc is the retained one says so, and succeeded.
    winners = [(rc, out) for rc, out in results if _last_seq(out) == retained.seq]
    assert len(winners) == 1 and winners[0][0] == 0, results
    # Every push that said OK had its bundle committed on the device.
    committed = device.committed()
    for (rc, _), i in zip(results, [*range(1, 10), 0], strict=True):
        if rc == 0 and i != 0:
            assert fleet.refs[i].sha256 in committed, (i, results)
    # A shared seq is refused by the device and republished: no two pushes succeed with one.
    seqs = [_last_seq(out) for rc, out in results if rc == 0]
    assert len(set(seqs)) == len(seqs), results


def test_ten_concurrent_pushes_of_different_models_lose_no_entry(fleet: Fleet, device: Device) -> None:
    procs = [_push(fleet, device, fleet.files[i], "--model", f"m{i}") for i in range(10)]
    results = _finish(procs)
    assert [rc for rc, _ in results] == [0] * 10, results
    docs = device.retained(T.device_desired(device.name) + "/#")
    assert sorted(docs) == sorted(T.device_desired_model(device.name, f"m{i}") for i in range(10))
    device.wait(lambda r: all(
        (r.get("models", {}).get(f"m{i}", {}).get("bundle") or {}).get("sha256") == fleet.refs[i].sha256
        for i in range(10)))  # fmt: skip


def test_push_reports_refusals_with_their_code_and_exit_status(
    fleet: Fleet, device: Device, tmp_path: Path, model_dir: Path
) -> None:
    # A key the device does not trust (its bundle and doc signed alike): refused at once.
    created = create_bundle(
        name="digits",
        version="2.0.0",
        models=[model_dir / "mlp.onnx"],
        key=SigningKey.load(fleet.intruder_file),
        out_dir=tmp_path,
        golden=model_dir / "golden_mlp.npz",
        gate=AcceptanceGate(min_accuracy=0.9),
    )
    proc = _push(fleet, device, created.path, key=fleet.intruder_file)
    rc, out = _finish([proc])[0]
    assert rc == 3 and "REFUSED - refused (unknown_key)" in out and "no outcome" not in out, out
    assert _finish([_push(fleet, device, fleet.files[5])])[0][0] == 0
    rc, out = _finish([_push(fleet, device, fleet.files[2])])[0]  # lower than 1.0.5, no --rollback
    assert rc == 3 and "REFUSED - refused (downgrade)" in out, out


def test_a_seq_stuck_ahead_of_the_clock_is_refused_and_reset_seq_recovers(
    fleet: Fleet, device: Device
) -> None:
    device.agent.stop()
    state = device.agent.root / "state" / "desired.json"
    stuck = int(time.time() * 1000) + 48 * 3_600_000  # stored before the bound existed
    state.write_text(json.dumps({"seqs": {f"device:{device.name}/default": stuck}, "docs": {}}))
    device.agent.start()
    device.wait(lambda r: r.get("online") and r.get("desired_seq"), 60)
    rc, out = _finish([_push(fleet, device, fleet.files[3])])[0]
    assert rc == 3 and "REFUSED" in out and "--reset-seq" in out, out
    rc, out = _finish([_push(fleet, device, fleet.files[3], "--reset-seq")])[0]
    assert rc == 0, out
