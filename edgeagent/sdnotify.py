"""systemd's service notification protocol (sd_notify), in the standard library only.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a Unix datagram socket, by
path or, when it starts with ``@``, in the abstract namespace. A notification is one
datagram of newline-separated ``KEY=VALUE`` lines (``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``). Outside systemd the variable is unset and every call here
does nothing, so the agent runs the same from a shell.

``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when set, naming this process) say that systemd
kills and restarts the service if no ``WATCHDOG=1`` arrives within that many microseconds;
:func:`watchdog_ping_interval_s` gives how often to ping.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    # systemd 254+ may also offer "vsock:CID:PORT" (for VMs); the agent never runs there.
    log.warning("ignoring NOTIFY_SOCKET=%r: only path and abstract sockets are supported", value)
    return None


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one notification.

    Returns True if it was sent, False when not running under systemd (``NOTIFY_SOCKET``
    unset) or when sending failed. Failure is logged, not raised: a lost notification is
    systemd's to act on (a missed watchdog restarts the service), not a reason to crash.
    """
    environ = os.environ if environ is None else environ
    target = environ.get(NOTIFY_SOCKET)
    if not target or not lines:
        return False
    address = _address(target)
    if address is None:
        return False
    for line in lines:
        if "\n" in line:
            raise ValueError(f"a notification line cannot contain a newline: {line!r}")
    payload = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", target, exc)
        return False
    return True


def watchdog_usec(environ: Mapping[str, str] | None = None) -> int | None:
    """systemd's watchdog timeout in microseconds, or None if the watchdog is off for us.

    It is off when ``WATCHDOG_USEC`` is unset, not a positive integer, or when
    ``WATCHDOG_PID`` names another process (a child that inherited the environment).
    """
    environ = os.environ if environ is None else environ
    raw_usec = environ.get(WATCHDOG_USEC, "")
    raw_pid = environ.get(WATCHDOG_PID, "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec


def watchdog_ping_interval_s(fraction: float = 0.5, environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: ``fraction`` of the timeout (systemd's advice
    is half), or None when the watchdog is off."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    usec = watchdog_usec(environ)
    return None if usec is None else usec * fraction / 1_000_000
