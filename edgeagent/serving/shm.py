"""Large tensors through shared memory: a sealed memfd passed with the frame, mapped without a copy.

Over the socket, a request's bytes are copied twice (into the kernel by the client, out of it
by the server); through shared memory the client writes them once into a memfd and the
server maps that memfd and runs the model on views of it. The wire side (see
``docs/runtimes.md``):

1. the client sends an options frame (type 3) on a framed connection; an agent that allows
   shared memory answers ``{"shm": {"max_bytes": N}}`` and from then on reads that connection
   with ``recvmsg``, keeping the descriptors that come with a frame; an older agent answers
   ``400 bad_frame`` and the client keeps sending plain frames;
2. a predict frame with the ``shm`` flag has the usual head and no data: its arrays lie at
   the head's offsets in the one memfd sent with the frame (SCM_RIGHTS).

What the server checks, because the descriptor comes from another process: the peer has the
server's own uid (SO_PEERCRED; others are told no in step 1, and the kernel closes any
descriptor they send); the descriptor is a memfd sealed against shrinking (``F_SEAL_SHRINK``:
a client that truncated a mapped file would kill the server with SIGBUS); its real size
(fstat) covers the arrays, whatever the head says; the arrays fit the body limit. Every
descriptor is closed whatever happens; a mapping is kept per connection while the client
keeps sending the same memfd (with inputs no larger), and unmapped when the connection ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeagent.serving.frames import FrameError, Layout
from edgeagent.serving.http import HttpError

MIN_BYTES = 256 * 1024  # the client's default: smaller requests go over the socket (as fast there)
_STEP = 1 << 20  # client buffers grow in whole MiB, so a few sizes share one memfd
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # fault the pages in with the mmap (Linux, Python 3.10+)


class InputMaps:
    """The server's side of one connection: maps the memfd a request came with (and keeps it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._key: tuple[int, int] | None = None  # (st_dev, st_ino) of the mapped memfd
        self._map: mmap.mmap | None = None

    def feeds(self, fds: Sequence[int], layout: Layout) -> np.ndarray | dict[str, np.ndarray]:
        """The request's inputs: read-only views of the memfd in ``fds`` (the caller closes ``fds``)."""
        if len(fds) != 1:
            raise FrameError(
                f"a shared-memory frame comes with exactly one file descriptor, not {len(fds)}", "bad_shm"
            )
        need = layout.data_size
        if need > self.max_bytes:
            raise HttpError(
                413,
                "body_too_large",
                f"the arrays are {need} bytes; the limit is {self.max_bytes}",
                close=False,
            )
        buffer = self._mapping(fds[0], need) if need else b""
        arrays = [np.ndarray(a.shape, a.dtype, buffer, a.offset) for a in layout.arrays]
        if layout.unnamed:
            only: np.ndarray = arrays[0]
            return only
        return {a.name: v for a, v in zip(layout.arrays, arrays, strict=True)}

    def _mapping(self, fd: int, need: int) -> mmap.mmap:
        try:
            info = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if stat.S_ISREG(info.st_mode) else None
        except OSError:  # F_GET_SEALS fails (EINVAL) on anything but a memfd
            seals = None
        if seals is None:
            raise FrameError("the file descriptor is not shared memory (a memfd)", "bad_shm")
        if not seals & fcntl.F_SEAL_SHRINK:
            raise FrameError("the memfd must be sealed against shrinking (F_SEAL_SHRINK)", "bad_shm")
        if info.st_size < need:
            raise FrameError(f"the memfd is {info.st_size} bytes; the frame's arrays need {need}", "bad_shm")
        key = (info.st_dev, info.st_ino)
        if key == self._key and self._map is not None and len(self._map) >= need:
            return self._map  # the client's buffer again: already mapped
        self.close()
        try:
            # Only what the arrays need (bounded above): mapping and populating a large, sparse memfd
            # would allocate its holes here. The same memfd with inputs as large maps once.
            self._map = mmap.mmap(fd, need, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise FrameError(f"cannot map the memfd: {exc}", "bad_shm") from exc
        self._key = key
        return self._map

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
                self._map.close()
        self._map, self._key = None, None


class InputBuffer:
    """The client's side: one sealed memfd, reused for every request that fits it."""

    def __init__(self) -> None:
        self.fd = -1
        self._map: mmap.mmap | None = None

    def write(self, arrays: Sequence[np.ndarray], offsets: Sequence[int], size: int) -> int:
        """Copy ``arrays`` to ``offsets`` (bytes) in the memfd; returns its descriptor (still ours)."""
        mapped = self._map
        if mapped is None or len(mapped) < size:
            mapped = self._grow(max(_STEP, -(-size // _STEP) * _STEP))
        for array, offset in zip(arrays, offsets, strict=True):
            if array.nbytes:
                target: np.ndarray[Any, Any] = np.ndarray(array.shape, array.dtype, mapped, offset)
                np.copyto(target, array, casting="no")
                del target  # no view may outlive a request: the buffer is closed when it grows
        return self.fd

    def _grow(self, size: int) -> mmap.mmap:
        self.close()
        fd = os.memfd_create("edgeagent-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # fixed size: the server maps it, and a shrink would fault its reads
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapped = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self._map = fd, mapped
        return mapped

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def available() -> bool:
    """Whether this Python and kernel can create sealed memfds."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
