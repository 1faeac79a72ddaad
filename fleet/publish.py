"""``edgectl registry publish``: a bundle as content-addressed objects, in a folder, over HTTP PUT
or in an S3-compatible bucket (docs/bundle.md, "Delivery by content").

Layout, whatever the store::

    bundles/<bundle sha256>.bundle   the archive (whole-bundle path, old agents)
    objects/<wire sha256>            each member in its wire form, and the delivery index

Objects are immutable and named by their content, so publishing is idempotent and an object
already there is never sent again; the index goes last, so a device that can read the index
finds every object it names.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from edgeagent.bundle.reader import read_manifest_unverified
from edgeagent.delivery.codec import encode
from edgeagent.delivery.index import DEFAULT_BLOCK_SIZE, DeliveryIndex, IndexFile
from edgeagent.errors import UsageError
from edgeagent.protocol import IndexRef, PresignedSource
from edgeagent.storage import atomic_write_bytes, hash_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    index: IndexRef
    bundle_sha256: str
    objects: int  # objects the bundle needs (index included)
    uploaded: int  # of those, how many were sent (the rest were there already)
    wire_bytes: int  # bytes of every object of this bundle
    plain_bytes: int


class Destination(Protocol):
    def exists(self, key: str) -> bool: ...
    def put(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...


def members(bundle: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every member of a bundle, in archive order."""
    with tarfile.open(bundle, mode="r:") as tar:
        for member in tar:
            fh = tar.extractfile(member)
            if fh is not None:
                yield member.name, fh.read()


def build(bundle: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[DeliveryIndex, dict[str, bytes]]:
    """The delivery index of ``bundle`` and its objects (wire sha256 -> wire bytes)."""
    manifest, _key = read_manifest_unverified(bundle)  # the whole archive checked against its manifest
    sha256 = hash_file(bundle)[1]
    files: dict[str, IndexFile] = {}
    objects: dict[str, bytes] = {}
    for name, data in members(bundle):
        encoding, wire = encode(data)
        wire_sha = hashlib.sha256(wire).hexdigest()
        blocks = [
            hashlib.sha256(wire[i : i + block_size]).hexdigest() for i in range(0, len(wire), block_size)
        ]
        files[name] = IndexFile(
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            encoding=encoding,
            wire_sha256=wire_sha,
            wire_size=len(wire),
            blocks=blocks or [hashlib.sha256(b"").hexdigest()],
        )
        objects[wire_sha] = wire
    index = DeliveryIndex(
        bundle=sha256, name=manifest.name, version=manifest.version, block_size=block_size, files=files
    )
    return index, objects


def publish(bundle: Path, dest: Destination, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Published:
    """Put ``bundle``, its objects and its index into ``dest``; return the index's reference."""
    index, objects = build(bundle, block_size)
    index_bytes = index.to_bytes()
    index_sha = hashlib.sha256(index_bytes).hexdigest()
    uploaded = 0
    bundle_key = f"bundles/{index.bundle}.bundle"
    if not dest.exists(bundle_key):
        dest.put_file(bundle_key, bundle)
    for wire_sha, wire in sorted(objects.items()):
        key = f"objects/{wire_sha}"
        if not dest.exists(key):
            dest.put(key, wire)
            uploaded += 1
    if not dest.exists(f"objects/{index_sha}"):
        dest.put(f"objects/{index_sha}", index_bytes)  # last: everything it names is there
        uploaded += 1
    return Published(
        index=IndexRef(sha256=index_sha, size=len(index_bytes)),
        bundle_sha256=index.bundle,
        objects=len(objects) + 1,
        uploaded=uploaded,
        wire_bytes=sum(len(w) for w in objects.values()) + len(index_bytes),
        plain_bytes=sum(f.size for f in index.files.values()),
    )


class FolderDestination:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise UsageError(f"{root}: no such folder")
        self.root = root

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def put(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.root / key, data)

    def put_file(self, key: str, path: Path) -> None:
        self.put(key, path.read_bytes())


class HttpDestination:
    """A web server that takes PUT (nginx's dav_methods, a WebDAV server, a presigning proxy)."""

    def __init__(self, base: str, *, timeout_s: float = 60.0) -> None:
        self.base = base if base.endswith("/") else base + "/"
        self.timeout_s = timeout_s

    def _request(self, method: str, key: str, data: bytes | None = None) -> int:
        request = urllib.request.Request(self.base + key, data=data, method=method)  # noqa: S310 - http(s) only
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except urllib.error.URLError as exc:
            raise UsageError(f"{self.base}: cannot reach the server ({exc.reason})") from exc

    def exists(self, key: str) -> bool:
        return self._request("HEAD", key) == 200

    def put(self, key: str, data: bytes) -> None:
        status = self._request("PUT", key, data)
        if status not in (200, 201, 204):
            raise UsageError(f"{self.base}{key}: the server answered {status} to PUT")

    def put_file(self, key: str, path: Path) -> None:
        self.put(key, path.read_bytes())


class S3Destination:
    """An S3-compatible bucket (boto3; credentials and endpoint from the usual AWS settings)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        try:
            import boto3  # type: ignore[import-untyped]  # host-side optional extra
        except ImportError as exc:
            raise UsageError("publishing to s3:// needs boto3: pip install 'edgeagent[s3]'") from exc
        parsed = urlparse(url)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError:
            return False
        return True

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def presign(self, key: str, expires_s: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )
        return url


def destination(to: str, *, endpoint_url: str | None = None) -> Destination:
    """The store ``to`` names: a folder, an http(s):// base URL or s3://bucket/prefix."""
    scheme = urlparse(to).scheme
    if scheme in ("http", "https"):
        return HttpDestination(to)
    if scheme == "s3":
        return S3Destination(to, endpoint_url=endpoint_url)
    return FolderDestination(Path(to))


def presigned_source(dest: S3Destination, index_sha256: str, expires_s: int) -> PresignedSource:
    """Presigned URLs of every object of a published bundle (its index included), valid ``expires_s``."""
    import time

    from edgeagent.delivery.index import parse_index

    response = dest.client.get_object(Bucket=dest.bucket, Key=dest._key(f"objects/{index_sha256}"))
    index = parse_index(response["Body"].read())
    names = {index_sha256} | {f.wire_sha256 for f in index.files.values()}
    urls = {sha: dest.presign(f"objects/{sha}", expires_s) for sha in sorted(names)}
    return PresignedSource(urls=urls, expires=time.time() + expires_s)
