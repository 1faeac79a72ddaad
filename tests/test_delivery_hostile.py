"""Every way a delivery by content can be hostile is refused with its own named error, over a
real Mosquitto and registry, and leaves no bundle, staging folder or half object behind
(table-driven, like tests/test_bundle_hostile.py)."""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeagent import errors
from edgeagent.delivery.index import DeliveryIndex, IndexFile
from edgeagent.mqtt import BrokerConfig
from edgeagent.protocol import Topics
from edgeagent.signing import KeyRing, SigningKey
from fleet.registry import Registry
from tests.delivery_support import Device, build, bundle_path, hostile_ref, make_bundle

pytestmark = pytest.mark.mosquitto
PREFIX = "hostile"
Objects = dict[str, bytes]
Change = Callable[[DeliveryIndex, Objects, Path, SigningKey], DeliveryIndex | dict]  # type: ignore[type-arg]


def _entry(
    index: DeliveryIndex, name: str, wire: bytes, encoding: str = "identity", **plain: object
) -> DeliveryIndex:
    """``index`` with ``name`` travelling as ``wire`` (hashes of the wire recomputed: only the
    plain bytes are wrong, so only the device's own checks can catch it)."""
    old = index.files[name]
    blocks = [
        hashlib.sha256(wire[i : i + index.block_size]).hexdigest()
        for i in range(0, len(wire), index.block_size)
    ]
    entry = IndexFile(
        sha256=str(plain.get("sha256", old.sha256)),
        size=int(plain.get("size", old.size)),  # type: ignore[call-overload]
        encoding=encoding,  # type: ignore[arg-type]
        wire_sha256=hashlib.sha256(wire).hexdigest(),
        wire_size=len(wire),
        blocks=blocks or [hashlib.sha256(b"").hexdigest()],
    )
    return index.model_copy(update={"files": {**index.files, name: entry}})


def _add(objects: Objects, wire: bytes) -> bytes:
    objects[hashlib.sha256(wire).hexdigest()] = wire
    return wire


def tampered_object(index, objects, registry, _key):  # type: ignore[no-untyped-def]
    # The registry's copy of an object differs from what the index names (same size).
    entry = index.files["models/mlp_int8.tflite"]
    path = registry / "objects" / entry.wire_sha256
    path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))
    return index


def wrong_plain_hash(index, objects, _registry, _key):  # type: ignore[no-untyped-def]
    # Wire hashes consistent, but the bytes decode to other plain bytes than the manifest's.
    size = index.files["labels.txt"].size
    return _entry(index, "labels.txt", _add(objects, b"x" * size))


def oversized_object(index, objects, registry, _key):  # type: ignore[no-untyped-def]
    # The registry serves more bytes under the name than the index declares.
    entry = index.files["labels.txt"]
    path = registry / "objects" / entry.wire_sha256
    path.write_bytes(path.read_bytes() + b"\0" * 5000)
    return index


def oversized_manifest(index, objects, _registry, _key):  # type: ignore[no-untyped-def]
    return _entry(index, "manifest.json", _add(objects, b"{}"), size=2 << 20)


def bomb(index, objects, _registry, _key):  # type: ignore[no-untyped-def]
    size = index.files["labels.txt"].size
    wire = lzma.compress(b"\0" * (64 << 20), format=lzma.FORMAT_XZ)  # 64 MiB of zeros in ~10 KB
    return _entry(index, "labels.txt", _add(objects, wire), encoding="xz", size=size)


def unlisted_file(index, objects, _registry, _key):  # type: ignore[no-untyped-def]
    extra = index.files["labels.txt"]
    return index.model_copy(update={"files": {**index.files, "models/extra.onnx": extra}})


def huge_index(index, _objects, _registry, _key):  # type: ignore[no-untyped-def]
    body = index.model_dump(mode="json")
    body["pad"] = "x" * (1 << 20)
    return body


def other_key(index, objects, _registry, _key):  # type: ignore[no-untyped-def]
    from edgeagent.signing import generate_keypair

    folder = _registry.parent / "intruder"
    generate_keypair("release", folder)
    intruder = SigningKey.load(folder / "release.key")
    wire = (_registry / "objects" / index.files["manifest.json"].wire_sha256).read_bytes()
    sig = intruder.sign(lzma.decompress(wire) if index.files["manifest.json"].encoding == "xz" else wire)
    body = sig.to_json()
    return _entry(
        index, "manifest.sig", _add(objects, body), sha256=hashlib.sha256(body).hexdigest(), size=len(body)
    )


def other_bundle(index, _objects, _registry, _key):  # type: ignore[no-untyped-def]
    return index.model_copy(update={"bundle": "0" * 64})


@dataclass(frozen=True)
class Case:
    change: Change
    error: type[errors.EdgeError]
    code: str


CASES = {
    "tampered object": Case(tampered_object, errors.HashMismatch, "hash_mismatch"),
    "wrong plain hash": Case(wrong_plain_hash, errors.HashMismatch, "hash_mismatch"),
    "oversized object": Case(oversized_object, errors.SizeMismatch, "size_mismatch"),
    "oversized manifest": Case(oversized_manifest, errors.SizeLimitExceeded, "size_limit"),
    "decompression bomb": Case(bomb, errors.DecompressionBomb, "decompression_bomb"),
    "index names a file the manifest does not": Case(unlisted_file, errors.IndexMismatch, "index_mismatch"),
    "index over 1 MiB": Case(huge_index, errors.SizeLimitExceeded, "size_limit"),
    "manifest signed by another key": Case(other_key, errors.UnknownKey, "unknown_key"),
    "index of another bundle": Case(other_bundle, errors.IndexMismatch, "index_mismatch"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mosquitto, model_dir: Path) -> Iterator[dict]:  # type: ignore[no-untyped-def,type-arg]
    from edgeagent.signing import generate_keypair

    root = tmp_path_factory.mktemp("hostile")
    generate_keypair("release", root / "keys")
    key = SigningKey.load(root / "keys" / "release.key")
    ref = make_bundle(model_dir, root, key, "1.0.0")
    broker = BrokerConfig(mosquitto.host, mosquitto.port)
    yield {
        "root": root,
        "key": key,
        "ref": ref,
        "broker": broker,
        "keys": KeyRing.from_paths([root / "keys"]),
    }


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_delivery_is_refused(setup, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    spec = CASES[case]
    registry = tmp_path / "registry"
    (registry / "objects").mkdir(parents=True)
    index, objects = build(bundle_path(setup["root"], setup["ref"]))
    for sha, wire in objects.items():
        (registry / "objects" / sha).write_bytes(wire)
    objects = {}
    changed = spec.change(index, objects, registry, setup["key"])
    ref = hostile_ref(setup["ref"], registry, changed, objects)
    reg = Registry(setup["broker"], registry, topics=Topics(PREFIX)).start()
    state = tmp_path / "state"
    dev = Device(
        setup["broker"], state, setup["keys"], PREFIX, block_size=16 * 1024, max_tries=3, block_timeout_s=1.0
    )
    try:
        with pytest.raises(spec.error) as caught:
            dev.fetcher.fetch(ref)
    finally:
        dev.close()
        reg.close()
    assert caught.value.code == spec.code, caught.value
    assert "\n" not in str(caught.value)
    assert list((state / "bundles").iterdir()) == []  # no bundle, no staging folder
    assert [p.name for p in (state / "objects").iterdir() if p.name.startswith(".")] == []
