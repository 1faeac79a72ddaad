"""Bundles with fp32 + int8 + TFLite artifacts, published by content, and a device-side fetcher."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from devices.profile import load_profile
from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.delivery.fetch import ContentFetcher
from edgeagent.delivery.index import DeliveryIndex
from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BundleRef, IndexRef, Source, Topics
from edgeagent.signing import KeyRing, SigningKey
from edgeagent.transfer import BlockDownloader, TransferConfig
from fleet.publish import FolderDestination, build, publish

MODELS = ("mlp.onnx", "mlp_int8.tflite", "mlp.tflite")


def make_bundle(model_dir: Path, out: Path, key: SigningKey, version: str, models=MODELS) -> BundleRef:  # type: ignore[no-untyped-def]
    created = create_bundle(
        name="digits",
        version=version,
        models=[model_dir / m for m in models],
        key=key,
        out_dir=out,
        golden=model_dir / "golden_mlp.npz",
        labels=model_dir / "labels.txt",
        gate=AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95),
    )
    return BundleRef(name="digits", version=version, sha256=created.sha256, size=created.path.stat().st_size)


def bundle_path(out: Path, ref: BundleRef) -> Path:
    return out / f"{ref.name}-{ref.version}.bundle"


def published_ref(
    bundle: Path, ref: BundleRef, registry: Path, sources: list[Source] | None = None, block_size: int = 65536
) -> BundleRef:
    done = publish(bundle, FolderDestination(registry), block_size=block_size)
    return ref.model_copy(update={"index": done.index, "sources": sources or []})


def hostile_ref(
    ref: BundleRef, registry: Path, index: DeliveryIndex | dict, objects: dict[str, bytes]
) -> BundleRef:  # type: ignore[type-arg]
    """Publish ``objects`` and ``index`` (a model or raw JSON) as they are, and point a ref at them."""
    import json

    body = (
        index.to_bytes() if isinstance(index, DeliveryIndex) else json.dumps(index, sort_keys=True).encode()
    )
    (registry / "objects").mkdir(exist_ok=True)
    for sha, data in {**objects, hashlib.sha256(body).hexdigest(): body}.items():
        (registry / "objects" / sha).write_bytes(data)
    sha = hashlib.sha256(body).hexdigest()
    return ref.model_copy(update={"index": IndexRef.model_construct(sha256=sha, size=len(body))})


class Device:
    """A device's MQTT session, block downloader and content fetcher on its own state folder."""

    def __init__(
        self,
        broker: BrokerConfig,
        state: Path,
        keys: KeyRing,
        prefix: str,
        profile: str = "generic-x86_64",
        **cfg,
    ) -> None:  # type: ignore[no-untyped-def]
        self.session = MqttSession(broker, f"dev-{time.monotonic_ns()}")
        self.downloader = BlockDownloader(
            self.session, "dev1", state / "downloads", topics=Topics(prefix), config=TransferConfig(**cfg)
        )
        self.session.start()
        assert self.session.wait_connected(5)
        self.fetcher = ContentFetcher(
            state,
            keys,
            downloader=self.downloader,
            candidates=load_profile(profile).candidates,
            profile=profile,
            mqtt_block_cap=self.downloader.config.block_size,
        )
        self.state = state

    def close(self) -> None:
        self.session.close()


__all__ = ["Device", "build", "bundle_path", "hostile_ref", "make_bundle", "published_ref"]
