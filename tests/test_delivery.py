"""Delivery by content through a real Mosquitto and registry: only what the device runs moves,
compressed; what it holds never moves again; every byte is checked (docs/bundle.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.profile import load_profile
from edgeagent.bundle.manifest import parse_manifest
from edgeagent.delivery.objects import DELIVERY_NOTE
from edgeagent.errors import TransferError
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import Topics
from edgeagent.serving.loader import prepare_served_model
from edgeagent.signing import KeyRing
from fleet.registry import Registry
from tests.delivery_support import Device, build, bundle_path, make_bundle, published_ref

pytestmark = pytest.mark.mosquitto
PREFIX = "dlv"


@pytest.fixture
def env(tmp_path: Path, mosquitto, keypair, model_dir: Path) -> Iterator[dict]:  # type: ignore[no-untyped-def,type-arg]
    registry = tmp_path / "registry"
    registry.mkdir()
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    reg = Registry(broker, registry, topics=Topics(PREFIX)).start()
    assert reg.session.wait_connected(5)
    keys = KeyRing.from_paths([keypair.public])
    yield {
        "registry": registry,
        "broker": broker,
        "reg": reg,
        "keys": keys,
        "key": keypair.load(),
        "models": model_dir,
        "tmp": tmp_path,
    }
    reg.close()


def _device(env: dict, name: str = "state", **cfg) -> Device:  # type: ignore[no-untyped-def,type-arg]
    cfg.setdefault("block_size", 16 * 1024)
    return Device(env["broker"], env["tmp"] / name, env["keys"], PREFIX, **cfg)


def test_whole_bundle_path_moves_every_byte(env) -> None:  # type: ignore[no-untyped-def]
    """The reported fact: without an index every byte of the bundle crosses the broker."""
    ref = make_bundle(env["models"], env["registry"], env["key"], "1.0.0")
    dev = _device(env)
    try:
        dev.downloader.fetch(ref)
    finally:
        dev.close()
    assert dev.downloader.stats.bytes_received == ref.size


def test_a_device_fetches_only_the_artifact_it_runs(env) -> None:  # type: ignore[no-untyped-def]
    out = env["tmp"] / "out"
    out.mkdir()
    ref = make_bundle(env["models"], out, env["key"], "1.0.0")
    ref = published_ref(bundle_path(out, ref), ref, env["registry"])
    dev = _device(env)
    try:
        dev.fetcher.fetch(ref)
    finally:
        dev.close()
    folder = dev.state / "bundles" / ref.sha256
    manifest = parse_manifest((folder / "manifest.json").read_bytes())
    # generic-x86_64 tries ONNX Runtime int8 (none in the bundle), then LiteRT int8.
    assert sorted(p.name for p in (folder / "models").iterdir()) == ["mlp_int8.tflite"]
    assert set(dev.fetcher.report.absent) == {"models/mlp.onnx", "models/mlp.tflite"}
    int8 = manifest.file("models/mlp_int8.tflite").size
    metadata = sum(f.size for f in manifest.files if not f.path.startswith("models/"))
    assert dev.fetcher.report.wire_bytes <= int8 + metadata + 8192  # + manifest, signature
    assert dev.fetcher.report.wire_bytes < ref.size / 2
    assert set(dev.fetcher.report.served_by.values()) == {"mqtt"}
    assert (folder / DELIVERY_NOTE).exists()
    # The partial bundle serves: selection skips the artifacts that were not fetched.
    served = prepare_served_model(
        folder, manifest, load_profile("generic-x86_64").candidates, profile="generic-x86_64"
    )
    assert served.model.runtime == "litert"
    served.model.close()


def test_an_upgrade_moves_only_what_changed(env) -> None:  # type: ignore[no-untyped-def]
    out = env["tmp"] / "out"
    out.mkdir()
    v1 = make_bundle(env["models"], out, env["key"], "1.0.0")
    v1 = published_ref(bundle_path(out, v1), v1, env["registry"])
    v2 = make_bundle(env["models"], out, env["key"], "1.1.0")  # same files, new manifest
    v2 = published_ref(bundle_path(out, v2), v2, env["registry"])
    dev = _device(env)
    try:
        dev.fetcher.fetch(v1)
        first = dev.fetcher.report.wire_bytes
        served_before = env["reg"].stats.bytes_served
        dev.fetcher.fetch(v2)
    finally:
        dev.close()
    moved = env["reg"].stats.bytes_served - served_before
    assert dev.fetcher.report.served_by["models/mlp_int8.tflite"] == "store"
    assert dev.fetcher.report.wire_bytes < 8192 < first  # index, manifest, signature only
    assert moved == dev.fetcher.report.wire_bytes  # the index included


def test_an_interrupted_fetch_keeps_every_object_it_verified(env) -> None:  # type: ignore[no-untyped-def]
    """Resume is per object: what was verified stays in the store, the rest is asked again."""
    out = env["tmp"] / "out"
    out.mkdir()
    ref = make_bundle(env["models"], out, env["key"], "1.0.0", models=("mlp.onnx",))
    ref = published_ref(bundle_path(out, ref), ref, env["registry"], block_size=4096)
    index, _objects = build(bundle_path(out, ref), 4096)
    onnx = env["registry"] / "objects" / index.files["models/mlp.onnx"].wire_sha256
    aside = env["tmp"] / "aside"
    onnx.rename(aside)  # this replica lacks one object (not published yet, or lost)
    dev = _device(env, block_size=4096, error_backoff_s=0.01)
    try:
        with pytest.raises(TransferError, match="will resume later"):
            dev.fetcher.fetch(ref)
        assert not (dev.state / "bundles" / ref.sha256).exists()
        aside.rename(onnx)
        dev.fetcher.fetch(ref)
    finally:
        dev.close()
    served = dev.fetcher.report.served_by
    assert served["models/mlp.onnx"] == "mqtt"
    assert served["acceptance/golden.npz"] == served["manifest.json"] == "store"
    assert (dev.state / "bundles" / ref.sha256 / "models" / "mlp.onnx").exists()


def test_a_reference_without_an_index_reads_as_before_and_unknown_fields_are_refused() -> None:
    from edgeagent.errors import MalformedMessage
    from edgeagent.protocol import BundleRef, DesiredState, IndexRef, parse

    ref = BundleRef(name="d", version="1.0.0", sha256="a" * 64, size=3)
    # Agents older than delivery by content refuse unknown fields: `push --whole` must not send them.
    assert set(ref.model_dump()) == {"name", "version", "sha256", "size", "source"}
    with_index = ref.model_copy(update={"index": IndexRef(sha256="b" * 64, size=10)})
    assert BundleRef.model_validate_json(with_index.model_dump_json()) == with_index
    doc = {"seq": 1, "target": "device:x", "models": {"m": {**ref.model_dump(), "mirror": "x"}}}
    with pytest.raises(MalformedMessage, match="mirror"):
        parse(DesiredState, doc, "desired document")


def test_edgectl_registry_publish_to_a_folder(tmp_path: Path, keypair, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    ref = make_bundle(model_dir, tmp_path, keypair.load(), "1.0.0")
    dest = tmp_path / "www"
    dest.mkdir()
    edgectl = Path(sys.executable).parent / "edgectl"
    argv = [str(edgectl), "registry", "publish", str(bundle_path(tmp_path, ref)), "--to", str(dest)]
    first = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    again = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    index, objects = build(bundle_path(tmp_path, ref))
    assert (dest / "bundles" / f"{ref.sha256}.bundle").read_bytes() == bundle_path(tmp_path, ref).read_bytes()
    assert {p.name for p in (dest / "objects").iterdir()} == set(objects) | {
        hashlib.sha256(index.to_bytes()).hexdigest()
    }
    assert f"{len(objects) + 1} objects ({len(objects) + 1} new)" in first
    assert "(0 new)" in again  # objects are immutable: nothing is sent twice
