"""The device store: downloads, verified bundles, and per-model current/previous links.

Layout under ``state_dir`` (``/var/lib/edgeagent`` by default)::

    downloads/<sha256>.part|.state|.bundle   transfers in progress and finished downloads
    bundles/<sha256>/                          verified, extracted, read-only bundles
    models/<name>/current -> ../../bundles/<sha256>
    models/<name>/previous -> ../../bundles/<sha256>
    journal/<name>.json                        the deployment journal of each model name

Links are swapped atomically (a new link under a temp name, then ``os.replace``), so at
every instant ``current`` points at a complete bundle or does not exist.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from edgeagent.bundle.reader import Limits, VerifiedBundle, extract_bundle
from edgeagent.signing import KeyRing
from edgeagent.storage import fsync_dir

log = logging.getLogger(__name__)

# A bundle id: the lowercase hex sha256 of the bundle file (its folder name in the store).
BUNDLE_ID = re.compile(r"^[0-9a-f]{64}$")


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloads = root / "downloads"
        self.bundles = root / "bundles"
        self.models = root / "models"
        self.journal_dir = root / "journal"
        for folder in (self.downloads, self.bundles, self.models, self.journal_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._clean_staging()

    def _clean_staging(self) -> None:
        # A crash during extraction leaves a staging folder; it never became a bundle.
        for leftover in self.bundles.glob(".*.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # --- bundles -----------------------------------------------------------------------

    def bundle_dir(self, sha256: str) -> Path:
        if not BUNDLE_ID.match(sha256):
            raise ValueError(f"{sha256!r} is not a bundle id")
        return self.bundles / sha256

    def has_bundle(self, sha256: str) -> bool:
        return self.bundle_dir(sha256).is_dir()

    def install(
        self,
        bundle_file: Path,
        sha256: str,
        trusted: KeyRing,
        *,
        allow_unsigned: bool = False,
        limits: Limits | None = None,
    ) -> VerifiedBundle:
        """Verify ``bundle_file`` and extract it to ``bundles/<sha256>/`` (all or nothing)."""
        return extract_bundle(
            bundle_file, self.bundle_dir(sha256), trusted, allow_unsigned=allow_unsigned, limits=limits
        )

    def remove_bundle(self, sha256: str) -> None:
        path = self.bundle_dir(sha256)
        if path.exists():
            # Extracted files are read-only; make them writable so rmtree works unprivileged.
            for sub in path.rglob("*"):
                with contextlib.suppress(OSError):
                    sub.chmod(0o644 if sub.is_file() else 0o755)
            shutil.rmtree(path, ignore_errors=True)

    # --- links -------------------------------------------------------------------------

    def _link(self, name: str, which: str) -> Path:
        return self.models / name / which

    def current(self, name: str) -> str | None:
        return self._read_link(self._link(name, "current"))

    def previous(self, name: str) -> str | None:
        return self._read_link(self._link(name, "previous"))

    def model_names(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir() if p.is_dir())

    def _read_link(self, link: Path) -> str | None:
        try:
            target = link.readlink()
        except OSError:
            return None
        sha = Path(target).name
        return sha if BUNDLE_ID.match(sha) and (self.bundles / sha).is_dir() else None

    def set_link(self, name: str, which: str, sha256: str | None) -> None:
        """Point ``models/<name>/<which>`` at a bundle (or remove it), atomically."""
        folder = self.models / name
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / which
        if sha256 is None:
            link.unlink(missing_ok=True)
        else:
            if not self.has_bundle(sha256):
                raise FileNotFoundError(f"bundle {sha256} is not installed")
            tmp = folder / f".{which}.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(f"../../bundles/{sha256}")
            tmp.replace(link)
        fsync_dir(folder)

    def referenced(self) -> set[str]:
        """Bundles a current or previous link points at (never pruned)."""
        shas = set()
        for name in self.model_names():
            for which in ("current", "previous"):
                sha = self._read_link(self._link(name, which))
                if sha:
                    shas.add(sha)
        return shas

    def prune(self, keep: int, protect: set[str] | None = None) -> list[str]:
        """Remove unreferenced bundles beyond the ``keep`` most recently installed; return removed ids."""
        protected = self.referenced() | (protect or set())
        candidates = sorted(
            (
                p
                for p in self.bundles.iterdir()
                if p.is_dir() and BUNDLE_ID.match(p.name) and p.name not in protected
            ),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        removed = []
        for path in candidates[max(0, keep - len(protected)) :]:
            self.remove_bundle(path.name)
            removed.append(path.name)
        for leftover in self.downloads.glob("*.bundle"):
            if leftover.stem in protected or self.has_bundle(leftover.stem):
                leftover.unlink(missing_ok=True)
        return removed
