"""The device's content-addressed store and partial bundles assembled from it.

``objects/<plain sha256>`` holds each verified file once, read-only, whatever bundles use
it; ``bundles/<bundle sha256>/`` is assembled from it by hard links (same filesystem, so no
byte is copied), in a staging folder renamed into place when complete. A partial bundle
lists what it lacks in ``.delivery.json``: models the device will not run were never
fetched, each with its index entry, so the next candidate's artifacts can be fetched into the
folder later (:meth:`ObjectStore.link_into`) when the first choice fails acceptance. An object
no bundle links any more (link count 1) is removed by :meth:`prune`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgeagent.bundle.reader import check_member_name
from edgeagent.delivery.codec import decode_file
from edgeagent.delivery.index import IndexFile
from edgeagent.storage import atomic_write_bytes, fsync_dir

DELIVERY_NOTE = ".delivery.json"
#: ``downloads/<bundle sha256>.objects``: the wire sha256s a delivery has in flight. Part files
#: are named by wire sha256, so the store's clean-up keeps those a working (or retrying)
#: deployment claims, and drops the claim with the rest once no journal targets the bundle.
CLAIM_SUFFIX = ".objects"


def claim(downloads: Path, bundle: str, wire_sha256s: set[str]) -> None:
    """Record the objects the delivery of ``bundle`` is fetching (before their part files exist)."""
    atomic_write_bytes(downloads / f"{bundle}{CLAIM_SUFFIX}", json.dumps(sorted(wire_sha256s)).encode())


def claimed(downloads: Path, bundles: set[str]) -> set[str]:
    """The wire sha256s the deliveries of ``bundles`` claim (an unreadable claim claims nothing)."""
    found: set[str] = set()
    for bundle in bundles:
        try:
            found.update(str(s) for s in json.loads((downloads / f"{bundle}{CLAIM_SUFFIX}").read_bytes()))
        except (OSError, ValueError, TypeError):
            continue
    return found


@dataclass(frozen=True)
class Note:
    """``.delivery.json``: the members a partial bundle lacks, with their index entries."""

    absent: list[str]
    entries: dict[str, IndexFile] = field(default_factory=dict)  # absent member -> its index entry
    block_size: int | None = None  # the index's, for the entries' block hashes

    def write(self, folder: Path) -> None:
        body = {
            "absent": sorted(self.absent),
            "delivered_by": "content",
            "block_size": self.block_size,
            "entries": {k: v.model_dump(mode="json") for k, v in sorted(self.entries.items())},
        }
        atomic_write_bytes(folder / DELIVERY_NOTE, json.dumps(body, indent=1).encode(), mode=0o444)

    @classmethod
    def read(cls, folder: Path) -> Note:
        """The note of ``folder``; empty for a whole bundle (no note). Raises OSError, or
        ValueError for a note that is not one."""
        try:
            body = json.loads((folder / DELIVERY_NOTE).read_bytes())
        except FileNotFoundError:
            return cls([])
        try:
            entries = {k: IndexFile.model_validate(v) for k, v in body.get("entries", {}).items()}
            return cls([str(a) for a in body["absent"]], entries, body.get("block_size"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{folder / DELIVERY_NOTE} is not a delivery note ({exc!r})") from exc

    def missing(self, folder: Path) -> list[str]:
        """Absent members that are not in the folder (a crash may have linked some already)."""
        return [a for a in self.absent if not folder.joinpath(*a.split("/")).is_file()]


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        for leftover in self.objects.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)  # a crash while decoding: never became an object

    def path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def add(self, wire: Path, entry: IndexFile, name: str) -> Path:
        """Decode ``wire`` (bounded, verified against the plain sha256) into the store."""
        dest = self.path(entry.sha256)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.sha256}.", suffix=".tmp", dir=self.objects)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                decode_file(wire, out, entry.encoding, size=entry.size, sha256=entry.sha256, name=name)
            tmp.chmod(0o444)
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.objects)
        return dest

    def assemble(self, dest: Path, files: dict[str, str], note: Note) -> None:
        """Link ``files`` (member name -> plain sha256) into a new bundle folder ``dest``."""
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for name, sha in sorted(files.items()):
                target = staging.joinpath(*check_member_name(name).split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.path(sha), target)
            note.write(staging)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(dest.parent)

    def link_into(self, folder: Path, files: dict[str, str]) -> None:
        """Link more ``files`` (member -> plain sha256, all in the store) into the partial bundle
        ``folder`` and take them off its note. Links first, note last (atomic): after a crash in
        between, a file is both linked and listed, which :meth:`Note.missing` reads as there."""
        note = Note.read(folder)
        for name, sha in sorted(files.items()):
            target = folder.joinpath(*check_member_name(name).split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.path(sha), target)
            except FileExistsError:
                if not self.path(sha).samefile(target):
                    raise
        fsync_dir(folder)
        kept = {k: v for k, v in note.entries.items() if k not in files}
        Note([a for a in note.absent if a not in files], kept, note.block_size).write(folder)

    def prune(self) -> list[str]:
        """Remove objects no bundle folder links (link count 1); return their sha256s."""
        removed = []
        for path in self.objects.iterdir():
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.stat().st_nlink <= 1:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed
