"""Log line formats for both programs: text, journald priority prefixes, JSON lines.

Under systemd, stderr goes to the journal, which reads a ``<N>`` prefix on each line as its
priority (sd-daemon(3): 3 error, 4 warning, 6 info, 7 debug), so ``journalctl -p warning``
finds the agent's warnings. systemd says a process is connected to the journal by setting
``$JOURNAL_STREAM`` to the device and inode of that stream.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

FORMATS = ("auto", "text", "journal", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon's ``<N>`` prefix)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def under_journald(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stderr) is the journal stream ``$JOURNAL_STREAM`` names (dev:inode)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):  # no file descriptor (captured stderr)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<4>name: message``; journald stamps time and host itself. Every line gets the prefix."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (Unix seconds), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body)


def resolve(log_format: str) -> str:
    """``auto`` becomes ``journal`` under systemd's journal, else ``text``."""
    if log_format == "auto":
        return "journal" if under_journald() else "text"
    return log_format


def setup_logging(level: int, log_format: str) -> str:
    """Configure the root logger on stderr; return the format in effect."""
    chosen = resolve(log_format)
    handler = logging.StreamHandler(sys.stderr)
    formatter = {"journal": JournalFormatter(), "json": JsonFormatter()}.get(chosen)
    handler.setFormatter(formatter or logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    return chosen


def error_line(prog: str, text: str, log_format: str) -> str:
    """The one line a failed command prints, in the log format in effect."""
    if log_format == "journal":
        return f"<{priority(logging.ERROR)}>{prog}: {text}"
    if log_format == "json":
        record = logging.LogRecord(prog, logging.ERROR, "", 0, text, None, None)
        return JsonFormatter().format(record)
    return f"{prog}: {text}"
