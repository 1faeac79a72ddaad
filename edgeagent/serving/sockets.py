"""Socket timeouts kept in the kernel, so that a recv or send is one system call.

A Python socket with ``settimeout(t)`` polls before every ``recv``/``send`` (two system
calls, ~1.5 µs more per call on the development VM, four times per round trip). A blocking
socket with ``SO_RCVTIMEO``/``SO_SNDTIMEO`` gets the same bound from the kernel, which then
fails the call with EAGAIN (``BlockingIOError``) instead of ``TimeoutError``. Where the
options cannot be set, the socket keeps Python's own timeout.
"""

from __future__ import annotations

import socket
import struct

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
