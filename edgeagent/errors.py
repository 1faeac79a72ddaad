"""Exceptions raised by :mod:`edgeagent`, one root for the whole package.

::

    EdgeError                       root; every error here carries a one-line message
    ├── UsageError                  the caller asked for something impossible (bad flag, missing file): exit 2
    │   └── KeyFileError            a signing key cannot be read, written or parsed
    ├── ModelInspectionError        a model file cannot be opened to read its inputs/outputs
    ├── RuntimeUnavailable          a runtime's Python package is not installed (names what to pip install)
    ├── ModelLoadError              a runtime could not load a model file
    ├── InferenceError              a runtime failed while running a loaded model
    ├── InputError                  request inputs do not fit the model; ``code`` says how (bad_shape...)
    ├── NoCandidate                 selection left no runtime/delegate for a bundle; carries the decision
    ├── AcceptanceFailed            the golden set missed a bound of the acceptance gate; carries the verdict
    ├── ServingError                the local inference endpoint
    │   ├── ServerUnreachable       the client cannot connect to (or lost) the Unix socket
    │   └── RequestFailed           the server answered 4xx/5xx; ``status`` and ``code`` from its JSON reason
    └── BundleError                 a bundle was refused; ``code`` names the reason for events/telemetry
        ├── ManifestError
        │   ├── MalformedManifest       manifest.json is not JSON (or not an object)
        │   ├── UnknownSchemaVersion    schema_version is one this reader does not know
        │   └── SchemaViolation         manifest.json fails the pydantic schema
        ├── SignatureError
        │   ├── MissingSignature        no manifest.sig and unsigned bundles are not allowed
        │   ├── UnknownKey              signed by a key id that is not trusted
    │   ├── RevokedKey              signed by a key the current key set revokes (edgeagent.trust)
    │   ├── ExpiredKey              signed by a key past its expiry, or its key set's
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

Third-party errors (tarfile, json, pydantic, cryptography, onnxruntime, LiteRT) are translated at the one
boundary that calls them, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[EdgeError], args: tuple[Any, ...], state: dict[str, Any]) -> EdgeError:
    """Unpickle an :class:`EdgeError` without calling its ``__init__`` (see ``__reduce__``)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class EdgeError(Exception):
    """Root of every error raised on purpose by edgeagent."""

    code = "error"  # stable, machine-readable reason for events; subclasses narrow it

    def __init__(self, message: str) -> None:
        if not message:
            raise ValueError("an EdgeError needs a message")
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own pickling calls ``cls(*args)``, which fails for every subclass with
        # keyword-only fields (``InputError(message, code=...)``) or a reworded message; a
        # worker process that raised one then hung its parent. Rebuild from the final message
        # and the instance fields instead, whatever the constructor's signature.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class UsageError(EdgeError):
    """The user asked for something that cannot be done as asked (a flag, a missing file)."""


class KeyFileError(UsageError):
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


class RevokedKey(SignatureError):
    code = "revoked_key"


class ExpiredKey(SignatureError):
    code = "expired_key"


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


class RuntimeUnavailable(EdgeError):
    """A runtime adapter's package does not import; the message says what to install."""

    code = "runtime_unavailable"

    def __init__(self, message: str, *, runtime: str) -> None:
        super().__init__(message)
        self.runtime = runtime


class ModelLoadError(EdgeError):
    """A runtime could not load a model file (corrupt file, unsupported op, bad options)."""

    code = "model_load_failed"

    def __init__(self, message: str, *, runtime: str, path: str) -> None:
        super().__init__(message)
        self.runtime = runtime
        self.path = path


class InferenceError(EdgeError):
    """A loaded model failed while running (a runtime error, not a bad input)."""

    code = "inference_failed"

    def __init__(self, message: str, *, runtime: str) -> None:
        super().__init__(message)
        self.runtime = runtime


class InputError(EdgeError):
    """Inputs do not fit the model. ``code``: unknown_input, missing_input, bad_shape, bad_dtype,
    bad_value, bad_body; ``tensor`` names the input when one is at fault."""

    def __init__(self, message: str, *, code: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.tensor = tensor


class NoCandidate(EdgeError):
    """No (runtime, delegate, precision) candidate survived selection for a bundle.

    ``decision`` is the :class:`edgeagent.selection.Decision` with every rejection's reason.
    """

    code = "no_candidate"

    def __init__(self, message: str, *, decision: object) -> None:
        super().__init__(message)
        self.decision = decision


class AcceptanceFailed(EdgeError):
    """No candidate's artifact passed its own acceptance gate.

    ``verdict`` is the :class:`edgeagent.acceptance.Verdict` of the first one tried (each
    number next to its bound); ``decision``, when set, the :class:`edgeagent.selection.Decision`
    with every candidate tried and why it was rejected.
    """

    code = "acceptance_failed"

    def __init__(self, message: str, *, verdict: object, decision: object = None) -> None:
        super().__init__(message)
        self.verdict = verdict
        self.decision = decision


class ServingError(EdgeError):
    """Root of errors of the local inference endpoint and its client."""


class ServerUnreachable(ServingError):
    """The client could not connect to the server's Unix socket, or the connection broke."""

    def __init__(self, message: str, *, socket_path: str) -> None:
        super().__init__(message)
        self.socket_path = socket_path


class RequestFailed(ServingError):
    """The server answered with an error status; ``code`` is its machine-readable reason."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- deployment over MQTT --------------------------------------------------------------
# EdgeError
# ├── MalformedMessage         an MQTT message does not parse or fails its schema
# ├── DocumentRefused          a signed desired doc or command was refused; ``code`` says why
# │   ├── ReplayedDocument         its seq is not newer than the last accepted one
# │   ├── SeqInFuture              its seq is further ahead of the device clock than allowed
# │   ├── DowngradeRefused         it asks for a lower version without a signed rollback
# │   └── KeySetRefused            a root-signed key set was refused (edgeagent.trust)
# │       ├── KeySetRollback           its version is older than the one the device holds
# │       └── KeySetExpired            it has expired
# ├── TransferError            a block transfer gave up; carries ``sha256`` and ``block``
# │   └── TransferPaused           stopped or the broker is away: the download resumes later
# └── DeploymentError          a deployment step refused or failed; ``code`` names why
#     └── InsufficientSpace        the store's filesystem lacks room; carries ``needed`` and ``free``
# (edgeagent.deploy.machine.IllegalTransition is deliberately not an EdgeError: it is a bug.)
# (Signatures on documents raise the SignatureError family above, like bundles.)


class MalformedMessage(EdgeError):
    """An MQTT message that does not parse or fails its schema (dropped, counted, reported)."""

    code = "malformed_message"


class DocumentRefused(EdgeError):
    """A signed document or command refused; ``seq`` is its sequence, ``last`` the device's."""

    code = "document_refused"

    def __init__(self, message: str, *, seq: int | None = None, last: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq
        self.last = last


class ReplayedDocument(DocumentRefused):
    code = "replayed"


class SeqInFuture(DocumentRefused):
    code = "seq_in_future"


class DowngradeRefused(DocumentRefused):
    code = "downgrade"


class KeySetRefused(DocumentRefused):
    code = "keyset_refused"


class KeySetRollback(KeySetRefused):
    code = "keyset_rollback"


class KeySetExpired(KeySetRefused):
    code = "keyset_expired"


class TransferError(EdgeError):
    """A bundle download gave up (registry does not have it, blocks keep timing out)."""

    code = "transfer_failed"

    def __init__(self, message: str, *, sha256: str, block: int | None = None) -> None:
        super().__init__(message)
        self.sha256 = sha256
        self.block = block


class TransferPaused(TransferError):
    """The transfer stopped without failing (a stop was asked, the broker is away); it resumes later."""

    code = "transfer_paused"


class DeploymentError(EdgeError):
    """A deployment step refused or failed; ``code`` is the reason reported in the outcome."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class InsufficientSpace(DeploymentError):
    """The store's filesystem has ``free`` bytes where a step needs ``needed``."""

    def __init__(self, message: str, *, needed: int, free: int) -> None:
        super().__init__(message, code="insufficient_space")
        self.needed = needed
        self.free = free
