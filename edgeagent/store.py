"""The device store: downloads, verified bundles, and per-model current/previous links.

Layout under ``state_dir`` (``/var/lib/edgeagent`` by default)::

    downloads/<sha256>.part|.state|.bundle   transfers in progress and finished downloads
    bundles/<sha256>/                          verified, extracted, read-only bundles
    models/<name>/current -> ../../bundles/<sha256>
    models/<name>/previous -> ../../bundles/<sha256>
    journal/<name>.json                        the deployment journal of each model name
    refs.json                                  what each installed sha256 is (name, version, size)

Links are swapped atomically (a new link under a temp name, then ``os.replace``), so at
every instant ``current`` points at a complete bundle or does not exist.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from edgeagent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, parse_manifest
from edgeagent.bundle.reader import Limits, VerifiedBundle, extract_bundle
from edgeagent.errors import EdgeError
from edgeagent.signing import KeyRing, Signature
from edgeagent.storage import fsync_dir, hash_file

log = logging.getLogger(__name__)

# A bundle id: the lowercase hex sha256 of the bundle file (its folder name in the store).
BUNDLE_ID = re.compile(r"^[0-9a-f]{64}$")


class Store:
    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        """Open the store at ``root``; ``read_only`` (``edgeagent status``) creates and cleans nothing,
        so it is safe beside a running agent."""
        self.root = root
        self.downloads = root / "downloads"
        self.bundles = root / "bundles"
        self.models = root / "models"
        self.journal_dir = root / "journal"
        if read_only:
            return
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
            # Removing a read-only file needs only a writable folder: files keep their mode,
            # which matters for hard links shared with the object store (edgeagent/delivery).
            for sub in [path, *path.rglob("*")]:
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.chmod(0o755)
            shutil.rmtree(path, ignore_errors=True)

    def check_bundle(self, sha256: str, trusted: KeyRing, *, allow_unsigned: bool = False) -> str | None:
        """None when ``bundles/<sha256>/`` still matches its signed manifest, else the first problem.

        Reads every file once (the cost of a store that notices a flipped bit).
        """
        folder = self.bundle_dir(sha256)
        try:
            manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
            sig = folder / SIGNATURE_NAME
            if sig.exists():
                trusted.verify(manifest_bytes, Signature.from_json(sig.read_bytes()))
            elif not allow_unsigned:
                return f"{SIGNATURE_NAME} is missing"
            manifest = parse_manifest(manifest_bytes)
            absent = _absent(folder)
            for entry in manifest.files:
                if entry.path in absent and not (folder / entry.path).exists():
                    continue  # delivered by content: a model this device does not run was never fetched
                size, digest = hash_file(folder / entry.path)
                if (size, digest) != (entry.size, entry.sha256):
                    return f"{entry.path} does not match its sha256 in the manifest"
        except EdgeError as exc:
            return f"manifest: {exc}"
        except OSError as exc:
            return f"cannot read the bundle: {exc.strerror or exc}"
        return None

    def version_of(self, sha256: str) -> str | None:
        try:
            return parse_manifest((self.bundle_dir(sha256) / MANIFEST_NAME).read_bytes()).version
        except (OSError, EdgeError):
            return None

    # --- downloads and space -----------------------------------------------------------

    def download_files(self, sha256: str) -> tuple[Path, Path, Path]:
        """(.part, .state, finished .bundle) of a download, as the block downloader names them."""
        base = self.downloads / sha256
        return base.with_suffix(".part"), base.with_suffix(".state"), base.with_suffix(".bundle")

    def download_bytes(self, sha256: str) -> int:
        """Bytes the download of ``sha256`` already occupies (allocated blocks)."""
        total = 0
        for path in self.download_files(sha256):
            with contextlib.suppress(OSError):
                total += path.stat().st_blocks * 512
        return total

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def discard_download(self, sha256: str, *, keep_partial: bool = False) -> None:
        part, state, done = self.download_files(sha256)
        done.unlink(missing_ok=True)
        if not keep_partial:
            part.unlink(missing_ok=True)
            state.unlink(missing_ok=True)

    def clean_downloads(self, keep: set[str]) -> list[str]:
        """Remove every download that is not of a bundle in ``keep``; return the names removed."""
        removed = []
        for path in self.downloads.iterdir():
            sha = path.name.split(".", 1)[0]
            if sha not in keep or (path.suffix == ".bundle" and self.has_bundle(sha)):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path.name)
        return removed

    # --- links -------------------------------------------------------------------------

    def _link(self, name: str, which: str) -> Path:
        return self.models / name / which

    def current(self, name: str) -> str | None:
        return self._read_link(self._link(name, "current"))

    def previous(self, name: str) -> str | None:
        return self._read_link(self._link(name, "previous"))

    def model_names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.models.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

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
        return removed


def _absent(folder: Path) -> frozenset[str]:
    """Files a partial bundle lacks on purpose (``.delivery.json``, written by edgeagent/delivery)."""
    from edgeagent.delivery.objects import DELIVERY_NOTE  # the writer's name for it, one place
    try:
        note = json.loads((folder / DELIVERY_NOTE).read_bytes())
    except FileNotFoundError:
        return frozenset()
    except ValueError:
        return frozenset()  # unreadable note: every file must be there
    absent = note.get("absent") if isinstance(note, dict) else None
    return frozenset(a for a in absent if isinstance(a, str)) if isinstance(absent, list) else frozenset()
