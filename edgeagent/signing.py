"""Ed25519 keys, signatures and the set of trusted public keys.

The same keys sign bundles (``manifest.sig``) and, later, desired-state documents and
commands. Files are PEM (PKCS#8 private, SubjectPublicKeyInfo public) so that ``openssl``
can read them too. A key id is the first 16 hex digits of the sha256 of the raw 32-byte
public key: short enough to read, long enough not to collide in one fleet.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeagent.errors import BadSignature, ExpiredKey, KeyFileError, RevokedKey, UnknownKey, UsageError

ALGORITHM = "ed25519"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Stable short id of a public key (16 lowercase hex digits)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """A private key with the id of its public half."""

    private: Ed25519PrivateKey
    key_id: str

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a PEM private key written by :func:`generate_keypair`."""
        data = _read_key_file(path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})", path=str(path)) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 private key", path=str(path))
        return cls(private=key, key_id=key_id(key.public_key()))

    def sign(self, data: bytes) -> Signature:
        return Signature(key_id=self.key_id, signature=self.private.sign(data))


@dataclass(frozen=True)
class Signature:
    """A detached signature and the id of the key that made it."""

    key_id: str
    signature: bytes
    algorithm: str = ALGORITHM

    def to_json(self) -> bytes:
        body = {
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return (json.dumps(body, sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Signature:
        """Parse ``manifest.sig``; anything malformed is a :class:`BadSignature`."""
        try:
            body = json.loads(data)
            algorithm = body["algorithm"]
            kid = body["key_id"]
            sig = base64.b64decode(body["signature"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadSignature(f"signature file is malformed ({exc.__class__.__name__}: {exc})") from exc
        if algorithm != ALGORITHM:
            raise BadSignature(f"signature algorithm {algorithm!r} is not {ALGORITHM!r}")
        if not isinstance(kid, str) or len(sig) != 64:
            raise BadSignature("signature file is malformed (key_id or signature length)")
        return cls(key_id=kid, signature=sig, algorithm=algorithm)


@dataclass(frozen=True)
class _Trust:
    """One consistent view of a ring: swapped whole, so a check never sees half an update."""

    keys: Mapping[str, Ed25519PublicKey]
    revoked: frozenset[str] = frozenset()
    expires: Mapping[str, float] = field(default_factory=dict)  # key id -> Unix time


class KeyRing:
    """The public keys a reader trusts, by key id.

    A flat ring (keys added from a folder) trusts its keys forever. A device with a trust
    root (:mod:`edgeagent.trust`) replaces the whole ring with each root-signed key set it
    accepts, which can also revoke keys and give them an expiry; every verification, of
    bundles, desired documents and commands alike, then refuses a revoked or expired key.
    """

    def __init__(
        self, keys: Iterable[Ed25519PublicKey] = (), *, clock: Callable[[], float] = time.time
    ) -> None:
        self._trust = _Trust({})
        self._clock = clock
        for key in keys:
            self.add(key)

    def add(self, key: Ed25519PublicKey) -> str:
        kid = key_id(key)
        current = self._trust
        self._trust = _Trust({**current.keys, kid: key}, current.revoked, current.expires)
        return kid

    def replace(
        self,
        keys: Iterable[Ed25519PublicKey],
        *,
        revoked: Iterable[str] = (),
        expires: Mapping[str, float] | None = None,
    ) -> None:
        """Trust exactly ``keys`` from now on, refusing the ``revoked`` ids and expired ones."""
        self._trust = _Trust({key_id(k): k for k in keys}, frozenset(revoked), dict(expires or {}))

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> KeyRing:
        """Load ``.pub`` files; a folder contributes every ``*.pub`` inside it."""
        ring = cls()
        for path in paths:
            files = sorted(path.glob(f"*{PUBLIC_SUFFIX}")) if path.is_dir() else [path]
            for file in files:
                ring.add(load_public_key(file))
        return ring

    def __contains__(self, kid: object) -> bool:
        return kid in self._trust.keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._trust.keys))

    def __len__(self) -> int:
        return len(self._trust.keys)

    def verify(self, data: bytes, signature: Signature) -> None:
        """Raise :class:`UnknownKey`, :class:`RevokedKey`, :class:`ExpiredKey` or
        :class:`BadSignature` unless a trusted key's ``signature`` signs ``data``."""
        trust = self._trust
        kid = signature.key_id
        if kid in trust.revoked:
            raise RevokedKey(f"signed by key {kid}, which the current key set revokes")
        key = trust.keys.get(kid)
        if key is None:
            trusted = ", ".join(sorted(trust.keys)) or "none"
            raise UnknownKey(f"signed by key {kid}, which is not trusted (trusted: {trusted})")
        expiry = trust.expires.get(kid)
        if expiry is not None and self._clock() >= expiry:
            raise ExpiredKey(f"signed by key {kid}, which expired at {utc_text(expiry)}")
        try:
            key.verify(signature.signature, data)
        except InvalidSignature as exc:
            raise BadSignature(f"signature by key {kid} does not match the manifest") from exc


def utc_text(unix_s: float) -> str:
    """A Unix time as ISO 8601 UTC to the second, for messages."""
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).isoformat(timespec="seconds")


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})", path=str(path)) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key", path=str(path))
    return key


def generate_keypair(name: str, out_dir: Path) -> tuple[Path, Path, str]:
    """Write ``out_dir/name.key`` (mode 0600) and ``out_dir/name.pub``; never overwrite.

    Returns (private path, public path, key id).
    """
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"key name {name!r} must be a plain file name")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, or no permission
        raise UsageError(f"{out_dir}: cannot make a folder for the keys ({exc.strerror})") from exc
    priv_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    pub_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (priv_path, pub_path):
        if path.exists():
            raise UsageError(f"{path} already exists; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    priv_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL closes the race between the exists() check and the write; 0600 from the start
    # so the private key is never readable by others, not even briefly.
    _write_new(priv_path, priv_pem, 0o600)
    try:
        _write_new(pub_path, pub_pem, 0o644)
    except BaseException:
        priv_path.unlink(missing_ok=True)
        raise
    return priv_path, pub_path, key_id(private.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise UsageError(f"{path} already exists; refusing to overwrite a key") from exc
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file", path=str(path)) from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key ({exc.strerror})", path=str(path)) from exc
