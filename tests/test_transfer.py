"""Block transfer through a real Mosquitto: registry -> device, resume, outages, bad blocks."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent import errors
from edgeagent.mqtt import BrokerConfig, MqttSession
from edgeagent.protocol import BLOCK_HEADER_SIZE, BundleRef, Topics
from edgeagent.transfer import BlockDownloader, TransferConfig
from fleet.registry import Registry

pytestmark = pytest.mark.mosquitto

KiB = 1024


def _bundle(folder: Path, name: str, size: int, seed: int = 0) -> BundleRef:
    # Random bytes from a seed: incompressible, like real model weights.
    data = b"".join(
        hashlib.sha256(bytes([seed]) + i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1)
    )
    data = data[:size]
    path = folder / f"{name}.bundle"
    path.write_bytes(data)
    return BundleRef(name=name, version="1.0.0", sha256=hashlib.sha256(data).hexdigest(), size=size)


def _broker(b) -> BrokerConfig:  # type: ignore[no-untyped-def]
    return BrokerConfig(host=b.host, port=b.port)


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "registry"
    folder.mkdir()
    return folder


@pytest.fixture
def registry(mosquitto, registry_dir: Path) -> Iterator[Registry]:  # type: ignore[no-untyped-def]
    reg = Registry(_broker(mosquitto), registry_dir, topics=Topics("t1")).start()
    assert reg.session.wait_connected(5)
    yield reg
    reg.close()


def _device(broker: BrokerConfig, tmp_path: Path, device: str = "dev1", prefix: str = "t1", **cfg):  # type: ignore[no-untyped-def]
    session = MqttSession(broker, f"device-{device}-{time.monotonic_ns()}")
    downloader = BlockDownloader(
        session, device, tmp_path / "downloads", topics=Topics(prefix), config=TransferConfig(**cfg)
    )
    session.start()
    assert session.wait_connected(5)
    return session, downloader


def test_fetch_a_bundle(mosquitto, registry: Registry, registry_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "a", 3 * 1024 * KiB + 123)
    session, dl = _device(_broker(mosquitto), tmp_path, block_size=64 * KiB, window=16)
    seen: list[tuple[int, int]] = []
    try:
        path = dl.fetch(ref, progress=lambda got, total: seen.append((got, total)))
    finally:
        session.close()
    assert path.read_bytes() == (registry_dir / "a.bundle").read_bytes()
    assert path.name == f"{ref.sha256}.bundle"
    assert not (tmp_path / "downloads" / f"{ref.sha256}.part").exists()
    assert dl.stats.blocks_received == dl.stats.blocks_total == 49
    assert seen[-1] == (ref.size, ref.size)
    assert registry.stats.blocks_served == 49


def test_new_files_are_picked_up_without_restart(
    mosquitto, registry: Registry, registry_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    session, dl = _device(_broker(mosquitto), tmp_path, block_size=4 * KiB)
    try:
        time.sleep(1.1)  # past the index's rescan interval
        ref = _bundle(registry_dir, "late", 50 * KiB, seed=3)
        assert dl.fetch(ref).read_bytes() == (registry_dir / "late.bundle").read_bytes()
    finally:
        session.close()


def test_resume_after_restart_fetches_only_what_is_missing(
    mosquitto, registry: Registry, registry_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "big", 2 * 1024 * KiB, seed=1)
    window = 8
    stop = threading.Event()

    def stop_halfway(got: int, total: int) -> None:
        if got >= total // 2:
            stop.set()

    session, dl = _device(
        _broker(mosquitto), tmp_path, block_size=16 * KiB, window=window, progress_interval_s=0.0
    )
    with pytest.raises(errors.TransferError, match="stopped"):
        dl.fetch(ref, progress=stop_halfway, stop=stop)
    session.close()
    have = dl.stats.blocks_at_start + dl.stats.blocks_received
    assert 0 < have < dl.stats.blocks_total
    # Requests of the stopped window still in flight are served after the session closed:
    # count from when the registry has gone quiet, or a loaded machine counts them twice.
    served_before = -1
    while served_before != registry.stats.blocks_served:
        served_before = registry.stats.blocks_served
        time.sleep(0.5)

    # A new process: new session, new downloader, same folder.
    session2, dl2 = _device(_broker(mosquitto), tmp_path, block_size=16 * KiB, window=window)
    try:
        path = dl2.fetch(ref)
    finally:
        session2.close()
    assert path.read_bytes() == (registry_dir / "big.bundle").read_bytes()
    assert dl2.stats.blocks_at_start == have
    refetched = registry.stats.blocks_served - dl.stats.blocks_total
    assert refetched <= window, f"re-fetched {refetched} blocks, more than one window"
    assert registry.stats.blocks_served - served_before == dl2.stats.blocks_received


def test_broker_outage_mid_transfer_resumes(own_mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "reg"
    folder.mkdir()
    ref = _bundle(folder, "outage", 4 * 1024 * KiB, seed=2)
    broker = _broker(own_mosquitto.broker)
    reg = Registry(broker, folder, topics=Topics("t2")).start()
    session, dl = _device(
        broker,
        tmp_path,
        prefix="t2",
        block_size=16 * KiB,
        window=8,
        block_timeout_s=1.0,
        progress_interval_s=0.0,
    )
    restarted = threading.Event()

    def bounce(got: int, total: int) -> None:
        if got > total // 3 and not restarted.is_set():
            restarted.set()
            own_mosquitto.stop()
            time.sleep(0.5)
            own_mosquitto.start()

    try:
        path = dl.fetch(ref, progress=bounce)
    finally:
        session.close()
        reg.close()
    assert restarted.is_set()
    assert path.read_bytes() == (folder / "outage.bundle").read_bytes()
    assert session.stats.connects >= 2
    # Blocks received before the outage were not asked for again: at most the window that
    # was in flight when the broker went away is served twice.
    assert dl.stats.blocks_received <= dl.stats.blocks_total + 8
    assert reg.stats.blocks_served <= dl.stats.blocks_total + 8


class CorruptingRegistry(Registry):
    """Flips a payload byte of the first reply for block 2 (after the CRC was computed)."""

    corrupted = 0

    def _send(self, topic: str, data: bytes) -> None:
        index = int.from_bytes(data[6:10], "big")
        if index == 2 and self.corrupted == 0 and len(data) > BLOCK_HEADER_SIZE:
            self.corrupted += 1
            mutable = bytearray(data)
            mutable[BLOCK_HEADER_SIZE + 5] ^= 0xFF
            data = bytes(mutable)
        super()._send(topic, data)


def test_a_corrupt_block_is_fetched_again(mosquitto, registry_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "c", 200 * KiB, seed=4)
    reg = CorruptingRegistry(_broker(mosquitto), registry_dir, topics=Topics("t3")).start()
    session, dl = _device(_broker(mosquitto), tmp_path, prefix="t3", block_size=16 * KiB, block_timeout_s=1.0)
    try:
        path = dl.fetch(ref)
    finally:
        session.close()
        reg.close()
    assert reg.corrupted == 1
    assert dl.stats.corrupt == 1
    assert path.read_bytes() == (registry_dir / "c.bundle").read_bytes()


def test_unknown_bundle_is_refused_quickly(mosquitto, registry: Registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = BundleRef(name="x", version="1.0.0", sha256="ab" * 32, size=1000)
    session, dl = _device(_broker(mosquitto), tmp_path)
    try:
        with pytest.raises(errors.TransferError, match="not_found"):
            dl.fetch(ref)
    finally:
        session.close()
    assert registry.stats.not_found >= 1


def test_bytes_that_do_not_match_the_sha256_are_discarded(
    mosquitto, registry: Registry, registry_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "swap", 40 * KiB, seed=5)
    registry.index.rescan()
    path = registry_dir / "swap.bundle"
    stat = path.stat()
    path.write_bytes(bytes(reversed(path.read_bytes())))  # same size, other bytes
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    session, dl = _device(_broker(mosquitto), tmp_path, block_size=4 * KiB)
    try:
        with pytest.raises(errors.HashMismatch):
            dl.fetch(ref)
    finally:
        session.close()
    assert list((tmp_path / "downloads").iterdir()) == []


def test_garbage_on_the_blocks_topic_is_dropped(
    mosquitto, registry: Registry, registry_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "g", 300 * KiB, seed=6)
    session, dl = _device(_broker(mosquitto), tmp_path, block_size=16 * KiB)
    noise = MqttSession(_broker(mosquitto), "noise").start()
    assert noise.wait_connected(5)
    try:
        for payload in (b"", b"EBLK", b"\x00" * 100, os.urandom(5000)):
            noise.publish(Topics("t1").blocks("dev1"), payload)
        noise.publish(Topics("t1").registry_get("dev1"), b"{not json")
        noise.publish(Topics("t1").registry_get("dev1"), b'{"v": 1, "device": "../x", "sha256": "zz"}')
        path = dl.fetch(ref)
    finally:
        noise.close()
        session.close()
    assert path.read_bytes() == (registry_dir / "g.bundle").read_bytes()
    deadline = time.monotonic() + 10
    while registry.stats.malformed < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.stats.malformed == 2


def test_registry_replicas_share_the_work(mosquitto, registry_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "shared", 1024 * KiB, seed=7)
    replicas = [Registry(_broker(mosquitto), registry_dir, topics=Topics("t4")).start() for _ in range(2)]
    for r in replicas:
        assert r.session.wait_connected(5)
    session, dl = _device(_broker(mosquitto), tmp_path, prefix="t4", block_size=8 * KiB, window=8, run=1)
    try:
        path = dl.fetch(ref)
    finally:
        session.close()
        for r in replicas:
            r.close()
    assert path.read_bytes() == (registry_dir / "shared.bundle").read_bytes()
    served = [r.stats.blocks_served for r in replicas]
    assert sum(served) == 128
    assert all(s > 0 for s in served), served


def test_many_devices_at_once(mosquitto, registry: Registry, registry_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = _bundle(registry_dir, "many", 1024 * KiB, seed=8)
    results: dict[str, bytes] = {}
    errors_seen: list[str] = []

    def device(name: str) -> None:
        session, dl = _device(_broker(mosquitto), tmp_path / name, device=name, block_size=32 * KiB, window=8)
        try:
            results[name] = dl.fetch(ref).read_bytes()
        except Exception as exc:
            errors_seen.append(f"{name}: {exc!r}")
        finally:
            session.close()

    threads = [threading.Thread(target=device, args=(f"fleet{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = (registry_dir / "many.bundle").read_bytes()
    assert errors_seen == []
    assert sorted(results) == [f"fleet{i}" for i in range(4)]
    assert all(data == expected for data in results.values())
    assert registry.stats.blocks_served == 4 * 32
