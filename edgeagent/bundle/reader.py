"""Streaming bundle reader: verify signature and hashes, extract safely.

One pass over the archive, in bounded memory (1 MiB chunks; the manifest itself is capped):

1. ``manifest.json`` must be the first member and ``manifest.sig`` the second; the
   signature is checked against the trusted keys before the manifest is parsed, so only
   signed bytes ever reach the JSON parser and the schema.
2. Every later member must be a regular file with a canonical relative name, listed in
   the manifest with the same size; its sha256 is computed while it streams (and, when
   extracting, while it is written into a fresh staging folder).
3. At the end every listed file must have been seen and the archive must end with the tar
   end-of-archive marker, otherwise it is truncated.

Extraction writes only inside a staging folder created beside the destination and renames
it into place when everything checked out; on any refusal the staging folder is removed,
so no partial bundle is ever left where a complete one is expected.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from edgeagent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest
from edgeagent.errors import (
    AbsolutePath,
    BundleError,
    DuplicateMember,
    ExtraFile,
    HashMismatch,
    LinkMember,
    MissingFile,
    MissingSignature,
    PathTraversal,
    SizeLimitExceeded,
    SizeMismatch,
    SpecialMember,
    TruncatedBundle,
    UnsafeMember,
    UsageError,
)
from edgeagent.signing import KeyRing, Signature
from edgeagent.storage import fsync_dir

CHUNK = 1 << 20
GiB = 1 << 30
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Limits:
    """Bounds a reader enforces before it reads data (bytes)."""

    max_member_bytes: int = 2 * GiB
    max_total_bytes: int = 2 * GiB
    max_manifest_bytes: int = 1 << 20
    max_signature_bytes: int = 4096


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check. ``signed_by`` is None only for allowed unsigned bundles."""

    manifest: Manifest
    sha256: str
    size: int
    signed_by: str | None
    extracted_to: Path | None = None


def verify_bundle(
    path: Path,
    trusted: KeyRing,
    *,
    allow_unsigned: bool = False,
    limits: Limits | None = None,
) -> VerifiedBundle:
    """Check a bundle file completely without writing anything."""
    return _BundleReader(path, trusted, allow_unsigned, limits or Limits()).read(sink=None)


def extract_bundle(
    path: Path,
    dest: Path,
    trusted: KeyRing,
    *,
    allow_unsigned: bool = False,
    limits: Limits | None = None,
) -> VerifiedBundle:
    """Verify ``path`` and extract it to ``dest`` (which must not exist yet), all or nothing.

    Extracted files are read-only (0444): an installed bundle is never modified in place.
    """
    if dest.exists() or dest.is_symlink():
        raise UsageError(f"{dest} already exists; extract into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        result = _BundleReader(path, trusted, allow_unsigned, limits or Limits()).read(sink=staging)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return VerifiedBundle(
        manifest=result.manifest,
        sha256=result.sha256,
        size=result.size,
        signed_by=result.signed_by,
        extracted_to=dest,
    )


def check_member_name(name: str) -> str:
    """Return ``name`` if it is a safe, canonical relative path; raise the precise reason if not."""
    if not name or "\x00" in name:
        raise UnsafeMember("empty or NUL-containing member name", member=name)
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise AbsolutePath(f"member {name!r} has an absolute path", member=name)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathTraversal(f"member {name!r} climbs out of the bundle with '..'", member=name)
    if "\\" in name or any(part in ("", ".") for part in parts) or str(PurePosixPath(name)) != name:
        raise UnsafeMember(f"member {name!r} is not a canonical relative path", member=name)
    return name


def check_member_type(member: tarfile.TarInfo) -> None:
    """Only regular files belong in a bundle."""
    if member.issym() or member.islnk():
        kind = "symlink" if member.issym() else "hardlink"
        raise LinkMember(f"member {member.name!r} is a {kind} (to {member.linkname!r})", member=member.name)
    if member.ischr() or member.isblk() or member.isfifo():
        kind = "character device" if member.ischr() else "block device" if member.isblk() else "fifo"
        raise SpecialMember(f"member {member.name!r} is a {kind}", member=member.name)
    if member.isdir():
        raise SpecialMember(
            f"member {member.name!r} is a directory; bundles hold only files", member=member.name
        )
    if not member.isreg() or member.issparse():
        raise SpecialMember(f"member {member.name!r} is not a regular file", member=member.name)


class _HashingReader:
    """File reader that hashes and counts everything read through it (the bundle id)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _BundleReader:
    def __init__(
        self, path: Path, trusted: KeyRing, allow_unsigned: bool, limits: Limits, check_signature: bool = True
    ) -> None:
        self.path = path
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self.limits = limits
        self.check_signature = check_signature
        # A member read ahead while looking for manifest.sig, handed to _read_files.
        self._pending: tarfile.TarInfo | None = None
        self._signed = False

    def read(self, sink: Path | None) -> VerifiedBundle:
        try:
            return self._read(sink)
        except BundleError as exc:
            exc.bundle = exc.bundle or self.path.name
            raise

    def _read(self, sink: Path | None) -> VerifiedBundle:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError as exc:
            raise UsageError(f"{self.path}: no such file") from exc
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot read ({exc.strerror})") from exc
        with fh:
            source = _HashingReader(fh)
            try:
                tar = tarfile.open(fileobj=source, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
            except tarfile.TarError as exc:
                raise TruncatedBundle(f"not a tar archive, or empty ({exc})") from exc
            with tar:
                manifest, signed_by = self._read_head(tar, sink)
                self._read_files(tar, manifest, sink)
                end = tar.offset
            source.drain()
            self._check_end_marker(fh, end, source.count)
        return VerifiedBundle(
            manifest=manifest, sha256=source.digest.hexdigest(), size=source.count, signed_by=signed_by
        )

    def _next(self, tar: tarfile.TarFile) -> tarfile.TarInfo | None:
        try:
            member = tar.next()
        except tarfile.TarError as exc:
            raise TruncatedBundle(f"archive is truncated or corrupt ({exc})") from exc
        if member is not None:
            check_member_name(member.name)
            check_member_type(member)
        return member

    def _read_small(self, tar: tarfile.TarFile, member: tarfile.TarInfo, bound: int) -> bytes:
        if member.size > bound:
            raise SizeLimitExceeded(
                f"{member.name} is {member.size} bytes; the bound is {bound}", member=member.name
            )
        fileobj = tar.extractfile(member)
        if fileobj is None:  # pragma: no cover - regular files always have data
            raise SpecialMember(f"member {member.name!r} has no data", member=member.name)
        try:
            return fileobj.read()
        except tarfile.TarError as exc:
            raise TruncatedBundle(f"archive ends inside {member.name}", member=member.name) from exc

    def _read_head(self, tar: tarfile.TarFile, sink: Path | None) -> tuple[Manifest, str | None]:
        first = self._next(tar)
        if first is None or first.name != MANIFEST_NAME:
            found = "nothing" if first is None else repr(first.name)
            raise MissingFile(
                f"{MANIFEST_NAME} must be the first member of a bundle; found {found}", member=MANIFEST_NAME
            )
        manifest_bytes = self._read_small(tar, first, self.limits.max_manifest_bytes)
        # The signature must come straight after the manifest: peek at the next member.
        second = self._next(tar)
        self._pending = second
        signed_by: str | None = None
        sig_bytes = b""
        if second is not None and second.name == SIGNATURE_NAME:
            sig_bytes = self._read_small(tar, second, self.limits.max_signature_bytes)
            signature = Signature.from_json(sig_bytes)
            if self.check_signature:
                self.trusted.verify(manifest_bytes, signature)
            signed_by = signature.key_id
            self._pending = None
            self._signed = True
        elif not self.allow_unsigned:
            raise MissingSignature(
                f"bundle has no {SIGNATURE_NAME}; unsigned bundles are refused", member=SIGNATURE_NAME
            )
        manifest = parse_manifest(manifest_bytes)
        self._check_declared_sizes(manifest)
        if sink is not None:
            # The installed bundle keeps its manifest (and signature) so the agent can
            # re-read what it runs, and re-verify it, after a restart.
            _write_file(sink / MANIFEST_NAME, manifest_bytes)
            if signed_by is not None:
                _write_file(sink / SIGNATURE_NAME, sig_bytes)
        return manifest, signed_by

    def _check_declared_sizes(self, manifest: Manifest) -> None:
        total = 0
        for entry in manifest.files:
            if entry.size > self.limits.max_member_bytes:
                raise SizeLimitExceeded(
                    f"manifest declares {entry.path} as {entry.size} bytes; "
                    f"the bound is {self.limits.max_member_bytes}",
                    member=entry.path,
                )
            total += entry.size
        if total > self.limits.max_total_bytes:
            raise SizeLimitExceeded(
                f"manifest declares {total} bytes in all; the bound is {self.limits.max_total_bytes}"
            )

    def _read_files(self, tar: tarfile.TarFile, manifest: Manifest, sink: Path | None) -> None:
        expected = {entry.path: entry for entry in manifest.files}
        # manifest.sig counts as seen only when it was read as the signature: one that turns
        # up later, in an unsigned bundle, is an extra file.
        seen: set[str] = {MANIFEST_NAME} | ({SIGNATURE_NAME} if self._signed else set())
        total = 0
        member = self._pending if self._pending is not None else self._next(tar)
        while member is not None:
            name = member.name
            if name in seen:
                raise DuplicateMember(f"member {name!r} appears twice", member=name)
            seen.add(name)
            entry = expected.get(name)
            if entry is None:
                raise ExtraFile(f"member {name!r} is not listed in the manifest", member=name)
            if member.size > self.limits.max_member_bytes:
                raise SizeLimitExceeded(
                    f"member {name!r} is {member.size} bytes; the bound is {self.limits.max_member_bytes}",
                    member=name,
                )
            total += member.size
            if total > self.limits.max_total_bytes:
                raise SizeLimitExceeded(
                    f"members add up to more than {self.limits.max_total_bytes} bytes", member=name
                )
            if member.size != entry.size:
                raise SizeMismatch(
                    f"member {name!r} is {member.size} bytes but the manifest says {entry.size}", member=name
                )
            digest = self._stream_member(tar, member, sink)
            if digest != entry.sha256:
                raise HashMismatch(
                    f"member {name!r} has sha256 {digest[:12]}…, the manifest says {entry.sha256[:12]}…",
                    member=name,
                )
            member = self._next(tar)
        missing = sorted(set(expected) - seen)
        if missing:
            raise MissingFile(f"the manifest lists {missing} but the archive lacks them", member=missing[0])

    def _stream_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, sink: Path | None) -> str:
        fileobj = tar.extractfile(member)
        if fileobj is None:  # pragma: no cover - regular files always have data
            raise SpecialMember(f"member {member.name!r} has no data", member=member.name)
        digest = hashlib.sha256()
        out_fd = self._create(sink, member.name) if sink is not None else None
        try:
            remaining = member.size
            while remaining > 0:
                try:
                    chunk = fileobj.read(min(CHUNK, remaining))
                except tarfile.TarError as exc:
                    raise TruncatedBundle(f"archive ends inside {member.name}", member=member.name) from exc
                if not chunk:
                    raise TruncatedBundle(f"archive ends inside {member.name}", member=member.name)
                digest.update(chunk)
                remaining -= len(chunk)
                if out_fd is not None:
                    _write_all(out_fd, chunk)
            if out_fd is not None:
                os.fsync(out_fd)
                os.fchmod(out_fd, 0o444)
        finally:
            if out_fd is not None:
                os.close(out_fd)
        return digest.hexdigest()

    @staticmethod
    def _create(sink: Path, name: str) -> int:
        # The name was checked by check_member_name and the staging folder is ours and new,
        # so nothing in it can be a link; O_NOFOLLOW|O_EXCL make that a guarantee anyway.
        target = sink.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        return os.open(target, flags, 0o644)

    def _check_end_marker(self, fh: BinaryIO, end: int, size: int) -> None:
        # tarfile ends iteration quietly when the archive stops at a member boundary or
        # holds garbage after the last member; a complete tar has two zero blocks there.
        if size - end < _END_OF_ARCHIVE:
            raise TruncatedBundle(f"archive is truncated: it stops at byte {size} without the end marker")
        fh.seek(end)
        if fh.read(_END_OF_ARCHIVE) != bytes(_END_OF_ARCHIVE):
            raise TruncatedBundle(f"archive is corrupt after byte {end}: expected the end-of-archive marker")


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o444)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_manifest_unverified(path: Path, *, limits: Limits | None = None) -> tuple[Manifest, str | None]:
    """Read the manifest (and the key id of ``manifest.sig``) without checking the signature.

    For showing what a bundle claims to be (``bundle inspect`` without ``--trusted``); never
    install or trust anything on the strength of this. The whole archive is still read, so a
    truncated bundle, or a file that differs from the manifest, is refused rather than shown.
    """
    reader = _BundleReader(
        path, KeyRing(), allow_unsigned=True, limits=limits or Limits(), check_signature=False
    )
    result = reader.read(None)
    return result.manifest, result.signed_by
