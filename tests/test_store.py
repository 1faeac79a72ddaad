"""The store on a real disk: the integrity check of installed bundles and garbage collection."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgeagent.bundle.create import create_bundle
from edgeagent.deploy import DeviceStore, Journal, JournalFile, State
from edgeagent.protocol import BundleRef
from edgeagent.signing import KeyRing, SigningKey, load_public_key
from edgeagent.store import Store


def _installed(tmp_path: Path, keypair, model_dir: Path, version: str) -> tuple[DeviceStore, str]:  # type: ignore[no-untyped-def]
    created = create_bundle(
        name="digits",
        version=version,
        models=[model_dir / "mlp.onnx"],
        key=SigningKey.load(keypair.private),
        out_dir=tmp_path / "out",
    )
    trusted = KeyRing([load_public_key(keypair.public)])
    store = DeviceStore(Store(tmp_path / "state"), trusted, allow_unsigned=False, keep_bundles=2)
    store.store.install(created.path, created.sha256, trusted)
    return store, created.sha256


def test_an_intact_bundle_passes_and_any_change_is_named(tmp_path: Path, keypair, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    store, sha = _installed(tmp_path, keypair, model_dir, "1.0.0")
    assert store.check_bundle(sha) is None
    folder = store.store.bundle_dir(sha)
    model = folder / "models" / "mlp.onnx"
    model.chmod(0o644)
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.write_bytes(bytes(data))
    assert store.check_bundle(sha) == "models/mlp.onnx does not match its sha256 in the manifest"
    model.unlink()
    assert (store.check_bundle(sha) or "").startswith("cannot read the bundle")
    # A manifest edited to match the changed file fails its signature.
    manifest = folder / "manifest.json"
    manifest.chmod(0o644)
    body = json.loads(manifest.read_bytes())
    body["description"] = "edited"
    manifest.write_text(json.dumps(body))
    assert (store.check_bundle(sha) or "").startswith("manifest:")


def test_garbage_collection_keeps_history_links_and_work_in_progress(
    tmp_path: Path, keypair, model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    store, old = _installed(tmp_path, keypair, model_dir, "1.0.0")
    shas = [old]
    for i, version in enumerate(["1.1.0", "1.2.0", "1.3.0"], start=1):
        created = create_bundle(
            name="digits",
            version=version,
            models=[model_dir / "mlp.onnx"],
            key=SigningKey.load(keypair.private),
            out_dir=tmp_path / "out",
        )
        store.store.install(created.path, created.sha256, store.trusted)
        os.utime(store.store.bundle_dir(created.sha256), (1000 + i, 1000 + i))
        shas.append(created.sha256)
    os.utime(store.store.bundle_dir(old), (1000, 1000))
    store.set_link("default", "current", shas[1])
    store.set_link("default", "previous", old)
    downloads = store.store.downloads
    (downloads / f"{'d' * 64}.part").write_bytes(b"aborted")
    (downloads / f"{'e' * 64}.part").write_bytes(b"a retry will resume this")
    ref = BundleRef(name="digits", version="2.0.0", sha256="e" * 64, size=100)
    JournalFile(store.store.journal_dir, "other").save(Journal("other", State.IDLE, ref, retry_at=5.0))

    store.collect_garbage(keep=set())
    left = sorted(p.name for p in store.store.bundles.iterdir())
    # keep_bundles=2: current and previous stay; the newest unreferenced ones beyond that go.
    assert left == sorted([old, shas[1]])
    assert sorted(p.name for p in downloads.iterdir()) == [f"{'e' * 64}.part"]
