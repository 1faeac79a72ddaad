"""Exceptions raised by :mod:`devices`, one root for the package.

::

    edgeagent.errors.EdgeError      (the project's root: the CLI prints it as one line)
    └── DeviceError                 root of this package; every error carries a one-line message
        ├── UnknownProfile          a profile name that no shipped profile file defines (a UsageError: exit 2)
        ├── ProfileInvalid          a profile file cannot be read, is not TOML, or fails the schema
        │                           (a UsageError: exit 2, like agent.toml)
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
    """No profile of that name ships with this version."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown device profile {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = known


class ProfileInvalid(DeviceError, UsageError):
    """A profile file cannot be read or parsed, or fails the schema.

    ``path`` names an operator's file (a profiles folder, ``--profile-file``); ``profile``
    a shipped profile (a packaging bug). The message names the file and the field.
    """

    def __init__(self, message: str, *, profile: str | None = None, path: str | None = None) -> None:
        where = f"profile file {path}" if path is not None else f"device profile {profile!r}"
        super().__init__(f"{where}: {message}")
        self.profile = profile
        self.path = path


class DetectionError(DeviceError):
    """The root filesystem handed to detection is not a readable directory."""

    def __init__(self, message: str, *, root: str) -> None:
        super().__init__(message)
        self.root = root
