"""Delivery by content from a real nginx (plain, TLS with a test CA, Range resume, PUT) and
from an S3 server (moto), with the MQTT registry as the fallback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent import errors
from edgeagent.delivery.http import HttpSourceError, download
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import HttpSource, MqttSource, PresignedSource, Topics
from edgeagent.signing import KeyRing
from edgeagent.transfer import Wanted
from fleet.publish import HttpDestination, S3Destination, build, presigned_source, publish
from fleet.registry import Registry
from tests.delivery_support import Device, bundle_path, make_bundle, published_ref
from tests.http_support import Nginx, s3_server

pytestmark = pytest.mark.mosquitto
PREFIX = "dhttp"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    root = tmp_path / "www"
    root.mkdir()
    (tmp_path / "nginx-run").mkdir()
    server = Nginx(tmp_path / "nginx-run", root).start()
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path: Path, mosquitto, keypair, model_dir: Path) -> dict:  # type: ignore[no-untyped-def,type-arg]
    out = tmp_path / "out"
    out.mkdir()
    ref = make_bundle(model_dir, out, keypair.load(), "1.0.0")
    return {
        "ref": ref,
        "bundle": bundle_path(out, ref),
        "keys": KeyRing.from_paths([keypair.public]),
        "broker": BrokerConfig(mosquitto.host, mosquitto.port),
        "tmp": tmp_path,
    }


def _device(env: dict, name: str) -> Device:  # type: ignore[type-arg]
    return Device(env["broker"], env["tmp"] / name, env["keys"], PREFIX, block_size=16 * 1024, max_tries=3)


def test_publish_by_put_and_fetch_over_http_and_https(env, nginx: Nginx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    done = publish(env["bundle"], HttpDestination(nginx.url))
    assert done.uploaded == done.objects
    assert publish(env["bundle"], HttpDestination(nginx.url)).uploaded == 0  # idempotent
    for name, base in (("plain", nginx.url), ("tls", nginx.tls_url)):
        monkeypatch.setenv("SSL_CERT_FILE", str(nginx.ca))
        ref = env["ref"].model_copy(
            update={"index": done.index, "sources": [HttpSource(url=base), MqttSource()]}
        )
        dev = _device(env, name)
        try:
            dev.fetcher.fetch(ref)
        finally:
            dev.close()
        assert set(dev.fetcher.report.served_by.values()) == {"http"}, name
        assert (dev.state / "bundles" / ref.sha256 / "models" / "mlp_int8.tflite").exists()


def test_an_unreachable_server_falls_back_to_the_registry(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry = tmp_path / "registry"
    registry.mkdir()
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/"
    ref = published_ref(env["bundle"], env["ref"], registry, [HttpSource(url=dead), MqttSource()])
    reg = Registry(env["broker"], registry, topics=Topics(PREFIX)).start()
    dev = _device(env, "fallback")
    try:
        dev.fetcher.fetch(ref)
    finally:
        dev.close()
        reg.close()
    assert set(dev.fetcher.report.served_by.values()) == {"mqtt"}


def test_a_download_resumes_after_the_server_stops_mid_file(nginx: Nginx, tmp_path: Path) -> None:
    data = os.urandom(48 * 1024)
    (nginx.root / "big").write_bytes(data)
    block = 4096
    want = Wanted(
        hashlib.sha256(data).hexdigest(),
        len(data),
        block,
        tuple(hashlib.sha256(data[i : i + block]).hexdigest() for i in range(0, len(data), block)),
        ".obj",
    )
    part = tmp_path / f"{want.sha256}.hpart"
    failed: list[Exception] = []

    def slow() -> None:
        try:
            download(nginx.url + "slow/big", want, part)
        except HttpSourceError as exc:
            failed.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    while thread.is_alive() and (not part.exists() or part.stat().st_size < 2 * block):
        time.sleep(0.05)
    nginx.stop()  # mid-file
    thread.join(30)
    assert failed, "the download should have stopped with the server"
    kept = part.stat().st_size
    assert 0 < kept < len(data) and kept % block == 0
    nginx.start()
    done = download(nginx.url + "big", want, part)
    assert done.read_bytes() == data
    assert any(line.startswith("206 GET /big") for line in nginx.statuses())


@pytest.mark.parametrize("how", ["tampered", "oversized"])
def test_bad_bytes_from_a_server_are_refused(env, nginx: Nginx, how: str) -> None:  # type: ignore[no-untyped-def]
    done = publish(env["bundle"], HttpDestination(nginx.url))
    index, _ = build(env["bundle"])
    path = nginx.root / "objects" / index.files["models/mlp_int8.tflite"].wire_sha256
    body = path.read_bytes()
    path.write_bytes(bytes(b ^ 1 for b in body) if how == "tampered" else body + b"\0" * 100)
    ref = env["ref"].model_copy(update={"index": done.index, "sources": [HttpSource(url=nginx.url)]})
    dev = _device(env, how)
    try:
        with pytest.raises(errors.HashMismatch if how == "tampered" else errors.SizeLimitExceeded):
            dev.fetcher.fetch(ref)
    finally:
        dev.close()
    assert not (dev.state / "bundles" / ref.sha256).exists()


@pytest.fixture
def s3(monkeypatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    yield from s3_server(monkeypatch)


def test_publish_to_s3_and_fetch_by_presigned_urls(env, s3: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = S3Destination("s3://edge/fleet", endpoint_url=s3)
    done = publish(env["bundle"], dest)
    assert dest.exists(f"bundles/{env['ref'].sha256}.bundle")
    source = presigned_source(dest, done.index.sha256, 600)
    ref = env["ref"].model_copy(update={"index": done.index, "sources": [source]})
    dev = _device(env, "s3")
    try:
        dev.fetcher.fetch(ref)
    finally:
        dev.close()
    assert set(dev.fetcher.report.served_by.values()) == {"presigned"}
    # Expired URLs are not tried: with no other source the fetch waits to resume later.
    expired = PresignedSource(urls=source.urls, expires=time.time() - 1)
    late = env["ref"].model_copy(update={"index": done.index, "sources": [expired]})
    dev = _device(env, "s3-expired")
    try:
        with pytest.raises(errors.TransferError, match="will resume later"):
            dev.fetcher.fetch(late)
    finally:
        dev.close()


def test_a_bundle_url_in_source_is_used_not_ignored(env, nginx: Nginx) -> None:  # type: ignore[no-untyped-def]
    """The reported fact: `source` said "or an http(s) URL" and the agent ignored it."""
    publish(env["bundle"], HttpDestination(nginx.url))
    url = f"{nginx.url}bundles/{env['ref'].sha256}.bundle"
    dev = _device(env, "whole-http")
    try:
        assert dev.fetcher.fetch_bundle_url(env["ref"].model_copy(update={"source": url}))
        broken = env["ref"].model_copy(update={"source": nginx.url + "nothing-here.bundle"})
        other = dev.state / "downloads" / f"{env['ref'].sha256}.bundle"
        assert other.read_bytes() == env["bundle"].read_bytes()
        other.unlink()
        assert not dev.fetcher.fetch_bundle_url(broken)  # the agent then asks the registry
    finally:
        dev.close()
    assert any(line.startswith("200 GET /bundles/") for line in nginx.statuses())


def test_a_bomb_from_a_server_is_refused(env, nginx: Nginx) -> None:  # type: ignore[no-untyped-def]
    from tests.delivery_support import hostile_ref
    from tests.test_delivery_hostile import bomb

    index, objects = build(env["bundle"])
    (nginx.root / "objects").mkdir()
    for sha, wire in objects.items():
        (nginx.root / "objects" / sha).write_bytes(wire)
    extra: dict[str, bytes] = {}
    ref = hostile_ref(env["ref"], nginx.root, bomb(index, extra, nginx.root, None), extra)
    ref = ref.model_copy(update={"sources": [HttpSource(url=nginx.url)]})
    dev = _device(env, "bomb")
    try:
        with pytest.raises(errors.DecompressionBomb):
            dev.fetcher.fetch(ref)
    finally:
        dev.close()
    assert not (dev.state / "bundles" / ref.sha256).exists()
