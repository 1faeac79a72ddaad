"""Hardware profiles: what a kind of board is, and in which order to try runtimes on it.

A profile is a TOML data file in ``devices/profiles/`` (shipped as package data) or in an
operator's folder (``/etc/edgeagent/profiles/`` by default, where a file replaces the shipped
profile of the same name), validated by :class:`Profile`. Its ordered :class:`Candidate`
list is hardware policy expressed as plain data: the runtime adapters read (runtime,
delegate, precision, artifact, threads) and never ask which board they are on.

An *accessory* profile (the Coral USB accelerator) describes hardware that sits on some
host board. Its candidates go first and the host board's candidates follow
(:func:`resolve_candidates`), so a Pi with a Coral falls back to the Pi's own CPU path
when a bundle has no Edge TPU artifact.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from devices.errors import ProfileInvalid, UnknownProfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 devices only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:
    from importlib.abc import Traversable

log = logging.getLogger(__name__)

# Where an operator adds or replaces profiles without editing the package (agent.toml
# `profiles_dir`, `--profiles-dir`). A file there named like a shipped profile replaces it.
DEFAULT_PROFILES_DIR = Path("/etc/edgeagent/profiles")  # also in edgeagent/defaults.py (for --help)

Runtime = Literal["litert", "onnxruntime"]
Precision = Literal["fp32", "fp16", "int8"]
Architecture = Literal["aarch64", "x86_64"]
MemoryClass = Literal["small", "medium", "large"]
Accelerator = Literal["edgetpu", "nvidia-gpu", "nvidia-dla"]

_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(_NAME_PATTERN)
ProfileName = Annotated[
    str,
    Field(
        pattern=_NAME_PATTERN,
        description="Profile name: lowercase letters, digits, '-' or '_'; the file is <name>.toml.",
    ),
]

# Delegates LiteRT can load, and the ONNX Runtime execution providers a profile may name.
# A closed list catches a typo in a profile at test time instead of on a device.
LITERT_DELEGATES = frozenset({"xnnpack", "gpu", "edgetpu"})
ORT_PROVIDERS = frozenset(
    {
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
        "XnnpackExecutionProvider",
        "ACLExecutionProvider",
        "ArmNNExecutionProvider",
        "OpenVINOExecutionProvider",
    }
)
EDGETPU_SUFFIX = "_edgetpu.tflite"
_FORMAT_SUFFIX = {"litert": ".tflite", "onnxruntime": ".onnx"}

# MemTotal boundaries of the memory classes, in MiB. A "1 GB" board reports ~900 MiB and a
# "4 GB" board ~3800 MiB, so the cuts sit between the sizes boards are sold in.
_SMALL_BELOW_MIB = 1536
_MEDIUM_BELOW_MIB = 6144


def memory_class_for(mem_total_mib: int) -> MemoryClass:
    """The memory class of a system with ``mem_total_mib`` MiB of RAM (MemTotal)."""
    if mem_total_mib < _SMALL_BELOW_MIB:
        return "small"
    if mem_total_mib < _MEDIUM_BELOW_MIB:
        return "medium"
    return "large"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Candidate(_Strict):
    """One (runtime, delegate/provider, precision) the agent may try, in profile order."""

    runtime: Runtime = Field(description="Runtime adapter: 'litert' (LiteRT/TFLite) or 'onnxruntime'.")
    delegate: str = Field(
        description=(
            "LiteRT delegate ('xnnpack', 'gpu', 'edgetpu') or ONNX Runtime execution provider "
            "(e.g. 'TensorrtExecutionProvider', 'CPUExecutionProvider')."
        )
    )
    precision: Precision = Field(description="Precision the runtime computes in.")
    artifact_precision: Precision | None = Field(
        default=None,
        description=(
            "Precision of the bundle artifact this candidate loads; unset means the same as "
            "`precision`. Differs where the runtime converts at load time (TensorRT builds an "
            "fp16 engine from an fp32 ONNX model)."
        ),
    )
    artifact_suffix: str | None = Field(
        default=None,
        description=(
            "File-name ending the artifact must have, e.g. '_edgetpu.tflite' for a model compiled "
            "by the Edge TPU compiler; unset means any '.tflite' (litert) or '.onnx' (onnxruntime)."
        ),
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="CPU threads for the runtime's CPU kernels; unset lets the runtime choose.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Candidate:
        if self.runtime == "litert" and self.delegate not in LITERT_DELEGATES:
            raise ValueError(
                f"litert delegate {self.delegate!r} is not one of {', '.join(sorted(LITERT_DELEGATES))}"
            )
        if self.runtime == "onnxruntime" and self.delegate not in ORT_PROVIDERS:
            raise ValueError(
                f"onnxruntime provider {self.delegate!r} is not one of {', '.join(sorted(ORT_PROVIDERS))}"
            )
        wanted = _FORMAT_SUFFIX[self.runtime]
        if self.artifact_suffix is not None and not self.artifact_suffix.endswith(wanted):
            raise ValueError(
                f"artifact_suffix {self.artifact_suffix!r} must end with {wanted!r} for {self.runtime}"
            )
        edgetpu_ok = self.artifact_suffix == EDGETPU_SUFFIX and self.precision == "int8"
        if self.delegate == "edgetpu" and not edgetpu_ok:
            raise ValueError(
                f"the edgetpu delegate runs only int8 models compiled for it: "
                f"set precision = 'int8' and artifact_suffix = {EDGETPU_SUFFIX!r}"
            )
        return self

    @property
    def artifact_format(self) -> Literal["tflite", "onnx"]:
        """Model file format this candidate loads."""
        return "tflite" if self.runtime == "litert" else "onnx"

    @property
    def loads_precision(self) -> Precision:
        """Precision of the artifact this candidate loads (``artifact_precision`` or ``precision``)."""
        return self.artifact_precision or self.precision

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(runtime, delegate, precision, artifact precision): what makes two candidates the same."""
        return (self.runtime, self.delegate, self.precision, self.loads_precision)

    def __str__(self) -> str:
        text = f"{self.runtime}/{self.delegate}/{self.precision}"
        return text if self.loads_precision == self.precision else f"{text} (from {self.loads_precision})"


class Profile(_Strict):
    """A kind of device, and the runtimes to try on it in order of preference."""

    name: ProfileName
    description: str = Field(min_length=1, description="The boards this profile covers, for people.")
    architectures: list[Architecture] = Field(
        min_length=1, description="CPU architectures (as `uname -m` prints them) the profile runs on."
    )
    memory_class: MemoryClass | None = Field(
        default=None,
        description=(
            "Memory of the smallest common variant, which defaults must fit: small (< 1.5 GiB), "
            "medium (< 6 GiB), large. Unset for an accessory, which takes its host's."
        ),
    )
    accessory: bool = Field(
        default=False,
        description=(
            "True for hardware that plugs into a host board (a USB accelerator): its candidates "
            "come first and the host board profile's candidates follow."
        ),
    )
    accelerators: list[Accelerator] = Field(
        default_factory=list, description="Accelerators beyond the CPU that the candidates use."
    )
    candidates: list[Candidate] = Field(
        min_length=1, description="What to try, best first; the first that loads and passes acceptance wins."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.accessory and self.memory_class is not None:
            raise ValueError("an accessory profile takes its host's memory class: remove memory_class")
        if not self.accessory and self.memory_class is None:
            raise ValueError("a board profile needs memory_class")
        seen: set[tuple[str, str, str, str]] = set()
        for candidate in self.candidates:
            if candidate.key in seen:
                raise ValueError(f"candidate {candidate} is listed twice")
            seen.add(candidate.key)
        if len(set(self.accelerators)) != len(self.accelerators):
            raise ValueError("accelerators lists an accelerator twice")
        return self


def _shipped_dir() -> Traversable:
    return resources.files("devices").joinpath("profiles")


def _toml_names(entries: Iterable[str]) -> set[str]:
    return {name.removesuffix(".toml") for name in entries if name.endswith(".toml")}


@functools.cache
def _shipped_names() -> frozenset[str]:
    return frozenset(_toml_names(entry.name for entry in _shipped_dir().iterdir()))


def _local_names(profiles_dir: Path | None) -> set[str]:
    """Profile names defined by ``<name>.toml`` files in ``profiles_dir`` (none if it is absent)."""
    if profiles_dir is None or not profiles_dir.is_dir():
        return set()
    try:
        names = _toml_names(entry.name for entry in profiles_dir.iterdir())
    except OSError as exc:
        raise ProfileInvalid(f"cannot list the folder ({exc.strerror})", path=str(profiles_dir)) from exc
    valid = {n for n in names if _NAME_RE.fullmatch(n)}
    for bad in sorted(names - valid):
        log.warning("ignoring %s: not a profile name (lowercase letters, digits, '-', '_')", f"{bad}.toml")
    return valid


def list_profiles(profiles_dir: Path | None = None) -> list[str]:
    """Names of every shipped profile and of every ``*.toml`` in ``profiles_dir``, sorted."""
    return sorted(_shipped_names() | _local_names(profiles_dir))


def load_profile(name: str, profiles_dir: Path | None = None) -> Profile:
    """Load and validate the profile ``name``: ``profiles_dir/<name>.toml`` if that file
    exists (a local profile replaces a shipped one of the same name), else the shipped one.

    Raises :class:`UnknownProfile` for a name no file defines and :class:`ProfileInvalid`
    for a file that is not TOML or fails the schema (naming the file and the field).
    """
    if profiles_dir is not None and name in _local_names(profiles_dir):
        return _load_local(profiles_dir / f"{name}.toml", name)
    if name not in _shipped_names():
        raise UnknownProfile(name, list_profiles(profiles_dir))
    return _load_shipped(name)


def load_profile_file(path: Path) -> Profile:
    """Load and validate the profile in the file ``path`` (any file name; ``--profile-file``)."""
    return _load_local(path, None)


@functools.cache
def _load_shipped(name: str) -> Profile:
    text = _shipped_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    profile = _parse(text, name=name, path=None)
    if profile.name != name:
        raise ProfileInvalid(f"file {name}.toml says name = {profile.name!r}", profile=name)
    return profile


def _load_local(path: Path, name: str | None) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileInvalid("no such file", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ProfileInvalid(f"cannot read it ({reason})", path=str(path)) from exc
    profile = _parse(text, name=name or path.stem, path=path)
    if name is not None and profile.name != name:
        raise ProfileInvalid(f"name: {profile.name!r} differs from the file name {name}.toml", path=str(path))
    return profile


def _parse(text: str, *, name: str, path: Path | None) -> Profile:
    where_file = {"profile": name} if path is None else {"path": str(path)}
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileInvalid(f"not valid TOML ({exc})", **where_file) from exc
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        # Every problem, not the first and a count: the one the operator typed may be the second.
        problems = "; ".join(
            f"{_field(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise ProfileInvalid(problems, **where_file) from exc


def _field(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a TOML reader counts it: ``[[candidates]] #2 delegate``."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) and parts:
            parts[-1] = f"[[{parts[-1]}]] #{part + 1}"
        else:
            parts.append(str(part))
    return " ".join(parts) or "(top level)"


def resolve_candidates(profile: Profile, host: Profile | None = None) -> list[Candidate]:
    """The ordered candidates for ``profile``, with an accessory's host appended.

    For a board profile this is its own list. For an accessory it is the accessory's
    candidates followed by those of ``host`` (if any) that are not already listed.
    """
    candidates = list(profile.candidates)
    if profile.accessory and host is not None:
        seen = {c.key for c in candidates}
        candidates.extend(c for c in host.candidates if c.key not in seen)
    return candidates
