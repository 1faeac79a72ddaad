"""Resumable block transfer of a bundle from the registry over MQTT.

The downloader keeps ``window`` blocks in flight (requests for runs of up to ``run``
consecutive blocks), writes each checked block at its offset into a preallocated
``downloads/<sha256>.part`` and records it in a bitmap that is persisted every ``window``
blocks (after an fdatasync of the data, so the bitmap never claims a block that is not on
disk). After a restart or a broker outage it asks only for the blocks the bitmap lacks, so
a resume re-fetches at most one window. Blocks that time out are asked for again.

Memory stays bounded whatever the bundle size: blocks are written as they arrive, so the
device holds at most ``window * block_size`` bytes of payload in broker/socket buffers
(8 MiB with the defaults; 64 KiB x 64 halves that at about 0.6-0.8x the speed) plus the
bitmap (one bit per block).

The finished file's sha256 must equal the one asked for; its signature is checked by the
bundle reader at the verifying step.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeagent.errors import HashMismatch, MalformedMessage, TransferError, TransferPaused
from edgeagent.mqtt import Message, MqttSession
from edgeagent.protocol import BLOCK_HEADER_SIZE, BlockReply, BlockRequest, BlockStatus, BundleRef, Topics
from edgeagent.storage import atomic_write_bytes, hash_file

log = logging.getLogger(__name__)

KiB = 1024


@dataclass(frozen=True)
class TransferConfig:
    """Block transfer tuning (defaults from bench/transfer.py, see bench/RESULTS.md)."""

    block_size: int = 256 * KiB
    window: int = 32
    run: int = 1
    block_timeout_s: float = 5.0
    max_tries: int = 10
    connect_timeout_s: float = 300.0
    progress_interval_s: float = 0.5  # at most one progress callback per interval

    def __post_init__(self) -> None:
        if not 4 * KiB <= self.block_size <= 256 * KiB:
            raise ValueError(f"block_size {self.block_size} must be within 4 KiB-256 KiB")
        if self.window < 1 or self.run < 1 or self.run > self.window:
            raise ValueError("window must be >= 1 and run within 1..window")


@dataclass
class TransferStats:
    blocks_total: int = 0
    blocks_at_start: int = 0
    blocks_received: int = 0
    duplicates: int = 0
    corrupt: int = 0
    timeouts: int = 0
    requests: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for real; ENOSPC is raised, never hidden behind a sparse file.

    Only a filesystem that cannot preallocate at all (EOPNOTSUPP, EINVAL) gets a sparse
    file; the free-space check before the download stands in for the reservation there.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


class _Bitmap:
    def __init__(self, n: int, data: bytes | None = None) -> None:
        self.n = n
        self.bits = bytearray(data) if data is not None else bytearray((n + 7) // 8)
        if len(self.bits) != (n + 7) // 8:
            raise ValueError("bitmap length does not match the block count")

    def __contains__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)


class _Transfer:
    """State of one download, shared between the fetch loop and the network thread."""

    def __init__(self, ref: BundleRef, block_size: int, part: Path, bitmap: _Bitmap) -> None:
        self.ref = ref
        self.block_size = block_size
        self.n = bitmap.n
        self.bitmap = bitmap
        self.fd = os.open(part, os.O_RDWR)
        self.cond = threading.Condition()
        self.pending: dict[int, float] = {}  # block -> deadline (monotonic)
        self.tries: dict[int, int] = {}
        self.retry: deque[int] = deque()
        self.unsynced = 0
        self.fatal: str | None = None
        self.write_error: OSError | None = None  # raised by the fetch loop, not the network thread


class BlockDownloader:
    """Downloads bundles by sha256 into ``downloads_dir``; one transfer at a time."""

    def __init__(
        self,
        session: MqttSession,
        device_id: str,
        downloads_dir: Path,
        *,
        topics: Topics | None = None,
        config: TransferConfig | None = None,
    ) -> None:
        self.session = session
        self.device_id = device_id
        self.dir = downloads_dir
        self.topics = topics or Topics()
        self.config = config or TransferConfig()
        self.stats = TransferStats()
        self._active: _Transfer | None = None
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        session.subscribe(
            self.topics.blocks(device_id),
            self._on_block,
            qos=1,
            inline=True,  # a pwrite per block: cheaper than a queue hop, and no payload piles up
            max_bytes=BLOCK_HEADER_SIZE + 256 * KiB,
        )

    def paths(self, sha256: str) -> tuple[Path, Path, Path]:
        """(.part, .state, finished .bundle) paths for a sha256."""
        return self.dir / f"{sha256}.part", self.dir / f"{sha256}.state", self.dir / f"{sha256}.bundle"

    def discard(self, sha256: str) -> None:
        """Forget a download (partial or finished)."""
        for path in self.paths(sha256):
            path.unlink(missing_ok=True)

    def fetch(
        self,
        ref: BundleRef,
        *,
        progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Path:
        """Download ``ref`` (resuming what is on disk) and return the finished file's path."""
        part, state, done = self.paths(ref.sha256)
        if done.exists() and done.stat().st_size == ref.size:
            return done
        started = time.monotonic()
        transfer = self._open(ref, part, state)
        self.stats = TransferStats(blocks_total=transfer.n, blocks_at_start=transfer.bitmap.count())
        with self._lock:
            self._active = transfer
        try:
            self._run(transfer, state, progress, stop or threading.Event())
        finally:
            with self._lock:
                self._active = None
            # Whatever stopped the loop, the blocks written so far are good: record them so
            # a resume asks only for what is missing.
            self._persist(transfer, state)
            os.close(transfer.fd)
            self.stats.seconds = time.monotonic() - started
        digest = hash_file(part)[1]
        if digest != ref.sha256:
            # Every block was checked, so this is a registry serving other bytes under this id.
            self.discard(ref.sha256)
            raise HashMismatch(f"downloaded file has sha256 {digest[:12]}…, expected {ref.sha256[:12]}…")
        part.replace(done)
        state.unlink(missing_ok=True)
        return done

    # --- internals ---------------------------------------------------------------------

    def _open(self, ref: BundleRef, part: Path, state: Path) -> _Transfer:
        block_size = self.config.block_size
        bitmap: _Bitmap | None = None
        if part.exists() and state.exists():
            try:
                saved = json.loads(state.read_text())
                if saved["size"] == ref.size and part.stat().st_size == ref.size:
                    block_size = int(saved["block_size"])
                    n = -(-ref.size // block_size)
                    bitmap = _Bitmap(n, base64.b64decode(saved["bitmap"]))
                    log.info("resuming %s: %d of %d blocks on disk", ref.sha256[:12], bitmap.count(), n)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("discarding unreadable download state for %s: %s", ref.sha256[:12], exc)
                bitmap = None
        if bitmap is None:
            n = -(-ref.size // block_size)
            bitmap = _Bitmap(n)
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _preallocate(fd, ref.size)
            except OSError:
                os.close(fd)
                part.unlink(missing_ok=True)  # a file that could not get its space is no download
                raise
            os.close(fd)
            self._save_state(state, ref, block_size, bitmap)
        return _Transfer(ref, block_size, part, bitmap)

    @staticmethod
    def _save_state(state: Path, ref: BundleRef, block_size: int, bitmap: _Bitmap) -> None:
        body = {
            "size": ref.size,
            "block_size": block_size,
            "bitmap": base64.b64encode(bytes(bitmap.bits)).decode(),
        }
        atomic_write_bytes(state, json.dumps(body).encode())

    def _persist(self, t: _Transfer, state: Path) -> None:
        # Data first, then the bitmap that vouches for it.
        os.fdatasync(t.fd)
        with t.cond:
            snapshot = _Bitmap(t.n, bytes(t.bitmap.bits))
            t.unsynced = 0
        self._save_state(state, t.ref, t.block_size, snapshot)

    def _run(
        self,
        t: _Transfer,
        state: Path,
        progress: Callable[[int, int], None] | None,
        stop: threading.Event,
    ) -> None:
        cfg = self.config
        todo: deque[int] = deque(i for i in range(t.n) if i not in t.bitmap)
        last_progress = 0.0
        while True:
            with t.cond:
                if t.write_error is not None:
                    raise t.write_error
                if t.fatal:
                    raise TransferError(t.fatal, sha256=t.ref.sha256)
                while t.retry:
                    todo.appendleft(t.retry.pop())
                if not todo and not t.pending:
                    break
            if stop.is_set():
                raise TransferPaused("transfer stopped", sha256=t.ref.sha256)
            if not self.session.connected:
                # Requests in flight are lost with the connection: ask again once back.
                with t.cond:
                    todo.extendleft(sorted(t.pending, reverse=True))
                    t.pending.clear()
                if not self.session.wait_connected(cfg.connect_timeout_s):
                    raise TransferPaused("broker unreachable; will resume later", sha256=t.ref.sha256)
                continue
            self._fill_window(t, todo)
            with t.cond:
                t.cond.wait(0.05)
                now = time.monotonic()
                expired = sorted(i for i, deadline in t.pending.items() if deadline < now)
                for i in expired:
                    del t.pending[i]
                    t.tries[i] = t.tries.get(i, 0) + 1
                    self.stats.timeouts += 1
                    if t.tries[i] >= cfg.max_tries:
                        raise TransferError(
                            f"block {i} timed out {t.tries[i]} times", sha256=t.ref.sha256, block=i
                        )
                todo.extendleft(reversed(expired))
                unsynced = t.unsynced
            if unsynced >= cfg.window:
                self._persist(t, state)
            if progress is not None and time.monotonic() - last_progress >= cfg.progress_interval_s:
                last_progress = time.monotonic()
                progress(min(t.bitmap.count() * t.block_size, t.ref.size), t.ref.size)
        self._persist(t, state)
        if progress is not None:
            progress(t.ref.size, t.ref.size)

    def _fill_window(self, t: _Transfer, todo: deque[int]) -> None:
        cfg = self.config
        while todo:
            with t.cond:
                room = cfg.window - len(t.pending)
                # Ask in runs: one request per block would double the message count.
                if room < min(cfg.run, len(todo)) or room <= 0:
                    return
                first = todo.popleft()
                if first in t.bitmap or first in t.pending:
                    continue
                count = 1
                while (
                    count < min(cfg.run, room)
                    and todo
                    and todo[0] == first + count
                    and todo[0] not in t.bitmap
                ):
                    todo.popleft()
                    count += 1
                deadline = time.monotonic() + cfg.block_timeout_s
                for i in range(first, first + count):
                    t.pending[i] = deadline
            request = BlockRequest(
                device=self.device_id, sha256=t.ref.sha256, first=first, count=count, block_size=t.block_size
            )
            self.stats.requests += 1
            # On this device's own request topic: the broker's ACL pins it to our identity.
            topic = self.topics.registry_get(self.device_id)
            if not self.session.publish(topic, request.model_dump_json(), qos=1):
                with t.cond:  # not connected any more: give them back
                    for i in range(first, first + count):
                        t.pending.pop(i, None)
                todo.extendleft(reversed(range(first, first + count)))
                return

    def _on_block(self, message: Message) -> None:
        try:
            reply = BlockReply.unpack(message.payload)
        except MalformedMessage as exc:
            self.stats.corrupt += 1
            log.warning("dropped a malformed block reply: %s", exc)
            return
        with self._lock:
            t = self._active
        if t is None or reply.sha256 != t.ref.sha256:
            self.stats.duplicates += 1  # a late reply for a transfer that is over
            return
        if reply.status is not BlockStatus.OK:
            reason = reply.payload.decode("utf-8", "replace")[:200]
            with t.cond:
                t.fatal = f"registry answered {reply.status.name.lower()}: {reason}"
                t.cond.notify_all()
            return
        i = reply.index
        expected = min(t.block_size, t.ref.size - i * t.block_size) if i < t.n else -1
        if (
            not reply.crc_ok
            or reply.block_size != t.block_size
            or reply.total_size != t.ref.size
            or len(reply.payload) != expected
        ):
            self.stats.corrupt += 1
            log.warning("block %d of %s failed its check; asking again", i, t.ref.sha256[:12])
            with t.cond:
                if i in t.pending:
                    del t.pending[i]
                    t.retry.append(i)
                t.cond.notify_all()
            return
        with t.cond:
            if i in t.bitmap:
                self.stats.duplicates += 1
                return
        try:
            os.pwrite(t.fd, reply.payload, i * t.block_size)
        except OSError as exc:  # ENOSPC on a sparse file, EIO: the fetch loop raises it
            with t.cond:
                t.write_error = exc
                t.cond.notify_all()
            return
        with t.cond:
            t.bitmap.add(i)
            t.pending.pop(i, None)
            t.unsynced += 1
            self.stats.blocks_received += 1
            self.stats.bytes_received += len(reply.payload)
            t.cond.notify_all()
