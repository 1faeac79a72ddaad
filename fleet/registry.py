"""The bundle registry: answers block requests for every bundle in a folder, over MQTT.

Each device asks on its own topic, ``edge/v1/registry/get/{device}``, and is answered only on
``edge/v1/device/{that device}/blocks``, so a broker ACL that pins both topics to the device's
identity keeps one device from asking on behalf of another (docs/security.md). Replicas share
``edge/v1/registry/get/+`` through an MQTT shared subscription, so each request reaches exactly
one of them; they need nothing from each other but the same folder (or the
same object store). Reads are ``pread`` of one block at a time: memory stays bounded by the
blocks in flight, whatever the bundle size. New files in the folder are picked up when a
request names a sha256 the index does not know yet (rescans are rate-limited).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgeagent.errors import MalformedMessage, UsageError
from edgeagent.mqtt import BrokerConfig, Message, MqttSession
from edgeagent.protocol import BlockReply, BlockRequest, BlockStatus, Topics, parse
from edgeagent.storage import hash_file

log = logging.getLogger(__name__)

BUNDLE_SUFFIX = ".bundle"
MAX_REQUEST_BYTES = 4096


@dataclass(frozen=True)
class IndexedBundle:
    path: Path
    size: int
    sha256: str


class BundleIndex:
    """sha256 -> bundle file in one folder, kept current by cheap rescans."""

    def __init__(self, folder: Path, *, min_rescan_interval_s: float = 1.0) -> None:
        self.folder = folder
        self._by_sha: dict[str, IndexedBundle] = {}
        # (path, size, mtime_ns) -> sha256, so a rescan only hashes new or changed files.
        self._hashed: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._last_scan = 0.0
        self._scanned_names: frozenset[str] = frozenset()
        self._min_interval = min_rescan_interval_s

    def rescan(self) -> None:
        names = self._names()
        found: dict[str, IndexedBundle] = {}
        for path in sorted(self.folder.glob(f"*{BUNDLE_SUFFIX}")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (str(path), st.st_size, st.st_mtime_ns)
            sha = self._hashed.get(key)
            if sha is None:
                sha = hash_file(path)[1]
                self._hashed[key] = sha
            found[sha] = IndexedBundle(path, st.st_size, sha)
        with self._lock:
            self._by_sha = found
            self._last_scan = time.monotonic()
            self._scanned_names = names

    def _names(self) -> frozenset[str]:
        try:
            return frozenset(p.name for p in self.folder.iterdir() if p.name.endswith(BUNDLE_SUFFIX))
        except FileNotFoundError:
            return frozenset()

    def lookup(self, sha256: str) -> IndexedBundle | None:
        with self._lock:
            hit = self._by_sha.get(sha256)
        if hit is not None:
            return hit
        # Misses are serialized: the decision to rescan must see the index and the scan state
        # of one moment, or a miss racing a rescan could answer "not found" for a new file.
        with self._scan_lock:
            with self._lock:
                hit = self._by_sha.get(sha256)
                stale = time.monotonic() - self._last_scan >= self._min_interval
                scanned = self._scanned_names
            # A new name in the folder means a rescan at once (a listdir is cheap); otherwise at
            # most once per interval, since a miss may be a client asking for garbage.
            if hit is None and (stale or self._names() != scanned):
                self.rescan()
                with self._lock:
                    hit = self._by_sha.get(sha256)
        return hit

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_sha)


@dataclass
class RegistryStats:
    requests: int = 0
    blocks_served: int = 0
    bytes_served: int = 0
    not_found: int = 0
    malformed: int = 0
    foreign: int = 0  # requests naming another device than the topic they came on (refused)
    served_by_block: Counter[tuple[str, int]] = field(default_factory=Counter)


class Registry:
    """Serves blocks of the bundles in ``folder`` until :meth:`close`."""

    def __init__(
        self,
        broker: BrokerConfig,
        folder: Path,
        *,
        topics: Topics | None = None,
        share: str | None = "registry",
        client_id: str | None = None,
        reply_qos: int = 1,
        workers: int = 2,
    ) -> None:
        self.folder = folder
        self.topics = topics or Topics()
        self.index = BundleIndex(folder)
        self.stats = RegistryStats()
        self._stats_lock = threading.Lock()
        self._reply_qos = reply_qos
        self._share = share
        self.session = MqttSession(
            broker,
            # Unique per replica: two clients with one id make the broker drop each in turn.
            client_id or f"registry-{uuid.uuid4().hex[:12]}",
            workers=workers,
            queue_size=10000,
            max_inflight=256,
        )

    def start(self) -> Registry:
        if not self.folder.is_dir():
            raise UsageError(f"{self.folder}: no such folder of bundles")
        self.index.rescan()
        topics = self.topics
        subscription = topics.registry_shared(self._share) if self._share else topics.registry_get_all
        self.session.subscribe(subscription, self._on_request, qos=1, max_bytes=MAX_REQUEST_BYTES)
        self.session.start()
        return self

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _on_request(self, message: Message) -> None:
        try:
            request = parse(BlockRequest, message.payload, "block request")
        except MalformedMessage as exc:
            with self._stats_lock:
                self.stats.malformed += 1
            log.warning("registry: dropped a malformed block request: %s", exc)
            return
        # The topic, not the payload, names who asks: only the topic is pinned by the broker's ACL.
        requester = self.topics.requester_of(message.topic)
        if requester is None or requester != request.device:
            with self._stats_lock:
                self.stats.foreign += 1
                foreign = self.stats.foreign
            # Counted always, logged sparsely: a hostile client must not flood the log.
            if foreign == 1 or foreign % 1000 == 0:
                log.warning(
                    "registry: refused a block request for %r that came on %s (%d refused so far)",
                    request.device,
                    message.topic,
                    foreign,
                )
            return
        with self._stats_lock:
            self.stats.requests += 1
        reply_topic = self.topics.blocks(requester)
        bundle = self.index.lookup(request.sha256)
        if bundle is None:
            with self._stats_lock:
                self.stats.not_found += 1
            self._reply_error(reply_topic, request, BlockStatus.NOT_FOUND, "no such bundle in the registry")
            return
        blocks_total = -(-bundle.size // request.block_size)
        if request.first >= blocks_total:
            self._reply_error(
                reply_topic, request, BlockStatus.OUT_OF_RANGE, f"the bundle has {blocks_total} blocks"
            )
            return
        last = min(request.first + request.count, blocks_total)
        try:
            fd = os.open(bundle.path, os.O_RDONLY)
        except FileNotFoundError:
            self._reply_error(reply_topic, request, BlockStatus.NOT_FOUND, "the bundle was removed")
            return
        try:
            for index in range(request.first, last):
                data = os.pread(fd, request.block_size, index * request.block_size)
                reply = BlockReply(
                    BlockStatus.OK, bundle.sha256, index, request.block_size, bundle.size, data
                )
                self._send(reply_topic, reply.pack())
                with self._stats_lock:
                    self.stats.blocks_served += 1
                    self.stats.bytes_served += len(data)
                    self.stats.served_by_block[(bundle.sha256, index)] += 1
        finally:
            os.close(fd)

    def _send(self, topic: str, data: bytes) -> None:
        """Publish one block reply (a seam for tests that corrupt replies in transit)."""
        self.session.publish(topic, data, qos=self._reply_qos)

    def _reply_error(self, topic: str, request: BlockRequest, status: BlockStatus, reason: str) -> None:
        reply = BlockReply(status, request.sha256, request.first, request.block_size, 0, reason.encode())
        self.session.publish(topic, reply.pack(), qos=1)
