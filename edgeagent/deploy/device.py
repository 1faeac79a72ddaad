"""The real ports: the store on disk and the bundle reader, as the engine sees them."""

from __future__ import annotations

import json
import logging

from edgeagent.bundle.reader import verify_bundle
from edgeagent.delivery.objects import claimed
from edgeagent.deploy.journal import JournalFile, journal_names
from edgeagent.deploy.machine import State
from edgeagent.errors import DeploymentError
from edgeagent.protocol import BundleRef
from edgeagent.signing import KeyRing
from edgeagent.storage import atomic_write_bytes
from edgeagent.store import Store

log = logging.getLogger(__name__)


class DeviceStore:
    """:class:`~edgeagent.store.Store` plus what verifying needs (keys) and what reports need (refs)."""

    def __init__(self, store: Store, trusted: KeyRing, *, allow_unsigned: bool, keep_bundles: int) -> None:
        self.store = store
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self.keep_bundles = keep_bundles
        self.refs_file = store.root / "refs.json"
        self.refs: dict[str, BundleRef] = self._load_refs()

    # --- links and bundles (delegated) ------------------------------------------------

    def has_bundle(self, sha256: str) -> bool:
        return self.store.has_bundle(sha256)

    def current(self, name: str) -> str | None:
        return self.store.current(name)

    def previous(self, name: str) -> str | None:
        return self.store.previous(name)

    def set_link(self, name: str, which: str, sha256: str | None) -> None:
        self.store.set_link(name, which, sha256)

    def version_of(self, sha256: str) -> str | None:
        return self.store.version_of(sha256)

    def free_bytes(self) -> int:
        return self.store.free_bytes()

    def download_bytes(self, sha256: str) -> int:
        return self.store.download_bytes(sha256)

    def check_bundle(self, sha256: str) -> str | None:
        return self.store.check_bundle(sha256, self.trusted, allow_unsigned=self.allow_unsigned)

    # --- deployment steps -------------------------------------------------------------

    def verify_download(self, ref: BundleRef) -> int:
        path = self.store.download_files(ref.sha256)[2]
        verified = verify_bundle(path, self.trusted, allow_unsigned=self.allow_unsigned)
        if verified.sha256 != ref.sha256:
            raise DeploymentError("downloaded bundle does not have the expected sha256", code="hash_mismatch")
        if (verified.manifest.name, verified.manifest.version) != (ref.name, ref.version):
            raise DeploymentError(
                f"bundle is {verified.manifest.name} {verified.manifest.version}, "
                f"the desired doc says {ref.name} {ref.version}",
                code="wrong_bundle",
            )
        return sum(entry.size for entry in verified.manifest.files)

    def install(self, ref: BundleRef) -> None:
        path = self.store.download_files(ref.sha256)[2]
        self.store.install(path, ref.sha256, self.trusted, allow_unsigned=self.allow_unsigned)
        self.store.discard_download(ref.sha256)  # the extracted bundle is what stays

    def remember(self, ref: BundleRef) -> None:
        if self.refs.get(ref.sha256) == ref:
            return
        self.refs[ref.sha256] = ref
        body = {k: v.model_dump() for k, v in self.refs.items()}
        atomic_write_bytes(self.refs_file, json.dumps(body, indent=2).encode())

    def discard(self, sha256: str, *, keep_partial: bool) -> None:
        self.store.discard_download(sha256, keep_partial=keep_partial)
        if sha256 not in self.store.referenced():
            self.store.remove_bundle(sha256)

    def collect_garbage(self, keep: set[str]) -> None:
        """Prune bundles beyond ``keep_bundles`` and every download no journal still works on."""
        working = keep | self._journal_targets()
        removed = self.store.prune(self.keep_bundles, protect=working)
        # A delivery by content names its part files by object: keep those it claims.
        dropped = self.store.clean_downloads(working | claimed(self.store.downloads, working))
        if removed or dropped:
            log.info("store clean-up: removed bundles %s, downloads %s", [r[:12] for r in removed], dropped)

    def _journal_targets(self) -> set[str]:
        targets = set()
        for name in journal_names(self.store.journal_dir):
            journal = JournalFile(self.store.journal_dir, name).load()
            if journal.target is not None and (journal.state is not State.IDLE or journal.retry_at > 0):
                targets.add(journal.target.sha256)
        return targets

    def _load_refs(self) -> dict[str, BundleRef]:
        try:
            body = json.loads(self.refs_file.read_bytes())
            return {k: BundleRef.model_validate(v) for k, v in body.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("%s is unreadable (%s)", self.refs_file, exc)
            return {}
