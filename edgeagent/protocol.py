"""The MQTT protocol, v1: topic names and message schemas in one place (see docs/protocol.md).

Control messages are JSON validated by the pydantic models below; block replies are binary
(a fixed header + the bytes). Desired-state documents and commands travel in a signed
envelope: the exact JSON text of the document plus an Ed25519 signature of those bytes,
made with the same keys that sign bundles.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from edgeagent.defaults import DEFAULT_PREFIX
from edgeagent.errors import BadSignature, MalformedMessage, MissingSignature
from edgeagent.signing import KeyRing, Signature, SigningKey

PROTOCOL_VERSION: Literal[1] = 1

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def _check_id(value: str) -> str:
    # Ids become topic levels: no '/', '+', '#', no empty level, no '$' prefix.
    if not _ID.match(value):
        raise ValueError(f"{value!r} is not a valid id (1-64 of letters, digits, '_', '.', ':', '-')")
    return value


DeviceId = Annotated[str, AfterValidator(_check_id)]
GroupName = Annotated[str, AfterValidator(_check_id)]
ModelName = Annotated[str, AfterValidator(_check_id)]


def check_id(value: str, what: str = "id") -> str:
    """Validate a device id, group or model name for use in a topic; raise ValueError if bad."""
    try:
        return _check_id(value)
    except ValueError as exc:
        raise ValueError(f"{what} {exc}") from None


@dataclass(frozen=True)
class Topics:
    """Every topic of protocol v1 under one prefix (default ``edge``)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.startswith("$"):
            raise ValueError(
                f"topic prefix {self.prefix!r} must be non-empty, without '+', '#' or a leading '$'"
            )

    @property
    def root(self) -> str:
        return f"{self.prefix}/v{PROTOCOL_VERSION}"

    def device_desired(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/desired"

    def group_desired(self, group: str) -> str:
        return f"{self.root}/group/{check_id(group, 'group')}/desired"

    def device_desired_model(self, device: str, model: str) -> str:
        """One model's own desired doc: concurrent pushes of different models never collide."""
        return f"{self.device_desired(device)}/{check_id(model, 'model')}"

    def group_desired_model(self, group: str, model: str) -> str:
        return f"{self.group_desired(group)}/{check_id(model, 'model')}"

    def reported(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/reported"

    def events(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/events"

    def telemetry(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/telemetry"

    def cmd(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/cmd"

    def cmd_reply(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/cmd/reply"

    def blocks(self, device: str) -> str:
        return f"{self.root}/device/{check_id(device, 'device')}/blocks"

    def registry_get(self, device: str) -> str:
        """Where ``device`` asks for blocks: its id in the topic, so a broker ACL can pin it."""
        return f"{self.root}/registry/get/{check_id(device, 'device')}"

    @property
    def registry_get_all(self) -> str:
        """Every device's request topic (what a single registry subscribes to)."""
        return f"{self.root}/registry/get/+"

    def registry_shared(self, share: str = "registry") -> str:
        """The shared subscription registry replicas use so each request reaches one of them."""
        return f"$share/{check_id(share, 'share group')}/{self.registry_get_all}"

    def requester_of(self, topic: str) -> str | None:
        """The device id in a ``.../registry/get/{id}`` topic, or None (not a valid request topic)."""
        prefix = f"{self.root}/registry/get/"
        if not topic.startswith(prefix):
            return None
        device = topic[len(prefix) :]
        return device if _ID.match(device) else None

    @property
    def trust(self) -> str:
        """The retained, root-signed key set (edgeagent.trust)."""
        return f"{self.root}/trust"

    def all_devices(self, leaf: str) -> str:
        """Wildcard subscription over every device's ``leaf`` topic (for fleet tools)."""
        return f"{self.root}/device/+/{leaf}"

    def device_of(self, topic: str) -> str | None:
        """The device id in a ``.../device/{id}/...`` topic, or None."""
        parts = topic.split("/")
        base = self.root.split("/")
        if parts[: len(base)] == base and len(parts) > len(base) + 1 and parts[len(base)] == "device":
            return parts[len(base) + 1]
        return None


_M = TypeVar("_M", bound=BaseModel)


class _Msg(BaseModel):
    """What the host tells a device (and a device the registry): strict.

    Unknown fields are refused and nothing is coerced: ``"seq": "12345678901234"``, ``1.0``
    for an int or ``"true"`` for a bool fail validation rather than being read as what they
    resemble, so a device never acts on a value its signer did not write as such.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Report(_Msg):
    """What a device tells the host (reported state, events, telemetry, command replies).

    Unknown fields are ignored here, not refused: agents and the host's tools are upgraded at
    different times, and a newer agent that adds a figure must not make an older collector
    drop its whole report. What the host tells a device (desired state, commands) stays
    strict, since a device must not act on an instruction it only half understands.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Sequence numbers fit a signed 64-bit integer, whatever stores or compares them later.
SEQ_MAX = 2**63 - 1


class BundleRef(_Msg):
    """Which bundle a model name should run."""

    name: str = Field(description="Bundle name.")
    version: str = Field(description="Bundle semantic version.")
    sha256: Sha256Hex = Field(description="sha256 of the bundle file: its id.")
    size: int = Field(gt=0, description="Bundle file size in bytes.")
    source: str = Field(
        default="mqtt", description="'mqtt' (block transfer from the registry) or an http(s) URL."
    )


class DesiredState(_Msg):
    """What should run on a device (or on every device of a group), model name by model name."""

    v: Literal[1] = PROTOCOL_VERSION
    seq: int = Field(
        ge=1, le=SEQ_MAX, description="Monotonic sequence per target; the agent refuses one not newer."
    )
    target: str = Field(description="'device:ID' or 'group:NAME'; must match the topic it came on.")
    models: dict[ModelName, BundleRef] = Field(
        description="model name -> bundle; an empty map removes nothing."
    )
    rollback: bool = Field(
        default=False, description="Permits versions lower than what runs (a signed rollback)."
    )
    reset_seq: bool = Field(
        default=False,
        description="Accept this seq even if lower than the stored one (a signed way out of a seq "
        "stuck ahead of the clock); each reset must be newer than the last reset.",
    )
    issued_at: float = Field(
        default_factory=time.time, description="Unix time the host signed it (informational)."
    )


class Command(_Msg):
    """A one-off instruction to one device; the reply goes to ``.../cmd/reply``."""

    v: Literal[1] = PROTOCOL_VERSION
    seq: int = Field(ge=1, le=SEQ_MAX, description="Monotonic per device; replays are refused.")
    id: str = Field(min_length=1, max_length=64, description="Echoed in the reply.")
    target: str = Field(description="'device:ID'.")
    name: Literal["refresh", "bench"] = Field(
        description="refresh: republish reported state, clear the failed marks of the desired bundles "
        "and reconcile now; "
        "bench: re-run acceptance on the served models."
    )
    model: str | None = Field(default=None, description="Model name the command concerns (default: all).")
    reset_seq: bool = Field(default=False, description="As DesiredState.reset_seq, for the command seq.")
    issued_at: float = Field(default_factory=time.time)


class CommandReply(_Report):
    v: Literal[1] = PROTOCOL_VERSION
    id: str
    ok: bool
    code: str = Field(default="ok", description="'ok' or the reason code of a refusal/failure.")
    detail: str = ""
    result: dict[str, Any] = Field(default_factory=dict)


# --- what a device reports about a model it proved and chose -------------------------
# The acceptance verdict (edgeagent.acceptance makes it) and the selection decision
# (edgeagent.selection makes it) travel in reported state, events, command replies and
# telemetry; the host reads them as these types, never by string keys.


class Check(_Report):
    """One number of the verdict against its bound."""

    name: str = Field(
        description="accuracy, top1_agreement, tolerance_ratio (tolerance_ratio[<output>] for each "
        "output of a model with several), latency_p95_ms, or a per-output bound of a task gate: "
        "top1_agreement[<output>], topk_agreement[<output>], mse[<output>], max_abs[<output>], "
        "cosine[<output>], iou[<output>], box_match[<output>], tolerance_ratio[<output>]."
    )
    value: float | None = Field(description="What was measured; None when it could not be.")
    op: Literal[">=", "<="] = Field(description="How value must compare with bound to pass.")
    bound: float = Field(description="The gate's bound.")
    passed: bool
    detail: str = Field(default="", description="How the number was obtained, or why it is missing.")

    def sentence(self) -> str:
        if self.value is None:
            return f"{self.name} not measured ({self.detail})"
        broken = "<" if self.op == ">=" else ">"
        return f"{self.name} {self.value:.4g} {broken} bound {self.bound:.4g}"


class Latency(_Report):
    """Per-sample latency of the model call (ms), over the timed runs."""

    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class Verdict(_Report):
    """The outcome of acceptance on one runtime/delegate: every number next to its bound."""

    passed: bool
    reason: str | None = Field(
        description="Why it failed (the missed bounds, in words); None when it passed."
    )
    runtime: str
    delegate: str
    precision: str
    profile: str | None = Field(description="Device profile whose latency budget applied.")
    samples: int = Field(description="Golden samples run (0: no golden set, latency from zero inputs).")
    checks: list[Check]
    latency: Latency
    predicted_classes: dict[str, int] | None = Field(
        default=None,
        description="Top-1 class -> count over the golden set when the output is class scores: "
        "the reference distribution that telemetry's drift figure compares live predictions with.",
    )


Stage = Literal["artifact", "runtime", "delegate", "load", "acceptance", "slower"]


class Rejection(_Report):
    """A candidate that was not chosen, the stage that ruled it out, and why."""

    candidate: str = Field(description="runtime/delegate/precision as the profile names it.")
    stage: Stage = Field(description="artifact, runtime, delegate, load, acceptance, or slower (autotune).")
    reason: str
    artifact: str | None = Field(
        default=None, description="Model path inside the bundle, once one was picked for the candidate."
    )


class Timing(_Report):
    """What a candidate that loaded measured (ms)."""

    candidate: str
    artifact: str = Field(description="Model path inside the bundle.")
    load_ms: float
    p50_ms: float | None = Field(default=None, description="Golden-set p50 of the acceptance run.")
    p95_ms: float | None = Field(default=None, description="Golden-set p95 of the acceptance run.")
    accepted: bool | None = Field(default=None, description="Whether it passed its own gate.")


class Chosen(_Report):
    candidate: str
    runtime: str
    delegate: str
    precision: str
    artifact: str = Field(description="Model path inside the bundle.")


class Decision(_Report):
    """The structured outcome of selection, as the agent reports it."""

    bundle: str
    version: str
    profile: str | None
    mode: Literal["first", "autotune"]
    chosen: Chosen | None
    rejected: list[Rejection]
    untried: list[str] = Field(description="Candidates after the chosen one that were not loaded.")
    timings: list[Timing]


class AcceptanceSummary(_Report):
    """The figures of an active bundle's verdict that telemetry carries every interval."""

    version: str | None = None
    runtime: str | None = None
    delegate: str | None = None
    passed: bool | None = None
    accuracy: float | None = Field(default=None, description="Golden-set accuracy (0-1).")
    top1_agreement: float | None = Field(
        default=None, description="Top-1 agreement with the reference (0-1)."
    )
    p95_ms: float | None = Field(default=None, description="Golden-set p95 latency on the device (ms).")
    samples: int | None = None

    @classmethod
    def of(cls, verdict: Verdict | None, *, version: str, runtime: str, delegate: str) -> AcceptanceSummary:
        checks = {c.name: c.value for c in verdict.checks} if verdict is not None else {}
        return cls(
            version=version,
            runtime=runtime,
            delegate=delegate,
            passed=verdict.passed if verdict is not None else None,
            accuracy=checks.get("accuracy"),
            top1_agreement=checks.get("top1_agreement"),
            p95_ms=verdict.latency.p95_ms if verdict is not None else None,
            samples=verdict.samples if verdict is not None else None,
        )


def verdict_in(detail: dict[str, Any], key: str = "acceptance") -> Verdict | None:
    """The verdict an event's or reply's ``detail[key]`` carries, typed; None when absent or unreadable."""
    body = detail.get(key)
    if body is None:
        return None
    try:
        return Verdict.model_validate(body)
    except ValidationError:
        return None


class ModelStatus(_Report):
    """One named model as the device runs it."""

    bundle: BundleRef | None = Field(default=None, description="The active bundle; None = nothing active.")
    previous: BundleRef | None = Field(default=None, description="What a rollback would return to.")
    runtime: str | None = None
    delegate: str | None = None
    state: str = Field(default="idle", description="Deployment state of this model name.")
    acceptance: Verdict | None = Field(default=None, description="The active bundle's acceptance verdict.")


class DeploymentOutcome(_Report):
    model: str
    bundle: BundleRef
    ok: bool
    code: str = Field(description="'committed' or the reason code of the failure.")
    reason: str = ""
    at: float = Field(default_factory=time.time)


class Reported(_Report):
    """Retained state of a device; the last will sets ``online`` false."""

    v: Literal[1] = PROTOCOL_VERSION
    device: DeviceId
    online: bool
    agent_version: str = ""
    groups: list[str] = Field(default_factory=list)
    profile: str | None = Field(default=None, description="Device profile in use (detected or configured).")
    hardware: dict[str, Any] = Field(default_factory=dict, description="What detection found.")
    models: dict[str, ModelStatus] = Field(default_factory=dict)
    last_deployment: DeploymentOutcome | None = None
    desired_seq: dict[str, int] = Field(default_factory=dict, description="Newest accepted seq per target.")
    keyset_version: int | None = Field(
        default=None, description="Version of the root-signed key set in use; None: no trust root."
    )
    at: float = Field(default_factory=time.time)


class Event(_Report):
    """Deployment progress and outcomes (QoS 1, not retained)."""

    v: Literal[1] = PROTOCOL_VERSION
    device: DeviceId
    kind: Literal["state", "progress", "outcome", "refused", "error"]
    model: str | None = None
    bundle: BundleRef | None = None
    state: str | None = None
    ok: bool | None = None
    code: str | None = Field(default=None, description="Reason code when something was refused or failed.")
    reason: str = ""
    received: int | None = Field(default=None, description="Bytes received so far (progress).")
    total: int | None = Field(default=None, description="Bytes in all (progress).")
    detail: dict[str, Any] = Field(default_factory=dict)
    at: float = Field(default_factory=time.time)


class ModelTelemetry(_Report):
    """One interval of one (model, bundle version, runtime, delegate) as the device served it."""

    model: str = Field(description="Model name (the served slot).")
    bundle: str | None = Field(default=None, description="Bundle name that answered (None: already retired).")
    version: str = Field(description="Bundle version that answered.")
    runtime: str
    delegate: str
    count: int = Field(ge=0, description="Requests answered in the interval.")
    client_errors: int = Field(default=0, ge=0, description="4xx: requests that did not fit the model.")
    server_errors: int = Field(default=0, ge=0, description="5xx: the runtime failed.")
    throughput_rps: float = Field(ge=0, description="count / interval_s.")
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    latency_hist: dict[str, Any] | None = Field(
        default=None,
        description="The interval's latency histogram (seconds) as Histogram.to_dict(): "
        "mergeable across devices and intervals (1% relative error).",
    )
    labelled: int = Field(default=0, ge=0, description="Predictions whose label arrived in the interval.")
    correct: int = Field(default=0, ge=0, description="Of those, how many were right (top-1).")
    online_accuracy: float | None = Field(
        default=None, description="correct / labelled since this version became active; None: no labels."
    )
    predicted: dict[str, int] = Field(
        default_factory=dict, description="Predicted class -> count in the interval (class-score outputs)."
    )
    drift: float | None = Field(
        default=None,
        description="Total variation distance (0..1) between the predicted-class distribution since "
        "activation and the acceptance set's; None until enough predictions.",
    )


class ProcessTelemetry(_Report):
    rss_mb: float
    peak_rss_mb: float
    cpu_percent: float = Field(description="Agent process CPU over the interval, % of one core.")
    threads: int


class Throttling(_Report):
    """What the board says about throttling (None fields: not exposed)."""

    source: str = Field(
        description="'raspberrypi' (firmware get_throttled flags) or 'cooling_device' "
        "(a CPU/GPU frequency cooling device above state 0, e.g. on Jetson)."
    )
    throttled_now: bool
    flags: int | None = Field(default=None, description="Raw firmware flags (Raspberry Pi get_throttled).")
    under_voltage: bool | None = None
    detail: str = ""


class PowerMode(_Report):
    """The board's configured power budget (Jetson ``nvpmodel``): a setting, not throttling."""

    source: str = Field(default="nvpmodel", description="Where it was read: 'nvpmodel' (Jetson).")
    id: int = Field(ge=0, description="The mode number (``nvpmodel -m ID``).")
    name: str | None = Field(default=None, description="Its name in nvpmodel.conf, e.g. 'MAXN' or '15W'.")


class SystemTelemetry(_Report):
    mem_total_mb: float
    mem_available_mb: float
    cpu_percent: float = Field(description="All cores, % of the whole machine over the interval.")
    cpu_count: int
    load1: float
    load5: float
    load15: float
    temperatures_c: dict[str, float] = Field(
        default_factory=dict, description="Thermal zone type -> degrees C (/sys/class/thermal)."
    )
    throttling: Throttling | None = None
    power_mode: PowerMode | None = None
    disk_free_mb: float = Field(description="Free space where the store lives.")
    disk_total_mb: float


class SpoolTelemetry(_Report):
    queued: int = Field(ge=0, description="Messages waiting on disk (this one not counted).")
    dropped: int = Field(ge=0, description="Messages dropped by the spool bound since the agent started.")
    dropped_total: int = Field(ge=0, description="Dropped since the spool was created (persisted).")


class Telemetry(_Report):
    """Periodic metrics of one device (QoS 1, not retained; spooled on disk while offline)."""

    v: Literal[1] = PROTOCOL_VERSION
    device: DeviceId
    seq: int = Field(
        ge=1, description="Per device, increasing across restarts (gaps possible); spooled ones keep theirs."
    )
    at: float = Field(description="Unix time at the end of the interval.")
    interval_s: float = Field(gt=0, description="Length of the interval the counters cover.")
    groups: list[str] = Field(default_factory=list)
    profile: str | None = None
    models: list[ModelTelemetry] = Field(default_factory=list)
    acceptance: dict[str, AcceptanceSummary] = Field(
        default_factory=dict,
        description="Model name -> the active bundle's acceptance: passed, accuracy, p95_ms, version.",
    )
    process: ProcessTelemetry
    system: SystemTelemetry
    spool: SpoolTelemetry
    mqtt: dict[str, int] = Field(default_factory=dict, description="Session counters (sent, dropped, ...).")


class BlockRequest(_Msg):
    """Ask the registry for ``count`` consecutive blocks starting at ``first``."""

    v: Literal[1] = PROTOCOL_VERSION
    device: DeviceId
    sha256: Sha256Hex
    first: int = Field(ge=0)
    count: int = Field(ge=1, le=1024)
    block_size: int = Field(ge=4096, le=262144, description="Bytes per block (4 KiB - 256 KiB).")


class BlockStatus(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2
    OUT_OF_RANGE = 3


# Block reply: magic, version, status, block index, block size, total file size, crc32 of the
# payload, sha256 of the bundle (raw 32 bytes), then the payload (data, or a UTF-8 reason).
_BLOCK_HEADER = struct.Struct("!4sBBIIQI32s")
BLOCK_MAGIC = b"EBLK"
BLOCK_HEADER_SIZE = _BLOCK_HEADER.size


@dataclass(frozen=True)
class BlockReply:
    status: BlockStatus
    sha256: str
    index: int
    block_size: int
    total_size: int
    payload: bytes
    crc_ok: bool = True

    def pack(self) -> bytes:
        header = _BLOCK_HEADER.pack(
            BLOCK_MAGIC,
            PROTOCOL_VERSION,
            int(self.status),
            self.index,
            self.block_size,
            self.total_size,
            zlib.crc32(self.payload),
            bytes.fromhex(self.sha256),
        )
        return header + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> BlockReply:
        if len(data) < BLOCK_HEADER_SIZE:
            raise MalformedMessage(f"block reply of {len(data)} bytes is shorter than its header")
        magic, version, status, index, block_size, total, crc, sha = _BLOCK_HEADER.unpack_from(data)
        if magic != BLOCK_MAGIC or version != PROTOCOL_VERSION:
            raise MalformedMessage("block reply has the wrong magic or version")
        try:
            block_status = BlockStatus(status)
        except ValueError as exc:
            raise MalformedMessage(f"block reply has unknown status {status}") from exc
        payload = data[BLOCK_HEADER_SIZE:]
        return cls(block_status, sha.hex(), index, block_size, total, payload, zlib.crc32(payload) == crc)


# --- signed envelopes --------------------------------------------------------------------


def sign_document(doc: BaseModel, key: SigningKey) -> bytes:
    """The signed envelope of a desired doc or command, ready to publish."""
    payload = doc.model_dump_json()
    sig = key.sign(payload.encode("utf-8"))
    envelope = {
        "v": PROTOCOL_VERSION,
        "payload": payload,
        "key_id": sig.key_id,
        "sig": base64.b64encode(sig.signature).decode("ascii"),
    }
    return json.dumps(envelope).encode("utf-8")


def unsigned_document(doc: BaseModel) -> bytes:
    """An envelope without a signature: accepted only by an agent in insecure (demo) mode."""
    return json.dumps({"v": PROTOCOL_VERSION, "payload": doc.model_dump_json()}).encode("utf-8")


@dataclass(frozen=True)
class Opened:
    payload: dict[str, Any]
    key_id: str | None


def open_envelope(data: bytes, trusted: KeyRing, *, insecure: bool = False) -> Opened:
    """Check an envelope's signature and return its payload.

    Raises MissingSignature, UnknownKey, BadSignature or MalformedMessage. ``insecure``
    accepts unsigned envelopes (the demo); a present signature is always checked.
    """
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not JSON ({exc})") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), str):
        raise MalformedMessage("an envelope is a JSON object with a 'payload' string")
    if envelope.get("v") != PROTOCOL_VERSION:
        raise MalformedMessage(f"envelope version {envelope.get('v')!r} is not {PROTOCOL_VERSION}")
    payload_text: str = envelope["payload"]
    key_id = envelope.get("key_id")
    if key_id is None or envelope.get("sig") is None:
        if not insecure:
            raise MissingSignature("document is not signed")
    else:
        try:
            raw_sig = base64.b64decode(str(envelope["sig"]), validate=True)
        except ValueError as exc:
            raise BadSignature("signature is not base64") from exc
        trusted.verify(payload_text.encode("utf-8"), Signature(key_id=str(key_id), signature=raw_sig))
    try:
        payload = json.loads(payload_text)
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"payload is not JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise MalformedMessage("payload must be a JSON object")
    return Opened(payload, str(key_id) if key_id is not None else None)


def parse(model: type[_M], data: bytes | dict[str, Any], what: str) -> _M:
    """Validate a JSON message, turning any failure into one-line MalformedMessage."""
    try:
        if isinstance(data, dict):
            return model.model_validate(data)
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise MalformedMessage(f"{what}: {where}: {first['msg']}") from exc
