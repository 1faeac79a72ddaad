"""Trust that can change: an offline root key signs the set of release keys (small, TUF-style).

A **key set** names the release keys a device trusts (each with an optional expiry), the
key ids it revokes, its own version and its own expiry; the root key signs it in the same
envelope as desired documents (docs/security.md). A device configured with ``trust_root``
(the root's public key) accepts a key set from the retained topic ``edge/v1/trust`` only if:

* the root key signed it, and it parses strictly (unknown fields and wrong types refused);
* its version is newer than the one the device holds (an older one is a rollback, refused;
  the same one again is nothing new);
* it has not expired.

It then persists it (``state_dir/keyset.json``) and replaces the agent's :class:`KeyRing`
with its keys, so every later check of a bundle, desired document or command refuses a
revoked key (``revoked_key``), an expired one, or any key once the set itself has expired
(``expired_key``). Until a first key set arrives, the ``trusted_keys`` folder is the ring, as
without a trust root. The root key never signs bundles or documents: it only signs key sets,
so it can stay offline.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeagent.errors import (
    BadSignature,
    KeySetExpired,
    KeySetRollback,
    MalformedMessage,
    MissingSignature,
    SignatureError,
    UsageError,
)
from edgeagent.signing import KeyRing, Signature, SigningKey, key_id, utc_text
from edgeagent.storage import atomic_write_bytes

log = logging.getLogger(__name__)

KEYSET_TYPE = "edge-keyset"
MAX_KEYSET_BYTES = 64 * 1024
MAX_KEYS = 256
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
UnixTime = Annotated[int, Field(ge=0, le=2**40)]


class KeyEntry(BaseModel):
    """One release key: its raw Ed25519 public key (base64) and an optional expiry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    public: str = Field(description="Base64 of the raw 32-byte Ed25519 public key.")
    expires: UnixTime | None = Field(default=None, description="Unix time after which it is refused.")

    def public_key(self) -> Ed25519PublicKey:
        try:
            raw = base64.b64decode(self.public, validate=True)
            return Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"public key is not base64 of 32 raw bytes ({exc})") from None


class KeySet(BaseModel):
    """The root-signed set of release keys (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1] = 1
    type: Literal["edge-keyset"] = "edge-keyset"
    version: int = Field(ge=1, le=2**53, description="Grows by one per change; older ones are refused.")
    expires: UnixTime = Field(description="Unix time after which the whole set is refused.")
    issued_at: UnixTime = Field(description="Unix time it was signed (informational).")
    keys: dict[KeyId, KeyEntry] = Field(max_length=MAX_KEYS, description="key id -> release key.")
    revoked: list[KeyId] = Field(default_factory=list, max_length=4096, description="Refused key ids.")

    @model_validator(mode="after")
    def _consistent(self) -> KeySet:
        for kid, entry in self.keys.items():
            if key_id(entry.public_key()) != kid:
                raise ValueError(f"key {kid}: the id does not match its public key")
        if both := sorted(set(self.keys) & set(self.revoked)):
            raise ValueError(f"keys both trusted and revoked: {', '.join(both)}")
        return self

    def expiries(self) -> dict[str, float]:
        """key id -> when it stops being trusted: its own expiry or the set's, whichever is first."""
        return {kid: float(min(e.expires or self.expires, self.expires)) for kid, e in self.keys.items()}

    def apply_to(self, ring: KeyRing) -> None:
        ring.replace(
            [e.public_key() for e in self.keys.values()], revoked=self.revoked, expires=self.expiries()
        )

    def summary(self) -> str:
        return (
            f"key set version {self.version}, expires {utc_text(self.expires)}: "
            f"keys {', '.join(sorted(self.keys)) or 'none'}; revoked {', '.join(self.revoked) or 'none'}"
        )


def sign_keyset(keyset: KeySet, root: SigningKey) -> bytes:
    """The signed envelope of ``keyset`` (what is published retained and kept in files)."""
    payload = keyset.model_dump_json()
    sig = root.sign(payload.encode("utf-8"))
    envelope = {
        "v": 1,
        "payload": payload,
        "key_id": sig.key_id,
        "sig": base64.b64encode(sig.signature).decode("ascii"),
    }
    return (json.dumps(envelope) + "\n").encode("utf-8")


def open_keyset(data: bytes, root: KeyRing) -> KeySet:
    """Verify a signed key set against the root and parse it strictly; raise with one line."""
    payload, signature = _envelope(data)
    root.verify(payload.encode("utf-8"), signature)
    return _parse(payload)


def peek_keyset(data: bytes) -> KeySet:
    """Parse a signed key set without checking the signature (a host's sanity check)."""
    return _parse(_envelope(data)[0])


def _envelope(data: bytes) -> tuple[str, Signature]:
    if len(data) > MAX_KEYSET_BYTES:
        raise MalformedMessage(f"key set of {len(data)} bytes is over {MAX_KEYSET_BYTES}")
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"key set is not JSON ({exc})") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"v", "payload", "key_id", "sig"}:
        if isinstance(envelope, dict) and not {"key_id", "sig"} & set(envelope):
            raise MissingSignature("key set is not signed")
        raise MalformedMessage("a key set envelope has exactly the fields v, payload, key_id, sig")
    payload, kid, sig = envelope["payload"], envelope["key_id"], envelope["sig"]
    # type() rather than ==: True == 1 in Python, and host-to-device fields are strict.
    if type(envelope["v"]) is not int or envelope["v"] != 1:
        raise MalformedMessage("key set envelope: v must be 1")
    if not all(isinstance(x, str) for x in (payload, kid, sig)):
        raise MalformedMessage("key set envelope: payload, key_id and sig must be strings")
    try:
        raw_sig = base64.b64decode(sig, validate=True)
    except binascii.Error as exc:
        raise BadSignature("key set signature is not base64") from exc
    return payload, Signature(key_id=kid, signature=raw_sig)


def _parse(payload: str) -> KeySet:
    try:
        return KeySet.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise MalformedMessage(f"key set: {where}: {first['msg']}") from exc


class TrustStore:
    """The device's current key set: loaded at start, replaced by newer root-signed ones."""

    def __init__(
        self,
        root: Ed25519PublicKey,
        state_file: Path,
        ring: KeyRing,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = KeyRing([root])  # a flat ring: the root key is never revoked by a key set
        self.state_file = state_file
        self.ring = ring
        self.current: KeySet | None = None
        self._clock = clock
        self._load()

    @property
    def version(self) -> int | None:
        return self.current.version if self.current else None

    def _load(self) -> None:
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return  # no key set yet: the trusted_keys folder is the ring
        try:
            self.current = open_keyset(data, self.root)
        except (MalformedMessage, SignatureError) as exc:
            # Fail closed: falling back to the folder could trust a key a lost set revoked.
            log.error(
                "%s is unusable (%s); trusting no key until a new key set arrives", self.state_file, exc
            )
            self.ring.replace([])
            return
        self.current.apply_to(self.ring)
        log.info("trust: %s", self.current.summary())

    def offer(self, data: bytes) -> KeySet | None:
        """Accept a newer key set (returned) or None when it is the one held; raise on refusal.

        Raises MalformedMessage, a SignatureError (not signed by the root), KeySetRollback or
        KeySetExpired. An empty payload (a cleared retained message) changes nothing.
        """
        if not data:
            return None
        keyset = open_keyset(data, self.root)
        held = self.current
        if held is not None and keyset.version <= held.version:
            if keyset == held:
                return None
            raise KeySetRollback(
                f"key set version {keyset.version} is not newer than the held version {held.version}"
            )
        if keyset.expires <= self._clock():
            raise KeySetExpired(f"key set version {keyset.version} expired at {utc_text(keyset.expires)}")
        atomic_write_bytes(self.state_file, data)  # before use: a restart must not forget a revocation
        self.current = keyset
        keyset.apply_to(self.ring)
        log.warning("trust: accepted %s", keyset.summary())
        return keyset


def device_trust(trust_root: Path | None, state_dir: Path, ring: KeyRing) -> TrustStore | None:
    """The agent's trust store when ``trust_root`` is configured (else None: a flat folder)."""
    if trust_root is None:
        return None
    from edgeagent.signing import load_public_key

    return TrustStore(load_public_key(trust_root), state_dir / "keyset.json", ring)


# --- the operator's side (edgectl keys rotate / revoke) -----------------------------------


def read_keyset_file(path: Path, root: SigningKey) -> KeySet | None:
    """The key set in ``path`` (checked against ``root``), or None when the file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the key set ({exc.strerror})") from exc
    try:
        return open_keyset(data, KeyRing([root.private.public_key()]))
    except (MalformedMessage, SignatureError) as exc:
        raise UsageError(f"{path}: not a key set signed by root key {root.key_id} ({exc})") from exc


def next_keyset(
    held: KeySet | None,
    *,
    add: dict[str, Ed25519PublicKey],
    key_expires: int | None,
    remove: list[str],
    revoke: list[str],
    expires: int,
    now: float,
) -> KeySet:
    """The next version of ``held``: keys added (with ``key_expires``), removed or revoked."""
    keys = dict(held.keys) if held else {}
    revoked = list(held.revoked) if held else []
    for kid, public in add.items():
        if kid in revoked:
            raise UsageError(f"key {kid} is revoked; a revoked key cannot be trusted again")
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys[kid] = KeyEntry(public=base64.b64encode(raw).decode("ascii"), expires=key_expires)
    for kid in remove + revoke:
        if kid not in keys and kid not in revoke:
            raise UsageError(f"key {kid} is not in the key set (keys: {', '.join(sorted(keys)) or 'none'})")
        keys.pop(kid, None)
    revoked += [kid for kid in revoke if kid not in revoked]
    if not keys and not revoke:  # a revocation may empty it on purpose: an emergency stop
        raise UsageError("the key set would trust no release key; add one with --add PUB")
    if expires <= now:
        raise UsageError(f"the key set would expire at {utc_text(expires)}, which is not in the future")
    try:
        return KeySet(
            version=(held.version if held else 0) + 1,
            expires=expires,
            issued_at=int(now),
            keys=keys,
            revoked=revoked,
        )
    except ValidationError as exc:
        raise UsageError(f"key set: {exc.errors()[0]['msg']}") from exc


def write_keyset_file(path: Path, signed: bytes) -> None:
    try:
        atomic_write_bytes(path, signed)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the key set ({exc.strerror})") from exc
