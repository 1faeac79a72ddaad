"""The device's content-addressed store and partial bundles assembled from it.

``objects/<plain sha256>`` holds each verified file once, read-only, whatever bundles use
it; ``bundles/<bundle sha256>/`` is assembled from it by hard links (same filesystem, so no
byte is copied), in a staging folder renamed into place when complete. A partial bundle
lists what it lacks in ``.delivery.json``: models the device will not run were never
fetched. An object no bundle links any more (link count 1) is removed by :meth:`prune`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from edgeagent.bundle.reader import check_member_name
from edgeagent.delivery.codec import decode_file
from edgeagent.delivery.index import IndexFile
from edgeagent.storage import atomic_write_bytes, fsync_dir

DELIVERY_NOTE = ".delivery.json"


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

    def assemble(self, dest: Path, files: dict[str, str], absent: list[str]) -> None:
        """Link ``files`` (member name -> plain sha256) into a new bundle folder ``dest``."""
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for name, sha in sorted(files.items()):
                target = staging.joinpath(*check_member_name(name).split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.path(sha), target)
            note = {"absent": sorted(absent), "delivered_by": "content"}
            atomic_write_bytes(staging / DELIVERY_NOTE, json.dumps(note, indent=1).encode(), mode=0o444)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(dest.parent)

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
