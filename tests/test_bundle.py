"""Bundle round trip on the real fixture models: create -> verify -> inspect -> extract,
reproducibility, and model specs read from the model files themselves."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeagent import errors
from edgeagent.bundle import AcceptanceGate, extract_bundle, parse_manifest, verify_bundle
from edgeagent.bundle.create import create_bundle
from edgeagent.bundle.reader import read_manifest_unverified
from edgeagent.signing import KeyRing, Signature, load_public_key


@pytest.fixture(scope="module")
def golden(tmp_path_factory, digits, model_dir):  # type: ignore[no-untyped-def]
    """100 test digits with labels and the fp32 ONNX model's reference logits."""
    ort = pytest.importorskip("onnxruntime")
    from converter.datasets import flat

    x = flat(digits.x_test[:100]).astype(np.float32)
    session = ort.InferenceSession(str(model_dir / "mlp.onnx"), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    path = tmp_path_factory.mktemp("golden") / "golden.npz"
    np.savez(path, inputs=x, labels=digits.y_test[:100].astype(np.int64), reference=reference)
    return path


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("".join(f"digit {i}\n" for i in range(10)))
    return path


def _create(out: Path, keypair, model_dir: Path, golden: Path, labels: Path, version: str = "1.0.0"):  # type: ignore[no-untyped-def]
    return create_bundle(
        name="digits",
        version=version,
        models=[model_dir / "mlp.onnx", model_dir / "mlp_int8.tflite"],
        key=keypair.load(),
        out_dir=out,
        golden=golden,
        labels=labels,
        description="digits MLP",
        gate=AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95, latency_p95_ms={"rpi4": 5.0}),
    )


def test_round_trip(tmp_path: Path, keypair, model_dir, golden, labels) -> None:  # type: ignore[no-untyped-def]
    created = _create(tmp_path / "out", keypair, model_dir, golden, labels)
    assert created.path == tmp_path / "out" / "digits-1.0.0.bundle"
    assert created.sha256 == hashlib.sha256(created.path.read_bytes()).hexdigest()

    ring = KeyRing([load_public_key(keypair.public)])
    verified = verify_bundle(created.path, ring)
    assert verified.sha256 == created.sha256
    assert verified.signed_by == keypair.key_id
    assert verified.manifest == created.manifest

    manifest, key = read_manifest_unverified(created.path)
    assert manifest == created.manifest and key == keypair.key_id

    dest = tmp_path / "store" / created.sha256
    extract_bundle(created.path, dest, ring)
    for entry in created.manifest.files:
        data = (dest / entry.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert stat.S_IMODE((dest / entry.path).stat().st_mode) == 0o444
    assert (dest / "models" / "mlp.onnx").read_bytes() == (model_dir / "mlp.onnx").read_bytes()
    # The installed copy keeps the signed manifest, so it can be re-verified after a restart.
    sig = Signature.from_json((dest / "manifest.sig").read_bytes())
    ring.verify((dest / "manifest.json").read_bytes(), sig)
    assert parse_manifest((dest / "manifest.json").read_bytes()) == created.manifest
    with np.load(dest / "acceptance" / "golden.npz") as data:
        assert data["inputs"].shape == (100, 64)


def test_model_specs_come_from_the_model_files(tmp_path: Path, keypair, model_dir, golden, labels) -> None:  # type: ignore[no-untyped-def]
    manifest = _create(tmp_path, keypair, model_dir, golden, labels).manifest
    onnx_entry, tflite_entry = manifest.models
    assert (onnx_entry.format, onnx_entry.precision, onnx_entry.runtimes) == ("onnx", "fp32", ["onnxruntime"])
    assert onnx_entry.inputs[0].name == "input"
    assert onnx_entry.inputs[0].shape == [None, 64]
    assert onnx_entry.inputs[0].dtype == "float32"
    assert onnx_entry.outputs[0].shape == [None, 10]
    assert (tflite_entry.format, tflite_entry.precision, tflite_entry.runtimes) == (
        "tflite",
        "int8",
        ["litert"],
    )
    q = tflite_entry.inputs[0].quantization
    assert tflite_entry.inputs[0].dtype == "int8"
    assert q is not None and q.scale[0] > 0 and -128 <= q.zero_point[0] <= 127
    assert tflite_entry.outputs[0].dtype == "int8"
    gate = manifest.acceptance
    assert (gate.golden, gate.samples, gate.min_accuracy) == ("acceptance/golden.npz", 100, 0.9)
    assert manifest.labels == "labels.txt"


def test_same_inputs_give_the_same_bytes(
    tmp_path: Path, keypair, model_dir, golden, labels, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a = _create(tmp_path / "a", keypair, model_dir, golden, labels)
    os.utime(golden, (1, 1))  # file mtimes must not leak into the bundle
    b = _create(tmp_path / "b", keypair, model_dir, golden, labels)
    assert a.sha256 == b.sha256
    assert a.path.read_bytes() == b.path.read_bytes()


def test_source_date_epoch_stamps_members(
    tmp_path: Path, keypair, model_dir, golden, labels, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    plain = _create(tmp_path / "plain", keypair, model_dir, golden, labels)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = _create(tmp_path / "stamped", keypair, model_dir, golden, labels)
    again = _create(tmp_path / "again", keypair, model_dir, golden, labels)
    assert stamped.sha256 != plain.sha256
    assert stamped.sha256 == again.sha256
    with tarfile.open(stamped.path) as tar:
        members = tar.getmembers()
    assert {m.mtime for m in members} == {1700000000}
    assert {(m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, "", "", 0o644)}
    names = [m.name for m in members]
    assert names[:2] == ["manifest.json", "manifest.sig"]
    assert names[2:] == sorted(names[2:])

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(errors.UsageError, match="SOURCE_DATE_EPOCH"):
        _create(tmp_path / "bad", keypair, model_dir, golden, labels)
    assert not (tmp_path / "bad" / "digits-1.0.0.bundle").exists()


def test_golden_must_fit_the_model(tmp_path: Path, keypair, model_dir) -> None:  # type: ignore[no-untyped-def]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, inputs=np.zeros((5, 8, 8, 1), np.float32))
    with pytest.raises(errors.UsageError, match=r"sample shape \[8, 8, 1\].*\[64\]"):
        create_bundle(
            name="d",
            version="1.0.0",
            models=[model_dir / "mlp.onnx"],
            key=keypair.load(),
            out_dir=tmp_path,
            golden=wrong,
        )
    odd = tmp_path / "odd.npz"
    np.savez(odd, x=np.zeros((5, 64), np.float32))
    with pytest.raises(errors.UsageError, match="'inputs'"):
        create_bundle(
            name="d",
            version="1.0.0",
            models=[model_dir / "mlp.onnx"],
            key=keypair.load(),
            out_dir=tmp_path,
            golden=odd,
        )
    assert list(tmp_path.glob("*.bundle")) == []


def test_cnn_models_carry_their_nhwc_specs(tmp_path: Path, keypair, model_dir) -> None:  # type: ignore[no-untyped-def]
    created = create_bundle(
        name="digits-cnn",
        version="2.0.0-rc.1",
        models=[model_dir / "cnn.onnx", model_dir / "cnn.tflite"],
        key=keypair.load(),
        out_dir=tmp_path,
    )
    onnx_entry, tflite_entry = created.manifest.models
    assert onnx_entry.inputs[0].shape == [None, 8, 8, 1]
    assert tflite_entry.inputs[0].shape[1:] == [8, 8, 1]
    assert tflite_entry.precision == "fp32"
    assert created.path.name == "digits-cnn-2.0.0-rc.1.bundle"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": "1.0"}, "semantic version"),
        ({"name": "bad name"}, "name"),
        ({"models": []}, "at least one"),
    ],
)
def test_bad_create_arguments(tmp_path: Path, keypair, model_dir, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    args = {
        "name": "d",
        "version": "1.0.0",
        "models": [model_dir / "mlp.onnx"],
        "key": keypair.load(),
        "out_dir": tmp_path,
    }
    args.update(kwargs)
    with pytest.raises(errors.UsageError, match=message):
        create_bundle(**args)


def test_inspect_json_is_the_manifest(tmp_path: Path, keypair, model_dir, golden, labels) -> None:  # type: ignore[no-untyped-def]
    created = _create(tmp_path, keypair, model_dir, golden, labels)
    body = json.loads(created.manifest.to_bytes())
    assert body["schema_version"] == 1
    assert [f["path"] for f in body["files"]] == sorted(f["path"] for f in body["files"])
