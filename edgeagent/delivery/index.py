"""The delivery index: which objects make up a bundle, in which wire form (docs/bundle.md).

One JSON object, sorted keys, at most 1 MiB, itself fetched by the sha256 the signed desired
document names. It maps every member of the bundle (``manifest.json``, ``manifest.sig`` and
every file) to its plain sha256 and size, its wire encoding, sha256 and size, and the sha256
of each ``block_size`` slice of the wire bytes. It is checked against the signed manifest
before any file it names is fetched: a plain hash or size that differs, or a name the
manifest does not list, refuses the whole index.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeagent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, MemberPath
from edgeagent.errors import IndexMismatch, SizeLimitExceeded

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MAX_INDEX_BYTES = 1 << 20
DEFAULT_BLOCK_SIZE = 64 * 1024  # fits every broker profile, AWS IoT Core's 128 KB included
INDEX_SUFFIX = ".index.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IndexFile(_Strict):
    sha256: Sha256Hex = Field(description="sha256 of the plain bytes (the manifest's).")
    size: int = Field(ge=0, description="Plain size in bytes.")
    encoding: Literal["identity", "xz"]
    wire_sha256: Sha256Hex = Field(description="sha256 of the wire bytes: the object's name.")
    wire_size: int = Field(ge=0, description="Wire size in bytes.")
    blocks: list[Sha256Hex] = Field(description="sha256 of each block_size slice of the wire bytes.")


class DeliveryIndex(_Strict):
    v: Literal[1] = 1
    bundle: Sha256Hex = Field(description="sha256 of the .bundle archive: the bundle's id.")
    name: str
    version: str
    block_size: int = Field(ge=4096, le=262144)
    files: dict[MemberPath, IndexFile]

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no spaces (the same index always has one sha256)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()

    def check_blocks(self) -> None:
        """Every file has one block hash per block of its wire bytes."""
        for path, entry in self.files.items():
            n = max(1, -(-entry.wire_size // self.block_size))
            if len(entry.blocks) != n:
                raise IndexMismatch(f"index lists {len(entry.blocks)} block hashes for {path}, not {n}")

    def check_against(self, manifest: Manifest, manifest_bytes: bytes) -> None:
        """Refuse an index that disagrees with the signed manifest (IndexMismatch)."""
        if (manifest.name, manifest.version) != (self.name, self.version):
            raise IndexMismatch(
                f"index is for {self.name} {self.version}, the manifest is {manifest.name} {manifest.version}"
            )
        listed = {f.path: f for f in manifest.files}
        for path, entry in self.files.items():
            if path in (MANIFEST_NAME, SIGNATURE_NAME):
                continue
            signed = listed.get(path)
            if signed is None:
                raise IndexMismatch(
                    f"index names {path}, which the signed manifest does not list", member=path
                )
            if (signed.sha256, signed.size) != (entry.sha256, entry.size):
                raise IndexMismatch(f"index and manifest disagree about {path}", member=path)
        missing = sorted(set(listed) - set(self.files))
        if missing:
            raise IndexMismatch(f"index lacks {missing[0]}, which the manifest lists", member=missing[0])
        own = self.files[MANIFEST_NAME]
        if (own.sha256, own.size) != (hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes)):
            raise IndexMismatch("index and manifest.json disagree", member=MANIFEST_NAME)


def parse_index(data: bytes) -> DeliveryIndex:
    """Parse index bytes (already checked against the sha256 the desired doc names)."""
    if len(data) > MAX_INDEX_BYTES:
        raise SizeLimitExceeded(f"delivery index is {len(data)} bytes; the bound is {MAX_INDEX_BYTES}")
    try:
        index = DeliveryIndex.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise IndexMismatch(f"delivery index: {where}: {first['msg']}") from exc
    if MANIFEST_NAME not in index.files:
        raise IndexMismatch(f"delivery index lacks {MANIFEST_NAME}", member=MANIFEST_NAME)
    index.check_blocks()
    return index
