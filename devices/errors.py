"""Exceptions raised by :mod:`devices`, one root for the package.

::

    edgeagent.errors.EdgeError      (the project's root: the CLI prints it as one line)
    └── DeviceError                 root of this package; every error carries a one-line message
        ├── UnknownProfile          a profile name that no shipped profile file defines (also a UsageError)
        ├── ProfileInvalid          a profile file is not TOML or fails the schema (a packaging bug)
        └── DetectionError          the root filesystem given to detection cannot be read

``DeviceError`` subclasses :class:`edgeagent.errors.EdgeError` so that both command-line
programs' error boundary turns it into one line. That module imports nothing, so this
does not make ``devices`` depend on the rest of ``edgeagent``.
"""

from __future__ import annotations

from edgeagent.errors import EdgeError, UsageError


class DeviceError(EdgeError):
    """Root of every error raised on purpose by :mod:`devices`."""


class UnknownProfile(DeviceError, UsageError):
    """No profile of that name ships with this version (a usage error: exit 2)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown device profile {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = known


class ProfileInvalid(DeviceError):
    """A shipped profile file cannot be parsed or fails the schema."""

    def __init__(self, message: str, *, profile: str) -> None:
        super().__init__(f"device profile {profile!r}: {message}")
        self.profile = profile


class DetectionError(DeviceError):
    """The root filesystem handed to detection is not a readable directory."""

    def __init__(self, message: str, *, root: str) -> None:
        super().__init__(message)
        self.root = root
