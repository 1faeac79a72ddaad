"""Socket timeouts kept in the kernel, so that a recv or send is one system call.

A Python socket with ``settimeout(t)`` polls before every ``recv``/``send`` (two system
calls, ~1.5 µs more per call on the development VM, four times per round trip). A blocking
socket with ``SO_RCVTIMEO``/``SO_SNDTIMEO`` gets the same bound from the kernel, which then
fails the call with EAGAIN (``BlockingIOError``) instead of ``TimeoutError``. Where the
options cannot be set, the socket keeps Python's own timeout.

:func:`send_parts` sends a frame given as several buffers without joining them.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

# struct timeval: two longs; a 32-bit system built with a 64-bit time_t takes two int64.
_TIMEVAL_FORMATS = ("@ll", "@qq")

TIMEOUT_ERRORS = (TimeoutError, BlockingIOError)  # what a timed-out recv/send raises, either way


def _timeval(option: int, sock: socket.socket, seconds: float) -> bool:
    whole = int(seconds)
    micro = round((seconds - whole) * 1e6)
    for fmt in _TIMEVAL_FORMATS:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, struct.pack(fmt, whole, micro))
        except (OSError, struct.error):
            continue
        return True
    return False


class Timeouts:
    """Receive and send timeouts of one socket, set in the kernel when it can take them."""

    __slots__ = ("_recv", "kernel", "sock")

    def __init__(self, sock: socket.socket, recv_s: float, send_s: float) -> None:
        self.sock = sock
        sock.settimeout(None)
        sent = _timeval(socket.SO_SNDTIMEO, sock, send_s)
        self.kernel = sent and _timeval(socket.SO_RCVTIMEO, sock, recv_s)
        if not self.kernel:
            sock.settimeout(recv_s)
        self._recv = recv_s

    def recv(self, seconds: float) -> None:
        """Bound the next receives to ``seconds`` (a no-op when it is already the bound)."""
        if seconds == self._recv:
            return
        self._recv = seconds
        if not self.kernel or not _timeval(socket.SO_RCVTIMEO, self.sock, seconds):
            self.sock.settimeout(seconds)


def send_parts(sock: socket.socket, parts: Sequence[Any], fds: Sequence[int] = ()) -> None:
    """Send ``parts`` (buffers) in order without joining them; ``fds`` go with the first byte.

    One ``sendall`` for a single buffer; otherwise ``sendmsg`` (scatter-gather, no copy in
    Python), resumed after a partial send, which a large frame on a full socket buffer gets.
    """
    if len(parts) == 1 and not fds:
        sock.sendall(parts[0])
        return
    views: list[memoryview] = []
    for part in parts:
        view = memoryview(part)
        if view.nbytes:  # an empty array's view cannot be cast
            views.append(view.cast("B"))  # byte offsets for the resume after a partial send
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while views:
        sent = sock.sendmsg(views, ancillary)
        ancillary = []  # the kernel attached the descriptors to the bytes just sent
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


MAX_FDS = 4  # descriptors one read takes; more are closed by the kernel (MSG_CTRUNC)
ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def fds_from(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an ``SCM_RIGHTS`` message carried (now open in this process: close them)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where unknown)."""
    creds = struct.Struct("3i")  # struct ucred: pid, uid, gid
    try:
        _, uid, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    except (OSError, AttributeError, struct.error):
        return None
    return int(uid)


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
