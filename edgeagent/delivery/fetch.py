"""Fetch a bundle by content: index -> signed manifest -> only the files this device uses.

Every object is tried on each source of the bundle reference in order (an http(s) base URL,
presigned URLs until they expire, the MQTT registry), verified block by block where the
transport allows and as a whole, decoded with a bound into the content-addressed store, and
the bundle folder is assembled by hard links. What is in the store already is never fetched
again; what a crash or a lost connection interrupted resumes from its ``.part`` file.

Errors: a source that cannot be reached or stops is transient (TransferError, "will resume
later": the deployment retries); bytes that fail a check are refused with their BundleError
once no source served good ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devices.profile import Candidate
from edgeagent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest
from edgeagent.bundle.reader import Limits
from edgeagent.delivery.choose import needed_files, next_files
from edgeagent.delivery.http import download
from edgeagent.delivery.index import MAX_INDEX_BYTES, DeliveryIndex, IndexFile, parse_index
from edgeagent.delivery.objects import CLAIM_SUFFIX, Note, ObjectStore, claim
from edgeagent.errors import (
    BundleError,
    IndexMismatch,
    MissingSignature,
    SizeLimitExceeded,
    TransferError,
)
from edgeagent.protocol import BundleRef, HttpSource, MqttSource, PresignedSource, Source
from edgeagent.signing import KeyRing, Signature
from edgeagent.transfer import BlockDownloader, Wanted

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class FetchReport:
    """What the last fetch did: the source that served each file, and the bytes it moved."""

    served_by: dict[str, str] = field(
        default_factory=dict
    )  # member -> 'http' | 'presigned' | 'mqtt' | 'store'
    wire_bytes: int = 0
    absent: list[str] = field(default_factory=list)


class ContentFetcher:
    """``fetch(ref)`` installs ``bundles/<ref.sha256>/`` (partial) from the objects the device needs."""

    def __init__(
        self,
        state_dir: Path,
        trusted: KeyRing,
        *,
        downloader: BlockDownloader | None,
        candidates: Sequence[Candidate],
        profile: str | None,
        precisions: Sequence[str] = (),
        allow_unsigned: bool = False,
        mqtt_block_cap: int = 256 * 1024,
        limits: Limits | None = None,
    ) -> None:
        self.objects = ObjectStore(state_dir)
        self.bundles = state_dir / "bundles"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.downloads = state_dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.trusted = trusted
        self.downloader = downloader
        self.candidates = list(candidates)
        self.profile = profile
        self.precisions = list(precisions)
        self.allow_unsigned = allow_unsigned
        self.mqtt_block_cap = mqtt_block_cap
        self.limits = limits or Limits()
        self.report = FetchReport()

    def fetch(
        self,
        ref: BundleRef,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        precisions: Sequence[str] | None = None,
    ) -> None:
        if ref.index is None:
            raise TransferError("the bundle reference has no delivery index", sha256=ref.sha256)
        dest = self.bundles / ref.sha256
        if dest.is_dir():
            return
        if ref.index.size > MAX_INDEX_BYTES:  # refused before a byte of it is fetched
            bound = f"the bound is {MAX_INDEX_BYTES}"
            raise SizeLimitExceeded(f"delivery index is {ref.index.size} bytes; {bound}")
        self.report = FetchReport()
        sources = list(ref.sources) or [MqttSource()]
        claim(self.downloads, ref.sha256, {ref.index.sha256})
        index_entry = IndexFile(
            sha256=ref.index.sha256,
            size=ref.index.size,
            encoding="identity",
            wire_sha256=ref.index.sha256,
            wire_size=ref.index.size,
            blocks=[],
        )
        index = parse_index(self._object(index_entry, "(index)", sources, None, stop).read_bytes())
        if (index.bundle, index.name, index.version) != (ref.sha256, ref.name, ref.version):
            raise IndexMismatch(f"the index is for {index.name} {index.version}, not the bundle asked for")
        claim(self.downloads, ref.sha256, {ref.index.sha256} | {f.wire_sha256 for f in index.files.values()})
        manifest_bytes, manifest = self._manifest(index, sources, stop)
        index.check_against(manifest, manifest_bytes)
        wanted = needed_files(manifest, self.candidates, self.profile, precisions or self.precisions)
        names = [n for n in index.files if n in wanted or n in (MANIFEST_NAME, SIGNATURE_NAME)]
        total = sum(index.files[n].wire_size for n in names)
        done = 0
        for name in names:
            self._object(index.files[name], name, sources, index.block_size, stop)
            done += index.files[name].wire_size
            if progress is not None:
                progress(done, total)
        self.report.absent = sorted(set(index.files) - set(names))
        note = Note(self.report.absent, {n: index.files[n] for n in self.report.absent}, index.block_size)
        self.objects.assemble(dest, {n: index.files[n].sha256 for n in names}, note)
        self.objects.prune()
        for name in names:
            (self.downloads / f"{index.files[name].wire_sha256}.obj").unlink(missing_ok=True)
        (self.downloads / f"{ref.sha256}{CLAIM_SUFFIX}").unlink(missing_ok=True)
        log.info(
            "installed %s %s from %d objects (%d absent): %s",
            ref.name,
            ref.version,
            len(names),
            len(self.report.absent),
            self.report.served_by,
        )

    def next_artifacts(self, ref: BundleRef, *, precisions: Sequence[str] = ()) -> list[str]:
        """The artifacts the partial bundle ``ref`` lacks that selection would try next (else [])."""
        folder = self.bundles / ref.sha256
        try:
            note = Note.read(folder)
        except ValueError as exc:  # the deployment ends with its own failure, not this one
            log.error("cannot fetch more into %s: %s", ref.sha256[:12], exc)
            return []
        missing = [m for m in note.missing(folder) if m in note.entries]  # older notes lack entries
        if not missing:
            return []
        manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes())  # verified when delivered
        return next_files(manifest, self.candidates, self.profile, precisions or self.precisions, missing)

    def fetch_more(
        self, ref: BundleRef, paths: Sequence[str], *, stop: threading.Event | None = None
    ) -> None:
        """Fetch ``paths`` (absent members of the partial bundle ``ref``) into its folder.

        Each object is fetched, verified and decoded like the first ones, from the reference's
        sources, then linked into the folder and taken off its note; an interrupted fetch
        resumes from its part file, and a crash after the links leaves them in place.
        """
        folder = self.bundles / ref.sha256
        note = Note.read(folder)
        signed = {f.path: f for f in parse_manifest((folder / MANIFEST_NAME).read_bytes()).files}
        for path in paths:
            entry, listed = note.entries.get(path), signed.get(path)
            if entry is None or listed is None or (entry.sha256, entry.size) != (listed.sha256, listed.size):
                # The note is the device's own copy of the index: it must still agree with the
                # signed manifest before an object it names goes into the bundle.
                raise IndexMismatch(f"{path}: the delivery note disagrees with the manifest", member=path)
        self.report = FetchReport()
        sources = list(ref.sources) or [MqttSource()]
        claim(self.downloads, ref.sha256, {note.entries[n].wire_sha256 for n in paths})
        for name in paths:
            self._object(note.entries[name], name, sources, note.block_size, stop)
        self.objects.link_into(folder, {n: note.entries[n].sha256 for n in paths})
        for name in paths:
            (self.downloads / f"{note.entries[name].wire_sha256}.obj").unlink(missing_ok=True)
        (self.downloads / f"{ref.sha256}{CLAIM_SUFFIX}").unlink(missing_ok=True)
        self.report.absent = Note.read(folder).absent
        log.info("fetched %s into %s %s: %s", list(paths), ref.name, ref.version, self.report.served_by)

    def fetch_bundle_url(self, ref: BundleRef, *, stop: threading.Event | None = None) -> bool:
        """Download the whole bundle from ``ref.source`` (an http(s) URL) into the downloads folder.

        The file lands where the registry download would put it (``downloads/<sha256>.bundle``),
        so the verifying and installing steps read it as usual. False (logged) when the URL
        fails: the caller falls back to the registry.
        """
        want = Wanted(ref.sha256, ref.size)
        try:
            download(ref.source, want, self.downloads / f"{ref.sha256}.hpart", stop=stop)
        except (TransferError, BundleError) as exc:
            log.warning("%s failed (%s); falling back to the registry", ref.source.split("?")[0], exc)
            return False
        self.report = FetchReport(served_by={"(bundle)": "http"}, wire_bytes=ref.size)
        return True

    def _manifest(
        self, index: DeliveryIndex, sources: list[Source], stop: threading.Event | None
    ) -> tuple[bytes, Manifest]:
        entry = index.files[MANIFEST_NAME]
        if entry.size > self.limits.max_manifest_bytes:
            raise SizeLimitExceeded(
                f"{MANIFEST_NAME} is {entry.size} bytes; the bound is {self.limits.max_manifest_bytes}",
                member=MANIFEST_NAME,
            )
        manifest_bytes = self._object(entry, MANIFEST_NAME, sources, index.block_size, stop).read_bytes()
        sig = index.files.get(SIGNATURE_NAME)
        if sig is not None:
            if sig.size > self.limits.max_signature_bytes:
                raise SizeLimitExceeded(f"{SIGNATURE_NAME} is {sig.size} bytes", member=SIGNATURE_NAME)
            signature = Signature.from_json(
                self._object(sig, SIGNATURE_NAME, sources, index.block_size, stop).read_bytes()
            )
            self.trusted.verify(manifest_bytes, signature)  # before a byte of it is parsed
        elif not self.allow_unsigned:
            raise MissingSignature(f"the index has no {SIGNATURE_NAME}; unsigned bundles are refused")
        return manifest_bytes, parse_manifest(manifest_bytes)

    def _object(
        self,
        entry: IndexFile,
        name: str,
        sources: list[Source],
        block_size: int | None,
        stop: threading.Event | None,
    ) -> Path:
        """The plain file of ``entry`` in the store, fetched from the first source that serves it."""
        if self.objects.has(entry.sha256):
            self.report.served_by.setdefault(name, "store")
            return self.objects.path(entry.sha256)
        want = self._wanted(entry, block_size)
        refused: BundleError | None = None
        transient: list[str] = []
        for source in sources:
            try:
                wire = self._from(source, want, stop)
                if wire is None:
                    continue
                path = self.objects.add(wire, entry, name)
            except BundleError as exc:
                log.warning("%s from %s refused: %s", name, source.kind, exc)
                (self.downloads / f"{want.sha256}.obj").unlink(missing_ok=True)
                refused = exc
                continue
            except TransferError as exc:
                log.warning("%s from %s failed: %s", name, source.kind, exc)
                transient.append(f"{source.kind}: {exc}")
                continue
            self.report.served_by[name] = source.kind
            self.report.wire_bytes += entry.wire_size
            return path
        if refused is not None:
            refused.member = refused.member or name
            raise refused
        raise TransferError(
            f"no source served {name} ({'; '.join(transient) or 'none usable'}); will resume later",
            sha256=entry.wire_sha256,
        )

    def _wanted(self, entry: IndexFile, block_size: int | None) -> Wanted:
        if block_size is None:  # the index itself: no block hashes, the desired doc's sha256
            return Wanted(entry.wire_sha256, entry.wire_size, None, (), suffix=".obj")
        return Wanted(entry.wire_sha256, entry.wire_size, block_size, tuple(entry.blocks), ".obj")

    def _from(self, source: Source, want: Wanted, stop: threading.Event | None) -> Path | None:
        part = self.downloads / f"{want.sha256}.hpart"
        if isinstance(source, HttpSource):
            base = source.url if source.url.endswith("/") else source.url + "/"
            return download(base + f"objects/{want.sha256}", want, part, stop=stop)
        if isinstance(source, PresignedSource):
            url = source.urls.get(want.sha256)
            if url is None or time.time() >= source.expires:
                return None
            return download(url, want, part, stop=stop)
        if self.downloader is None:
            return None
        if want.block_size is not None and want.block_size > self.mqtt_block_cap:
            # The broker cannot carry the index's blocks: smaller ones, checked as a whole.
            want = Wanted(want.sha256, want.size, None, (), want.suffix)
        return self.downloader.fetch(want, stop=stop)
