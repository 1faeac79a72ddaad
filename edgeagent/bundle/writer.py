"""Deterministic bundle writer.

Same inputs -> byte-identical bundle -> same sha256 (the bundle id). The tar is POSIX
(pax format) with fixed metadata: mtime from ``SOURCE_DATE_EPOCH`` (else 0), uid/gid 0,
empty owner names, mode 0644, no directory members. ``manifest.json`` comes first and
``manifest.sig`` second so a streaming reader checks the signature before it reads (or
writes) a single byte of the other files; the other files follow sorted by path.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from edgeagent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest
from edgeagent.errors import UsageError
from edgeagent.signing import SigningKey
from edgeagent.storage import atomic_writer, hash_file

CHUNK = 1 << 20
FILE_MODE = 0o644


def source_date_epoch() -> int:
    """The mtime stamped on every member: ``SOURCE_DATE_EPOCH`` when set, else 0."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError as exc:
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer number of seconds") from exc
    if value < 0:
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} must not be negative")
    return value


def file_entries(files: Mapping[str, Path]) -> list[FileEntry]:
    """Manifest entries for ``{path in bundle: file on disk}``, sorted by path."""
    entries = []
    for arcname in sorted(files):
        src = files[arcname]
        if not src.is_file():
            raise UsageError(f"{src}: no such file")
        size, sha = hash_file(src)
        entries.append(FileEntry(path=arcname, size=size, sha256=sha))
    return entries


def write_bundle(
    manifest: Manifest,
    files: Mapping[str, Path],
    key: SigningKey | None,
    out_path: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Write ``out_path`` atomically and return its sha256.

    ``manifest.files`` must describe exactly ``files`` (use :func:`file_entries`); a file
    that changes between hashing and writing is caught here rather than on a device.
    ``key=None`` writes an unsigned bundle, which readers refuse unless told otherwise.
    ``progress`` is called with the number of bytes written after each chunk.
    """
    listed = {entry.path: entry for entry in manifest.files}
    if set(listed) != set(files):
        raise UsageError(f"manifest lists {sorted(listed)} but files given are {sorted(files)}")
    mtime = source_date_epoch()
    manifest_bytes = manifest.to_bytes()
    head: list[tuple[str, bytes]] = [(MANIFEST_NAME, manifest_bytes)]
    if key is not None:
        head.append((SIGNATURE_NAME, key.sign(manifest_bytes).to_json()))

    digest = hashlib.sha256()
    with atomic_writer(out_path) as raw:
        out = _HashingWriter(raw, digest, progress)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name, data in head:
                tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
            for arcname in sorted(files):
                entry = listed[arcname]
                with files[arcname].open("rb") as fh:
                    checked = _CheckedReader(fh, entry)
                    tar.addfile(_tarinfo(arcname, entry.size, mtime), checked)
                    checked.finish()
    return digest.hexdigest()


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingWriter(io.RawIOBase):
    """Passes writes through to ``raw`` while hashing them (the bundle id costs no second read)."""

    def __init__(self, raw: BinaryIO, digest: hashlib._Hash, progress: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._digest = digest
        self._progress = progress
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._raw.write(data)
        self._digest.update(data)
        self._written += len(data)
        if self._progress is not None:
            self._progress(self._written)
        return len(data)


class _CheckedReader:
    """Reads a source file for tarfile, checking it still matches its manifest entry."""

    def __init__(self, fh: BinaryIO, entry: FileEntry) -> None:
        self._fh = fh
        self._entry = entry
        self._digest = hashlib.sha256()
        self._size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._digest.update(data)
        self._size += len(data)
        return data

    def finish(self) -> None:
        extra = self._fh.read(1)
        if extra or self._size != self._entry.size or self._digest.hexdigest() != self._entry.sha256:
            raise UsageError(f"{self._entry.path} changed while the bundle was being written; run again")
