"""A bounded on-disk queue of telemetry messages waiting for the broker.

One file per message, named by its sequence number (``0000000000000042.json``), so the
order survives a restart and sending "oldest first" is a sorted directory. Past either
bound (message count, bytes) the *oldest* messages are deleted: recent figures matter
more than old ones when a device comes back. Every drop is counted, for this run and in
total (persisted), and the next message reports both.

Sequence numbers come from here too: they must keep increasing across restarts so the
collector can order and de-duplicate, yet writing a counter file every 10 s wears flash.
So a block of numbers is reserved on disk at a time (:data:`SEQ_BLOCK`) and a restart
continues after the reserved block: within one run the numbers are contiguous, across
a restart there may be a gap.

Files are written to a temporary name and renamed, without fsync (a telemetry spool is
not worth an SD card's write budget): after a power cut a message can be empty or torn;
such a file is deleted when read and counted as dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

SEQ_BLOCK = 1000
STATE_NAME = "state.json"
WARN_EVERY_S = 60.0
_NAME = re.compile(r"^(\d{16})\.json$")


class Spool:
    """Messages by sequence number, oldest first, bounded by ``max_messages`` and ``max_bytes``."""

    def __init__(self, folder: Path, *, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("spool bounds must be at least 1")
        self.folder = folder
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0  # this run
        self._warned_at = -math.inf
        folder.mkdir(parents=True, exist_ok=True)
        self._sizes: OrderedDict[int, int] = OrderedDict()
        for path in sorted(folder.iterdir()):
            match = _NAME.match(path.name)
            if match:
                self._sizes[int(match.group(1))] = path.stat().st_size
            elif path.name.endswith(".tmp"):  # a write cut short by a crash
                path.unlink(missing_ok=True)
        self.bytes = sum(self._sizes.values())
        state = self._read_state()
        self.dropped_total = state.get("dropped_total", 0)
        highest = max(self._sizes, default=0)
        self._next = max(state.get("seq_reserved", 0), highest) + 1
        self._reserved = self._next - 1
        self._enforce_bounds()

    # --- sequence numbers ----------------------------------------------------------------

    def next_seq(self) -> int:
        seq = self._next
        self._next += 1
        if seq > self._reserved:
            self._reserved = seq + SEQ_BLOCK - 1
            self._write_state()
        return seq

    # --- queue ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sizes)

    def seqs(self) -> list[int]:
        """Sequence numbers waiting, oldest first."""
        return list(self._sizes)

    def put(self, seq: int, payload: bytes) -> bool:
        """Store one message; False (and counted as dropped) when the disk refuses it."""
        if seq in self._sizes:
            return True
        path = self._path(seq)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(payload)
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("telemetry spool: cannot write message %d (%s); dropped", seq, exc.strerror or exc)
            self._count_drops(1)
            return False
        # Spilled in-flight messages can be older than what is queued: keep the order by seq.
        out_of_order = bool(self._sizes) and seq < next(reversed(self._sizes))
        self._sizes[seq] = len(payload)
        if out_of_order:
            self._sizes = OrderedDict(sorted(self._sizes.items()))
        self.bytes += len(payload)
        self._enforce_bounds()
        return True

    def read(self, seq: int) -> bytes | None:
        """The message, or None when it is gone or torn (then it is removed and counted)."""
        try:
            payload = self._path(seq).read_bytes()
            json.loads(payload)
        except (OSError, ValueError):
            log.warning("telemetry spool: message %d is unreadable; dropped", seq)
            self.remove(seq)
            self._count_drops(1)
            return None
        return payload

    def remove(self, seq: int) -> None:
        size = self._sizes.pop(seq, None)
        if size is not None:
            self.bytes -= size
        self._path(seq).unlink(missing_ok=True)

    # --- internals -----------------------------------------------------------------------

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:016d}.json"

    def _enforce_bounds(self) -> None:
        dropped = 0
        while self._sizes and (len(self._sizes) > self.max_messages or self.bytes > self.max_bytes):
            oldest = next(iter(self._sizes))
            self.remove(oldest)
            dropped += 1
        if dropped:
            self._count_drops(dropped)
            # A long outage drops one message per interval: say so once a minute, not each time.
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning(
                    "telemetry spool full (%d messages or %d bytes): dropping the oldest (%d so far)",
                    self.max_messages,
                    self.max_bytes,
                    self.dropped,
                )

    def _count_drops(self, n: int) -> None:
        self.dropped += n
        self.dropped_total += n
        self._write_state()

    def _read_state(self) -> dict[str, int]:
        try:
            data = json.loads((self.folder / STATE_NAME).read_text(encoding="utf-8"))
            return {k: int(data[k]) for k in ("seq_reserved", "dropped_total") if k in data}
        except (OSError, ValueError, TypeError):
            return {}

    def _write_state(self) -> None:
        path = self.folder / STATE_NAME
        tmp = path.with_name(STATE_NAME + ".tmp")
        state = {"seq_reserved": self._reserved, "dropped_total": self.dropped_total}
        try:
            tmp.write_text(json.dumps(state), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            # Losing the reservation risks reusing sequence numbers after a restart; the
            # collector would see them as duplicates. Worth a warning, not a crash.
            log.warning("telemetry spool: cannot write %s (%s)", path, exc.strerror or exc)
