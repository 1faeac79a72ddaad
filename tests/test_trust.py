"""The root-signed key set (edgeagent.trust): strict parsing, rollback and expiry refusals,
persistence, and a KeyRing that refuses revoked and expired keys everywhere it is used.
Pure logic with a fake clock; the end-to-end run is in tests/test_security_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent import errors
from edgeagent.bundle.create import create_bundle
from edgeagent.bundle.reader import verify_bundle
from edgeagent.cli.common import build_parser, run
from edgeagent.protocol import DesiredState, open_envelope, sign_document
from edgeagent.signing import KeyRing, SigningKey, generate_keypair, load_public_key
from edgeagent.trust import KeySet, TrustStore, next_keyset, open_keyset, peek_keyset, sign_keyset
from fleet.edgectl import COMMANDS, DESCRIPTION

NOW = 1_800_000_000.0
DAY = 86400


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    folder = tmp_path_factory.mktemp("trust-keys")
    for name in ("root", "old", "new", "other-root"):
        generate_keypair(name, folder)
    return {name: SigningKey.load(folder / f"{name}.key") for name in ("root", "old", "new", "other-root")}


def _pub(key: SigningKey):  # type: ignore[no-untyped-def]
    return key.private.public_key()


def _set(held: KeySet | None, *, add=(), revoke=(), expires=NOW + 365 * DAY, key_expires=None) -> KeySet:  # type: ignore[no-untyped-def]
    return next_keyset(
        held,
        add={k.key_id: _pub(k) for k in add},
        key_expires=None if key_expires is None else int(key_expires),
        remove=[],
        revoke=list(revoke),
        expires=int(expires),
        now=NOW,
    )


def _store(
    tmp_path: Path, keys: dict[str, SigningKey], clock: Clock, ring: KeyRing | None = None
) -> TrustStore:
    return TrustStore(_pub(keys["root"]), tmp_path / "keyset.json", ring or KeyRing(clock=clock), clock=clock)


def test_rotation_then_revocation_changes_what_the_ring_accepts(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    ring = KeyRing([_pub(keys["old"])])  # the trusted_keys folder before the first key set
    store = _store(tmp_path, keys, clock, ring)
    doc = sign_document(DesiredState(seq=1, target="device:d", models={}), keys["old"])
    assert open_envelope(doc, ring).key_id == keys["old"].key_id

    v1 = _set(None, add=[keys["old"], keys["new"]])
    assert store.offer(sign_keyset(v1, keys["root"])) == v1
    assert store.offer(sign_keyset(v1, keys["root"])) is None  # the retained set again: nothing new
    v2 = _set(v1, revoke=[keys["old"].key_id])
    assert store.offer(sign_keyset(v2, keys["root"])) == v2
    with pytest.raises(errors.RevokedKey) as refused:
        open_envelope(doc, ring)
    assert refused.value.code == "revoked_key"
    new_doc = sign_document(DesiredState(seq=2, target="device:d", models={}), keys["new"])
    assert open_envelope(new_doc, ring).key_id == keys["new"].key_id

    # An older set replayed, or another set under a version already held: refused.
    with pytest.raises(errors.KeySetRollback) as rollback:
        store.offer(sign_keyset(v1, keys["root"]))
    assert rollback.value.code == "keyset_rollback"
    forked = v2.model_copy(update={"revoked": []})
    with pytest.raises(errors.KeySetRollback):
        store.offer(sign_keyset(forked, keys["root"]))

    # A restart reloads the held set: the revocation and the version floor survive.
    again = _store(tmp_path, keys, clock)
    assert again.version == 2
    with pytest.raises(errors.RevokedKey):
        open_envelope(doc, again.ring)
    with pytest.raises(errors.KeySetRollback):
        again.offer(sign_keyset(v1, keys["root"]))


def test_expired_sets_and_keys_are_refused(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    store = _store(tmp_path, keys, clock)
    stale = _set(None, add=[keys["new"]], expires=NOW + DAY)
    clock.t = NOW + 2 * DAY
    with pytest.raises(errors.KeySetExpired):
        store.offer(sign_keyset(stale, keys["root"]))
    clock.t = NOW
    short = _set(None, add=[keys["new"]], key_expires=NOW + DAY, expires=NOW + 10 * DAY)
    store.offer(sign_keyset(short, keys["root"]))
    doc = sign_document(DesiredState(seq=1, target="device:d", models={}), keys["new"])
    open_envelope(doc, store.ring)
    clock.t = NOW + DAY  # the key's own expiry
    with pytest.raises(errors.ExpiredKey, match="expired at"):
        open_envelope(doc, store.ring)
    renewed = _set(short, add=[keys["new"]], key_expires=None, expires=NOW + 3 * DAY)
    store.offer(sign_keyset(renewed, keys["root"]))
    open_envelope(doc, store.ring)
    clock.t = NOW + 3 * DAY  # the set's expiry bounds every key in it
    with pytest.raises(errors.ExpiredKey) as expired:
        open_envelope(doc, store.ring)
    assert expired.value.code == "expired_key"


def _tamper(signed: bytes, root: SigningKey, change) -> bytes:  # type: ignore[no-untyped-def]
    """Re-sign a key set whose payload JSON was changed by ``change`` (so only parsing can refuse it)."""
    envelope = json.loads(signed)
    payload = json.loads(envelope["payload"])
    change(payload)
    text = json.dumps(payload)
    sig = root.sign(text.encode())
    import base64

    envelope.update(payload=text, sig=base64.b64encode(sig.signature).decode())
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda p: p.update(version=str(p["version"])), "version"),
        (lambda p: p.update(version=True), "version"),
        (lambda p: p.update(expires=float(p["expires"])), "expires"),
        (lambda p: p.update(extra=1), "extra"),
        (lambda p: p.update(type="other"), "type"),
        (lambda p: p["revoked"].append(next(iter(p["keys"]))), "both trusted and revoked"),
        (lambda p: p["keys"].update({"0" * 16: next(iter(p["keys"].values()))}), "does not match"),
    ],
)
def test_key_sets_parse_strictly(tmp_path: Path, keys, change, needle: str) -> None:  # type: ignore[no-untyped-def]
    signed = sign_keyset(_set(None, add=[keys["new"]]), keys["root"])
    store = _store(tmp_path, keys, Clock())
    with pytest.raises(errors.MalformedMessage, match=needle):
        store.offer(_tamper(signed, keys["root"], change))
    assert store.version is None


def test_only_the_root_signs_key_sets(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    store = _store(tmp_path, keys, Clock())
    v1 = _set(None, add=[keys["new"]])
    for signer in (keys["new"], keys["other-root"]):
        with pytest.raises(errors.UnknownKey):
            store.offer(sign_keyset(v1, signer))
    envelope = json.loads(sign_keyset(v1, keys["root"]))
    with pytest.raises(errors.MissingSignature):
        store.offer(json.dumps({"v": 1, "payload": envelope["payload"]}).encode())
    envelope["v"] = True  # True == 1 in Python; strict parsing must not care
    with pytest.raises(errors.MalformedMessage):
        store.offer(json.dumps(envelope).encode())
    assert store.offer(b"") is None  # a cleared retained message
    assert peek_keyset(sign_keyset(v1, keys["other-root"])).version == 1  # the host's look, unverified


def test_a_damaged_held_set_fails_closed(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    store = _store(tmp_path, keys, Clock())
    store.offer(sign_keyset(_set(None, add=[keys["new"]]), keys["root"]))
    (tmp_path / "keyset.json").write_bytes(b"{garbage")
    ring = KeyRing([_pub(keys["old"])])  # the folder: must not be trusted again
    again = _store(tmp_path, keys, Clock(), ring)
    assert again.version is None and len(ring) == 0


def test_a_bundle_signed_by_a_revoked_key_is_refused(tmp_path: Path, keys, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    created = create_bundle(
        name="d", version="1.0.0", models=[model_dir / "mlp.onnx"], key=keys["old"], out_dir=tmp_path
    )
    ring = KeyRing([_pub(keys["old"])])
    verify_bundle(created.path, ring)
    v1 = _set(None, add=[keys["new"]], revoke=[keys["old"].key_id])
    assert open_keyset(sign_keyset(v1, keys["root"]), KeyRing([_pub(keys["root"])])) == v1
    v1.apply_to(ring)
    with pytest.raises(errors.RevokedKey):
        verify_bundle(created.path, ring)


def _edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


def test_edgectl_keys_rotate_and_revoke(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for name in ("root", "release", "release-2"):
        assert _edgectl("keys", "generate", "--name", name, "--out", tmp_path) == 0
    root = SigningKey.load(tmp_path / "root.key")
    ks = tmp_path / "keyset.json"
    assert (
        _edgectl(
            "keys", "rotate", "--root", tmp_path / "root.key", "--set", ks, "--add", tmp_path / "release.pub"
        )
        == 0
    )
    assert _edgectl(
        "keys", "rotate", "--root", tmp_path / "root.key", "--set", ks,
        "--add", tmp_path / "release-2.pub", "--key-expires", "2099-01-01", "--expires", "30d",
    ) == 0  # fmt: skip
    old = SigningKey.load(tmp_path / "release.key").key_id
    assert _edgectl("keys", "revoke", "--root", tmp_path / "root.key", "--set", ks, old) == 0
    keyset = open_keyset(ks.read_bytes(), KeyRing([root.private.public_key()]))
    new = SigningKey.load(tmp_path / "release-2.key").key_id
    assert (keyset.version, sorted(keyset.keys), keyset.revoked) == (3, [new], [old])
    assert keyset.keys[new].expires == 4070908800
    capsys.readouterr()
    # One-line refusals: a revoked key cannot come back; another root cannot extend the set;
    # the root cannot be a release key.
    cases = [
        (
            ["rotate", "--root", tmp_path / "root.key", "--set", ks, "--add", tmp_path / "release.pub"],
            "is revoked",
        ),
        (["rotate", "--root", tmp_path / "release.key", "--set", ks], "not a key set signed by root key"),
        (
            ["rotate", "--root", tmp_path / "root.key", "--set", ks, "--add", tmp_path / "root.pub"],
            "root key",
        ),
        (["rotate", "--root", tmp_path / "root.key", "--set", ks, "--expires", "tomorrow"], "not a date"),
        (["rotate", "--root", tmp_path / "root.key", "--set", tmp_path / "empty.json"], "no release key"),
    ]
    for argv, needle in cases:
        assert _edgectl("keys", *argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert open_keyset(ks.read_bytes(), KeyRing([load_public_key(tmp_path / "root.pub")])).version == 3
