"""The engine's downloader (its ``DownloaderPort``): by content, by URL, or by registry blocks.

A reference with a delivery index is fetched object by object and installed straight into
the store (``bundles/<sha256>/``, partial), so the engine's verifying and installing steps
find it there and skip; a reference whose ``source`` is an http(s) URL of the whole bundle
is downloaded from it where it can be; anything still missing comes from the MQTT registry
as one ``.bundle``, exactly as before delivery by content.

When every artifact a partial bundle holds failed acceptance, :meth:`DeliveryDownloader.fetch_more`
fetches the next candidate's (the validating step asks, see edgeagent/deploy/steps.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from devices.detect import Detection
from edgeagent.config import AgentConfig
from edgeagent.delivery.fetch import ContentFetcher
from edgeagent.errors import DeploymentError
from edgeagent.mqtt import MqttSession
from edgeagent.protocol import BundleRef, Topics
from edgeagent.signing import KeyRing
from edgeagent.transfer import BlockDownloader, TransferConfig, block_size_for


class DeliveryDownloader:
    def __init__(
        self,
        fetcher: ContentFetcher,
        blocks: BlockDownloader | None,
        *,
        installed: Callable[[str], bool],
        precisions_for: Callable[[BundleRef], Sequence[str]],
        served_by: Callable[[BundleRef, dict[str, str]], None],
        fetching_next: Callable[[BundleRef, dict[str, object]], None] | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.blocks = blocks
        self.installed = installed  # sha256 -> is bundles/<sha256>/ in the store
        self.precisions_for = precisions_for
        self.served_by = served_by  # reports which source served each file
        self.fetching_next = fetching_next  # reports a fetch of the next candidate's artifacts

    def fetch(
        self,
        ref: BundleRef,
        *,
        progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Path:
        done = self.fetcher.downloads / f"{ref.sha256}.bundle"
        if ref.index is not None:
            self.fetcher.fetch(ref, progress=progress, stop=stop, precisions=self.precisions_for(ref))
            self.served_by(ref, dict(self.fetcher.report.served_by))
            return done  # installed: the next steps skip
        if ref.source.startswith(("http://", "https://")) and self.fetcher.fetch_bundle_url(ref, stop=stop):
            self.served_by(ref, dict(self.fetcher.report.served_by))
            return done
        if self.installed(ref.sha256):
            return done
        if self.blocks is None:
            raise DeploymentError("no broker configured to download from", code="no_broker")
        return self.blocks.fetch(ref, progress=progress, stop=stop)

    def fetch_more(
        self, ref: BundleRef, *, after: str, reason: str, stop: threading.Event | None = None
    ) -> list[str]:
        """Fetch the artifacts of the next candidate the partial bundle ``ref`` lacks, after its
        artifacts failed (``after``: the failure's code); return their paths, [] when none is left."""
        if ref.index is None:
            return []  # a whole bundle holds every artifact already
        paths = self.fetcher.next_artifacts(ref, precisions=self.precisions_for(ref))
        if not paths:
            return []
        if self.fetching_next is not None:
            self.fetching_next(ref, {"next_candidate": paths, "after": after, "reason": reason})
        self.fetcher.fetch_more(ref, paths, stop=stop)
        self.served_by(ref, dict(self.fetcher.report.served_by))
        return paths


def device_downloader(
    config: AgentConfig,
    session: MqttSession,
    *,
    topics: Topics,
    trusted: KeyRing,
    detection: Detection,
    precisions_for: Callable[[BundleRef], Sequence[str]],
    served_by: Callable[[BundleRef, dict[str, str]], None],
    installed: Callable[[str], bool],
    fetching_next: Callable[[BundleRef, dict[str, object]], None] | None = None,
) -> DeliveryDownloader:
    """The agent's downloader over ``session``, its block size capped by the broker profile."""
    blocks = BlockDownloader(
        session,
        config.device_id,
        config.state_dir / "downloads",
        topics=topics,
        config=TransferConfig(
            block_size=block_size_for(config.broker_profile, config.transfer_block_kib * 1024),
            window=config.transfer_window,
        ),
    )
    fetcher = ContentFetcher(
        config.state_dir,
        trusted,
        downloader=blocks,
        candidates=detection.candidates,
        profile=detection.profile,
        allow_unsigned=config.insecure,
        mqtt_block_cap=blocks.config.block_size,
    )
    return DeliveryDownloader(
        fetcher,
        blocks,
        installed=installed,
        precisions_for=precisions_for,
        served_by=served_by,
        fetching_next=fetching_next,
    )
