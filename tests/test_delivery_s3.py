"""The S3 path with real processes: an agent process deploys from presigned URLs of a moto S3
server (no registry), resumes after a kill -9 mid-object with a Range request, falls back to
the MQTT registry when the server stops mid-file (or waits and resumes when none is listed),
and refuses a tampered object with the previous model still serving (docs/bundle.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.bundle.golden import load_golden
from edgeagent.protocol import BundleRef, MqttSource, Source, Topics
from fleet.publish import S3Destination, build, presigned_source, publish
from fleet.registry import Registry
from tests import test_delivery_agent as agent_tests
from tests.delivery_support import bundle_path, make_bundle
from tests.s3_support import SlowS3, slow_s3
from tests.test_delivery_agent import _desire, _kill_when, _partial_download, _predict_when_up, _served_by

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
PREFIX = "e2e"
world = agent_tests.world  # the fixture: an agent process, a registry folder, a watcher


@pytest.fixture
def s3(monkeypatch) -> Iterator[SlowS3]:  # type: ignore[no-untyped-def]
    yield from slow_s3(monkeypatch, rate=4096)


def _in_bucket(world: dict, s3: SlowS3, bundle: Path, ref: BundleRef, *more: Source) -> BundleRef:  # type: ignore[type-arg]
    """``bundle`` published to the bucket (4 KiB blocks, as in the registry); the ref names
    presigned URLs through the slow endpoint, then ``more`` sources."""
    done = publish(bundle, S3Destination("s3://edge/fleet", endpoint_url=s3.endpoint), block_size=4096)
    slow = S3Destination("s3://edge/fleet", endpoint_url=s3.proxy.url)  # what devices are given
    presigned = presigned_source(slow, done.index.sha256, 600)
    return ref.model_copy(update={"index": done.index, "sources": [presigned, *more]})


def _bundle(tmp_path: Path) -> Path:
    return next((tmp_path / "out").glob("*.bundle"))


def test_s3_path_resumes_after_kill_9_with_a_range_request(world, s3: SlowS3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = world["agent"], world["watcher"]
    ref = _in_bucket(world, s3, _bundle(tmp_path), world["ref"])
    agent.start()  # no registry at all: the bucket is the only source
    _desire(world, ref)
    _kill_when(agent, lambda: _partial_download(agent.root / "state", ".hpart", at_least=4096))
    agent.start()
    watcher.wait_active(ref, timeout=180)
    served = _served_by(world)
    assert set(served.values()) <= {"presigned", "store"}, served
    # The restarted agent asked for the rest of the object, after the verified blocks on disk.
    assert any(r.startswith("bytes=") and r != "bytes=0-" for r in s3.proxy.ranges()), s3.proxy.requests


def test_s3_server_stops_mid_file_and_the_registry_serves_the_rest(world, s3: SlowS3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = world["agent"], world["watcher"]
    ref = _in_bucket(world, s3, _bundle(tmp_path), world["ref"], MqttSource())
    reg = Registry(world["broker"], world["registry"], topics=Topics(PREFIX)).start()
    try:
        agent.start()
        _desire(world, ref)
        deadline = time.monotonic() + 60
        while not _partial_download(agent.root / "state", ".hpart", at_least=4096):
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.02)
        s3.stop()
        watcher.wait_active(ref, timeout=180)
        served = _served_by(world)
    finally:
        reg.close()
    assert "mqtt" in served.values(), served  # what the bucket did not finish came from the registry
    assert "presigned" in served.values(), served


def test_s3_server_stops_mid_file_and_the_agent_resumes_when_it_is_back(
    world, s3: SlowS3, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = world["agent"], world["watcher"]
    with agent.config.open("a") as fh:
        fh.write("retry_base_s = 1.0\nretry_cap_s = 2.0\n")  # the retry comes soon after the server
    ref = _in_bucket(world, s3, _bundle(tmp_path), world["ref"])
    agent.start()
    _desire(world, ref)
    deadline = time.monotonic() + 60
    while not _partial_download(agent.root / "state", ".hpart", at_least=4096):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    s3.stop()
    failed = watcher.wait_event(lambda e: e.get("kind") == "outcome", timeout=60)
    assert failed["ok"] is False and failed["code"] == "transfer_failed", failed
    assert failed["detail"]["kind"] == "transient" and "retry_in_s" in failed["detail"], failed
    kept = [p for p in (agent.root / "state" / "downloads").glob("*.hpart") if p.stat().st_size >= 4096]
    assert kept, "the verified blocks of the interrupted object were dropped"
    s3.restart()
    watcher.wait_active(ref, timeout=180)
    assert set(_served_by(world).values()) <= {"presigned", "store"}
    assert any(r.startswith("bytes=") and r != "bytes=0-" for r in s3.proxy.ranges()), s3.proxy.requests


def test_s3_tampered_object_is_refused_and_the_previous_model_keeps_serving(
    world, s3: SlowS3, tmp_path: Path, model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    agent, watcher = world["agent"], world["watcher"]
    s3.proxy.rate = 1 << 20  # nothing to interrupt here
    v1 = _in_bucket(world, s3, _bundle(tmp_path), world["ref"])
    v2 = make_bundle(model_dir, tmp_path / "out", world["key"], "1.1.0")
    bundle = bundle_path(tmp_path / "out", v2)
    v2 = _in_bucket(world, s3, bundle, v2)
    agent.start()
    _desire(world, v1)
    watcher.wait_active(v1, timeout=120)
    # 1.1.0 differs from 1.0.0 only in its manifest (and signature): that is what it fetches,
    # so that is what the bucket serves tampered (same size, other bytes).
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    key = f"fleet/objects/{build(bundle, 4096)[0].files['manifest.json'].wire_sha256}"
    good = client.get_object(Bucket="edge", Key=key)["Body"].read()
    client.put_object(Bucket="edge", Key=key, Body=bytes(b ^ 0x33 for b in good))
    watcher.drain()
    _desire(world, v2)
    outcome = watcher.wait_event(lambda e: e.get("kind") == "outcome", timeout=120)
    assert outcome["ok"] is False and outcome["code"] == "hash_mismatch", outcome
    x = load_golden(world["golden"]).only_input[:1]
    assert _predict_when_up(agent, x).version == "1.0.0"
    assert not (agent.root / "state" / "bundles" / v2.sha256).exists()
