"""Exceptions raised by :mod:`edgeagent`, one root for the whole package.

::

    EdgeError                       root; every error here carries a one-line message
    ├── UsageError                  the caller asked for something impossible (bad flag, missing file)
    ├── KeyFileError                a signing key cannot be read, written or parsed
    ├── ModelInspectionError        a model file cannot be opened to read its inputs/outputs
    └── BundleError                 a bundle was refused; ``code`` names the reason for events/telemetry
        ├── ManifestError
        │   ├── MalformedManifest       manifest.json is not JSON (or not an object)
        │   ├── UnknownSchemaVersion    schema_version is one this reader does not know
        │   └── SchemaViolation         manifest.json fails the pydantic schema
        ├── SignatureError
        │   ├── MissingSignature        no manifest.sig and unsigned bundles are not allowed
        │   ├── UnknownKey              signed by a key id that is not trusted
        │   └── BadSignature            the signature does not match the manifest bytes
        ├── IntegrityError
        │   ├── HashMismatch            a file's sha256 differs from the manifest
        │   ├── SizeMismatch            a file's size differs from the manifest
        │   ├── MissingFile             the manifest lists a file the archive lacks
        │   ├── ExtraFile               the archive holds a file the manifest does not list
        │   └── TruncatedBundle         the archive ends early or is not a tar at all
        └── UnsafeMember                the archive tries to escape or abuse the target folder
            ├── AbsolutePath
            ├── PathTraversal           a ``..`` component
            ├── LinkMember              symlink or hardlink
            ├── SpecialMember           device, fifo, directory or other non-regular member
            ├── DuplicateMember
            └── SizeLimitExceeded       a member or the total is over the configured bound

Third-party errors (tarfile, json, pydantic, cryptography) are translated at the one
boundary that calls them, with ``raise ... from exc``.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of every error raised on purpose by edgeagent."""

    def __init__(self, message: str) -> None:
        if not message:
            raise ValueError("an EdgeError needs a message")
        super().__init__(message)


class UsageError(EdgeError):
    """The user asked for something that cannot be done as asked (a flag, a missing file)."""


class KeyFileError(EdgeError):
    """A signing key file cannot be read, written or parsed."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModelInspectionError(EdgeError):
    """A model file cannot be opened to read its input/output specs."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BundleError(EdgeError):
    """A bundle was refused. ``code`` is a stable, machine-readable reason."""

    code = "bundle_error"

    def __init__(self, message: str, *, member: str | None = None, bundle: str | None = None) -> None:
        super().__init__(message)
        self.member = member
        self.bundle = bundle

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.bundle}: {text}" if self.bundle else text


class ManifestError(BundleError):
    code = "manifest_error"


class MalformedManifest(ManifestError):
    code = "malformed_manifest"


class UnknownSchemaVersion(ManifestError):
    code = "unknown_schema_version"


class SchemaViolation(ManifestError):
    code = "schema_violation"


class SignatureError(BundleError):
    code = "signature_error"


class MissingSignature(SignatureError):
    code = "missing_signature"


class UnknownKey(SignatureError):
    code = "unknown_key"


class BadSignature(SignatureError):
    code = "bad_signature"


class IntegrityError(BundleError):
    code = "integrity_error"


class HashMismatch(IntegrityError):
    code = "hash_mismatch"


class SizeMismatch(IntegrityError):
    code = "size_mismatch"


class MissingFile(IntegrityError):
    code = "missing_file"


class ExtraFile(IntegrityError):
    code = "extra_file"


class TruncatedBundle(IntegrityError):
    code = "truncated"


class UnsafeMember(BundleError):
    code = "unsafe_member"


class AbsolutePath(UnsafeMember):
    code = "absolute_path"


class PathTraversal(UnsafeMember):
    code = "path_traversal"


class LinkMember(UnsafeMember):
    code = "link_member"


class SpecialMember(UnsafeMember):
    code = "special_member"


class DuplicateMember(UnsafeMember):
    code = "duplicate_member"


class SizeLimitExceeded(UnsafeMember):
    code = "size_limit"
