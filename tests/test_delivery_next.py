"""The next candidate on acceptance failure, with the agent as a real process over a real
Mosquitto and registry: a device fetches only its first choice; when that artifact fails its
own gate it fetches the next candidate's artifact, proves it, and serves it (docs/bundle.md)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.delivery.objects import DELIVERY_NOTE, Note
from edgeagent.errors import IndexMismatch
from edgeagent.protocol import BundleRef, Topics
from fleet.publish import FolderDestination, build, publish
from fleet.registry import Registry
from tests import test_delivery_agent as agent_tests
from tests.delivery_support import MODELS
from tests.test_delivery_agent import SlowRegistry, _desire

world = agent_tests.world  # the fixture: an agent process, a registry folder, a watcher

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
PREFIX = "e2e"
IMPOSSIBLE = AcceptanceGate(min_accuracy=0.9, latency_p95_ms={"*": 1e-6})  # no model is that fast


def _gated_bundle(world: dict, model_dir: Path, out: Path, version: str, weak: tuple[str, ...]) -> BundleRef:  # type: ignore[type-arg]
    """digits ``version`` (int8 TFLite, fp32 ONNX, fp32 TFLite) in which ``weak`` cannot pass."""
    out.mkdir(exist_ok=True)
    created = create_bundle(
        name="digits",
        version=version,
        models=[model_dir / m for m in MODELS],
        key=world["key"],
        out_dir=out,
        golden=model_dir / "golden_mlp.npz",
        labels=model_dir / "labels.txt",
        gate=AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95),
        model_gates={model_dir / m: IMPOSSIBLE for m in weak},
    )
    done = publish(created.path, FolderDestination(world["registry"]), block_size=4096)
    ref = BundleRef(name="digits", version=version, sha256=created.sha256, size=created.path.stat().st_size)
    return ref.model_copy(update={"index": done.index})


def _wire(bundle: Path, member: str) -> str:
    return build(bundle, 4096)[0].files[member].wire_sha256


def _models(agent, ref: BundleRef) -> list[str]:  # type: ignore[no-untyped-def]
    folder = agent.root / "state" / "bundles" / ref.sha256
    return sorted(p.name for p in (folder / "models").iterdir()) if folder.is_dir() else []


def test_the_next_candidate_is_fetched_when_the_first_choice_fails_its_gate(
    world, model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = world["agent"], world["watcher"]
    ref = _gated_bundle(world, model_dir, tmp_path / "gated", "1.0.0", weak=("mlp_int8.tflite",))
    bundle = tmp_path / "gated" / "digits-1.0.0.bundle"
    reg = SlowRegistry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    try:
        agent.start()
        _desire(world, ref)
        nxt = watcher.wait_event(lambda e: e.get("code") == "next_candidate", timeout=120)
        # Killed while (or just after) the next artifact is fetched: the journal resumes validating.
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        agent.start()
        model = watcher.wait_active(ref, timeout=180)
    finally:
        reg.close()
    assert nxt["detail"]["next_candidate"] == ["models/mlp.onnx"]
    assert nxt["detail"]["after"] == "acceptance_failed"
    assert model["runtime"] == "onnxruntime"  # the fp32 ONNX artifact, the next candidate
    assert _models(agent, ref) == ["mlp.onnx", "mlp_int8.tflite"]  # never the fp32 TFLite
    note = json.loads((agent.root / "state" / "bundles" / ref.sha256 / ".delivery.json").read_bytes())
    assert note["absent"] == ["models/mlp.tflite"]
    served = {sha for sha, _ in reg.stats.served_by_block}
    assert _wire(bundle, "models/mlp_int8.tflite") in served
    assert _wire(bundle, "models/mlp.onnx") in served
    assert _wire(bundle, "models/mlp.tflite") not in served


def test_when_no_candidate_passes_the_deployment_fails_and_the_previous_model_serves(
    world, model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = world["agent"], world["watcher"]
    reg = Registry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    good = world["ref"]  # published with the default gate, which int8 TFLite passes
    bad = _gated_bundle(world, model_dir, tmp_path / "gated", "1.1.0", weak=MODELS)
    try:
        agent.start()
        _desire(world, good)
        watcher.wait_active(good, timeout=120)
        watcher.drain()
        _desire(world, bad)
        seen = []
        outcome = watcher.wait_event(
            lambda e: seen.append(e) is None and e.get("kind") == "outcome", timeout=180
        )
    finally:
        reg.close()
    assert outcome["ok"] is False and outcome["code"] == "acceptance_failed", outcome
    fetched = [e["detail"]["next_candidate"] for e in seen if e.get("code") == "next_candidate"]
    # int8 TFLite first; then fp32 ONNX, then fp32 TFLite, each fetched once, then no more.
    assert fetched == [["models/mlp.onnx"], ["models/mlp.tflite"]]
    assert watcher.wait_active(good, timeout=30)["runtime"] == "litert"
    assert not (agent.root / "state" / "bundles" / bad.sha256).exists()


@pytest.fixture
def partial(tmp_path: Path, mosquitto, keypair, model_dir: Path) -> Iterator[tuple]:  # type: ignore[no-untyped-def,type-arg]
    """(device, ref): the device fetched digits 1.0.0's int8 TFLite artifact only."""
    from edgeagent.mqtt import BrokerConfig
    from edgeagent.signing import KeyRing
    from tests.delivery_support import Device, bundle_path, make_bundle, published_ref

    registry, out = tmp_path / "registry", tmp_path / "out"
    registry.mkdir()
    out.mkdir()
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    reg = Registry(broker, registry, topics=Topics("nxt")).start()
    ref = make_bundle(model_dir, out, keypair.load(), "1.0.0")
    ref = published_ref(bundle_path(out, ref), ref, registry, block_size=4096)
    dev = Device(broker, tmp_path / "state", KeyRing.from_paths([keypair.public]), "nxt", block_size=4096)
    try:
        dev.fetcher.fetch(ref)
        yield dev, ref
    finally:
        dev.close()
        reg.close()


def test_fetch_more_walks_the_candidates_in_order_and_survives_a_replay(partial) -> None:  # type: ignore[no-untyped-def]
    """In-process: each round fetches the next candidate's artifacts; a crash between linking
    and rewriting the note (replayed here) leaves nothing to fetch twice."""
    dev, ref = partial
    folder = dev.state / "bundles" / ref.sha256
    first = Note.read(folder)
    rounds = []
    while paths := dev.fetcher.next_artifacts(ref):
        dev.fetcher.fetch_more(ref, paths)
        rounds.append(paths)
        # A crash after the links, before the note: the resumed step links them again.
        dev.fetcher.objects.link_into(folder, {p: first.entries[p].sha256 for p in paths})
    assert rounds == [["models/mlp.onnx"], ["models/mlp.tflite"]]
    assert Note.read(folder).absent == []
    models = sorted(p.name for p in (folder / "models").iterdir())
    assert models == ["mlp.onnx", "mlp.tflite", "mlp_int8.tflite"]


def test_a_note_that_disagrees_with_the_signed_manifest_is_refused(partial) -> None:  # type: ignore[no-untyped-def]
    dev, ref = partial
    folder = dev.state / "bundles" / ref.sha256
    note = Note.read(folder)
    forged = note.entries["models/mlp.onnx"].model_copy(update={"sha256": "0" * 64})
    (folder / DELIVERY_NOTE).unlink()
    Note(note.absent, {**note.entries, "models/mlp.onnx": forged}, note.block_size).write(folder)
    with pytest.raises(IndexMismatch):
        dev.fetcher.fetch_more(ref, ["models/mlp.onnx"])
    assert not (folder / "models" / "mlp.onnx").exists()
    (folder / DELIVERY_NOTE).unlink()
    (folder / DELIVERY_NOTE).write_text("[]")  # not a note: nothing more is fetched, no crash
    assert dev.fetcher.next_artifacts(ref) == []
