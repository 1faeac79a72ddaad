"""Detect which device profile fits the hardware a root filesystem shows.

Detection only reads files under ``root`` (``/`` on a device; a folder in tests or when
inspecting a mounted SD-card image), so it runs unprivileged and inside the systemd
sandbox. It gathers :class:`Evidence`, matches it against a table of board rules, and
returns a :class:`Detection`: the profile name, why it was chosen, and what was found.

Precedence, most reliable first:

1. device-tree ``compatible`` strings (machine-readable, set by the board's device tree);
2. device-tree ``model`` and the ``Model`` line Raspberry Pi kernels add to /proc/cpuinfo;
3. ``/etc/nv_tegra_release`` (Jetson Linux) when there is no device tree (some containers);
4. otherwise the generic profile of the CPU architecture.

An Edge TPU that is not the Coral Dev Board's own (a USB accelerator, or an M.2/PCIe module
in another host) turns the result into the ``coral-usb`` accessory profile with the board
found above as ``host_profile``: the Edge TPU candidate first, then the board's own.
An operator override (``profile`` in agent.toml) replaces steps 1-4 but keeps the evidence.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from devices.errors import DetectionError
from devices.profile import (
    Candidate,
    MemoryClass,
    Profile,
    load_profile,
    memory_class_for,
    resolve_candidates,
)

# USB ids of the Coral USB Accelerator: Global Unichip before libedgetpu loads the firmware,
# Google after (as listed in libedgetpu's udev rules and Coral's documentation).
CORAL_USB_IDS = frozenset({"1a6e:089a", "18d1:9302"})

# Library folders searched under root, besides those listed in /etc/ld.so.conf.d/*.conf.
LIB_DIRS = (
    "lib",
    "lib64",
    "usr/lib",
    "usr/lib64",
    "usr/local/lib",
    "lib/aarch64-linux-gnu",
    "lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/aarch64-linux-gnu/nvidia",
    "usr/local/cuda/lib64",
)
# Shared libraries that decide whether a delegate/provider can load: name -> glob patterns.
LIBRARIES = {
    "libedgetpu.so.1": ("libedgetpu.so.1*",),
    "libnvinfer.so": ("libnvinfer.so*",),
    "libcudart.so": ("libcudart.so*",),
    "libtensorflowlite_gpu_delegate.so": ("libtensorflowlite_gpu_delegate.so*",),
    "libOpenCL.so": ("libOpenCL.so*",),
}
_MAX_READ = 1 << 20  # bytes; /proc/cpuinfo of a 256-core server is ~300 KiB


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Evidence(_Frozen):
    """What was found under the root, whether or not it decided the profile."""

    model: str | None = Field(default=None, description="Device-tree model, without the trailing NUL.")
    compatible: list[str] = Field(default_factory=list, description="Device-tree compatible strings.")
    cpuinfo_model: str | None = Field(default=None, description="'Model' line of /proc/cpuinfo (Pi kernels).")
    cpu_name: str | None = Field(default=None, description="First 'model name' line of /proc/cpuinfo.")
    cpu_count: int | None = Field(default=None, description="Logical CPUs ('processor' entries of cpuinfo).")
    mem_total_mib: int | None = Field(default=None, description="MemTotal from /proc/meminfo, MiB.")
    l4t_release: str | None = Field(default=None, description="Jetson Linux release, e.g. 'R35.4.1'.")
    l4t_board: str | None = Field(default=None, description="BOARD of /etc/nv_tegra_release, e.g. 't210ref'.")
    apex_devices: list[str] = Field(default_factory=list, description="Edge TPU PCIe nodes (/dev/apex_*).")
    usb_ids: list[str] = Field(default_factory=list, description="vendor:product of each USB device.")
    libraries: dict[str, list[str]] = Field(
        default_factory=dict, description="Accelerator libraries found: name -> paths as seen from root."
    )


class Detection(_Frozen):
    """The profile chosen for this hardware, the reason, and the evidence."""

    profile: str = Field(description="Name of the profile the agent uses.")
    host_profile: str | None = Field(
        default=None,
        description="For an accessory profile (coral-usb): the board profile whose candidates follow.",
    )
    source: Literal["detected", "fallback", "override"] = Field(
        description=(
            "detected: a board rule matched; fallback: the generic profile of the architecture; "
            "override: set by the operator."
        )
    )
    reason: str = Field(description="One line saying which evidence decided the profile.")
    architecture: str | None = Field(description="CPU architecture as `uname -m` names it, if known.")
    memory_class: MemoryClass | None = Field(description="Class of the measured MemTotal.")
    accelerators: list[str] = Field(
        description="Accelerators found: edgetpu-usb, edgetpu-pcie, nvidia-gpu (Tegra's integrated GPU)."
    )
    candidates: list[Candidate] = Field(
        description="What the agent will try, in order (an accessory's host candidates appended)."
    )
    notes: list[str] = Field(description="What an operator should know: missing libraries, mismatches.")
    evidence: Evidence = Field(description="Everything found under the root, deciding or not.")


@dataclass(frozen=True)
class _BoardRule:
    """A board profile and the device-tree values that identify it."""

    profile: str
    compatible: tuple[str, ...]  # fnmatch patterns against each compatible string
    model: str  # regular expression searched in the model string


# Most specific first: "Jetson Orin Nano" must not be read as "Jetson Nano".
_BOARD_RULES = (
    _BoardRule("jetson-orin", ("nvidia,tegra234",), r"\bOrin\b"),
    _BoardRule("jetson-xavier-nx", ("nvidia,tegra194",), r"\bXavier\b|^Jetson-AGX$"),
    _BoardRule("jetson-nano", ("nvidia,tegra210", "nvidia,p3450-*", "nvidia,p3541-*"), r"\bJetson Nano\b"),
    _BoardRule("rpi5", ("raspberrypi,5*", "brcm,bcm2712"), r"^Raspberry Pi (5|Compute Module 5)\b"),
    _BoardRule(
        "rpi4",
        ("raspberrypi,4*", "raspberrypi,400", "brcm,bcm2711"),
        r"^Raspberry Pi (4|400|Compute Module 4)",
    ),
    _BoardRule(
        "rpi3",
        ("raspberrypi,3*", "raspberrypi,model-zero-2*", "brcm,bcm2837", "brcm,bcm2710"),
        r"^Raspberry Pi (3|Compute Module 3|Zero 2)\b",
    ),
    _BoardRule("coral-devboard", ("*,imx8mq-phanbell",), r"\bPhanbell\b"),
)
_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)(?:.*?BOARD:\s*([\w-]+))?")


def detect(
    root: Path = Path("/"), override: str | Profile | None = None, *, profiles_dir: Path | None = None
) -> Detection:
    """Detect the device profile from the files under ``root``.

    ``override`` names a profile (or is one, loaded from ``--profile-file``) to use whatever
    the hardware says (the operator's ``profile`` setting); detection still runs so the
    evidence and notes are reported. Profiles are looked up in ``profiles_dir`` first, then
    among the shipped ones (:func:`~devices.profile.load_profile`).
    Raises :class:`~devices.errors.DetectionError` when ``root`` is not a readable folder
    or no profile fits, :class:`~devices.errors.UnknownProfile` for a bad override name and
    :class:`~devices.errors.ProfileInvalid` for a bad profile file.
    """
    if not root.is_dir():
        raise DetectionError(f"detection root {root} is not a directory", root=str(root))
    live = root.resolve() == Path("/")
    cpuinfo = _parse_cpuinfo(_read_text(root, "proc/cpuinfo") or "")
    evidence = _gather_evidence(root, cpuinfo, live=live)
    architecture, arch_note = _architecture(cpuinfo, live=live)
    notes = [arch_note] if arch_note else []

    edgetpu = _edgetpu_kind(evidence)
    chosen: Profile | None = None
    if override is not None:
        # An unknown name or a bad file fails before anything else.
        chosen = override if isinstance(override, Profile) else load_profile(override, profiles_dir)
        try:
            board, _, _ = _match_board(evidence, architecture, root)
            alone = _describe(board, edgetpu)
        except DetectionError as exc:  # the override is how an operator gets past this
            board, alone = None, f"no profile ({exc})"
        profile_name, host_name = chosen.name, board if chosen.accessory else None
        source: Literal["detected", "fallback", "override"] = "override"
        reason = f"set by the operator; detection alone gives {alone}"
    else:
        board, source, reason = _match_board(evidence, architecture, root)
        profile_name, host_name = board, None
        if edgetpu and board != "coral-devboard":
            profile_name, host_name = "coral-usb", board
            reason = f"{_edgetpu_reason(evidence)} on a {board} host ({reason})"
        elif set(evidence.usb_ids) & CORAL_USB_IDS:
            notes.append("a Coral USB accelerator is attached too; the Dev Board's own Edge TPU is used")

    profile = chosen or load_profile(profile_name, profiles_dir)
    host = load_profile(host_name, profiles_dir) if host_name else None
    notes.extend(_notes(profile, host, evidence, architecture))
    return Detection(
        profile=profile_name,
        host_profile=host_name,
        source=source,
        reason=reason,
        architecture=architecture,
        memory_class=memory_class_for(evidence.mem_total_mib) if evidence.mem_total_mib else None,
        accelerators=_accelerators(evidence, board or profile_name),
        candidates=resolve_candidates(profile, host),
        notes=notes,
        evidence=evidence,
    )


def _gather_evidence(root: Path, cpuinfo: _CpuInfo, *, live: bool) -> Evidence:
    """Read every hardware hint under ``root``; missing files are simply absent evidence."""
    dt_model = _read_dt(root, "model")
    compatible_raw = _read_dt(root, "compatible", keep_nuls=True)
    cpu_count = cpuinfo.processors or (os.cpu_count() if live else None)
    l4t_release, l4t_board = _parse_l4t(_read_text(root, "etc/nv_tegra_release"))
    return Evidence(
        model=dt_model,
        compatible=[c for c in (compatible_raw or "").split("\0") if c],
        cpuinfo_model=cpuinfo.fields.get("Model"),
        cpu_name=cpuinfo.fields.get("model name"),
        cpu_count=cpu_count,
        mem_total_mib=_mem_total_mib(_read_text(root, "proc/meminfo")),
        l4t_release=l4t_release,
        l4t_board=l4t_board,
        apex_devices=sorted(f"/dev/{p.name}" for p in (root / "dev").glob("apex_*")),
        usb_ids=_usb_ids(root),
        libraries=_find_libraries(root),
    )


# --- evidence readers -------------------------------------------------------------------


def _inside(root: Path, path: Path) -> bool:
    """True if ``path`` resolves inside ``root`` (an image's absolute symlinks must not
    make detection read the host's files)."""
    try:
        path.resolve().relative_to(root.resolve())
    except (OSError, ValueError):
        return False
    return True


def _read_text(root: Path, relative: str | Path) -> str | None:
    """The text of ``root/relative`` (at most 1 MiB), or None if absent or unreadable."""
    path = root / relative
    if not _inside(root, path):
        return None
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_READ)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")


def _read_dt(root: Path, name: str, *, keep_nuls: bool = False) -> str | None:
    """A device-tree property from /proc/device-tree or /sys/firmware/devicetree/base."""
    for folder in ("proc/device-tree", "sys/firmware/devicetree/base"):
        text = _read_text(root, f"{folder}/{name}")
        if text is not None:
            return text if keep_nuls else text.rstrip("\0").strip() or None
    return None


@dataclass(frozen=True)
class _CpuInfo:
    processors: int
    fields: dict[str, str]  # first value of each key


def _parse_cpuinfo(text: str) -> _CpuInfo:
    processors = 0
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value)
    return _CpuInfo(processors, fields)


def _parse_l4t(text: str | None) -> tuple[str | None, str | None]:
    match = _L4T_LINE.search(text or "")
    if not match:
        return None, None
    major, revision, board = match.groups()
    return f"R{major}.{revision}", board


def _mem_total_mib(text: str | None) -> int | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text or "", re.MULTILINE)
    return int(match.group(1)) // 1024 if match else None


def _usb_ids(root: Path) -> list[str]:
    ids = set()
    for device in (root / "sys/bus/usb/devices").glob("*"):
        vendor = _read_text(root, device.relative_to(root) / "idVendor")
        product = _read_text(root, device.relative_to(root) / "idProduct")
        if vendor and product:
            ids.add(f"{vendor.strip().lower()}:{product.strip().lower()}")
    return sorted(ids)


def _library_dirs(root: Path) -> list[Path]:
    """Default library folders plus those named in /etc/ld.so.conf.d/*.conf under root."""
    names = list(LIB_DIRS)
    for conf in sorted((root / "etc/ld.so.conf.d").glob("*.conf")):
        for line in (_read_text(root, conf.relative_to(root)) or "").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("/"):
                names.append(line.lstrip("/"))
    folders: dict[Path, Path] = {}  # resolved -> as named; /lib is often a link to usr/lib
    for name in names:
        folder = root / name
        if _inside(root, folder) and folder.is_dir():
            folders.setdefault(folder.resolve(), folder)
    return list(folders.values())


def _find_libraries(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    folders = _library_dirs(root)
    for name, patterns in LIBRARIES.items():
        paths = {
            "/" + str(path.relative_to(root))
            for folder in folders
            for pattern in patterns
            for path in folder.glob(pattern)
        }
        if paths:
            found[name] = sorted(paths)
    return found


# --- decisions -----------------------------------------------------------------------------


def _architecture(info: _CpuInfo, *, live: bool) -> tuple[str | None, str | None]:
    """(architecture, note). On the live system ``platform.machine()`` is the kernel's word;
    a 32-bit Python on a 64-bit kernel (Raspberry Pi OS 32-bit) is reported as armv7l."""
    if live:
        machine = platform.machine() or None
        if machine in ("aarch64", "arm64", "x86_64", "amd64") and sys.maxsize <= 2**32:
            return "armv7l" if machine.startswith("a") else "i686", (
                f"32-bit userland on a 64-bit {machine} kernel: no runtime wheels exist for it; "
                "install the 64-bit OS"
            )
        return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine or "", machine), None
    flags = info.fields.get("flags", "").split()
    if "lm" in flags:
        return "x86_64", None
    if flags:
        return "i686", None
    arm = info.fields.get("CPU architecture")
    if arm == "8" or arm == "AArch64":
        return "aarch64", None
    if arm == "7":
        return "armv7l", None
    return None, None


_Match = tuple[str, Literal["detected", "fallback"], str]  # (profile, source, reason)


def _match_board(evidence: Evidence, architecture: str | None, root: Path) -> _Match:
    for rule in _BOARD_RULES:
        for compat in evidence.compatible:
            if any(fnmatch.fnmatchcase(compat, pattern) for pattern in rule.compatible):
                return rule.profile, "detected", f"device-tree compatible {compat!r}"
    models = (("device-tree model", evidence.model), ("/proc/cpuinfo Model", evidence.cpuinfo_model))
    for label, model in models:
        for rule in _BOARD_RULES:
            if model and re.search(rule.model, model):
                return rule.profile, "detected", f"{label} {model!r}"
    if evidence.l4t_release:
        release = f"/etc/nv_tegra_release {evidence.l4t_release}"
        major = int(evidence.l4t_release[1:].split(".")[0])
        if major >= 36:  # Jetson Linux 36 (JetPack 6) supports only Orin
            return "jetson-orin", "detected", f"{release} (JetPack 6 runs only on Orin)"
        if evidence.l4t_board == "t210ref":
            return "jetson-nano", "detected", f"{release} BOARD t210ref (Tegra X1)"
        if major >= 34:
            # R34/R35 run on both Xavier and Orin; the two profiles try the same candidates.
            return "jetson-orin", "detected", f"{release} (Xavier or Orin; their candidates are the same)"
    generic = {"aarch64": "generic-arm64", "x86_64": "generic-x86_64"}.get(architecture or "")
    if generic is None:
        raise DetectionError(
            f"no device profile fits architecture {architecture or 'unknown'} under {root} "
            "(profiles cover aarch64 and x86_64); set profile in agent.toml to force one",
            root=str(root),
        )
    return generic, "fallback", f"no known board; generic profile for {architecture}"


def _edgetpu_kind(evidence: Evidence) -> str | None:
    if set(evidence.usb_ids) & CORAL_USB_IDS:
        return "usb"
    if evidence.apex_devices:
        return "pcie"
    return None


def _edgetpu_reason(evidence: Evidence) -> str:
    usb = sorted(set(evidence.usb_ids) & CORAL_USB_IDS)
    if usb:
        return f"Coral USB accelerator (USB id {usb[0]})"
    return f"Edge TPU {evidence.apex_devices[0]}"


def _describe(board: str, edgetpu: str | None) -> str:
    return f"coral-usb on {board}" if edgetpu and board != "coral-devboard" else board


def _accelerators(evidence: Evidence, board: str) -> list[str]:
    found = []
    if set(evidence.usb_ids) & CORAL_USB_IDS:
        found.append("edgetpu-usb")
    if evidence.apex_devices:
        found.append("edgetpu-pcie")
    if board.startswith("jetson-"):
        found.append("nvidia-gpu")
    return found


def _notes(profile: Profile, host: Profile | None, evidence: Evidence, architecture: str | None) -> list[str]:
    """What an operator should fix for the profile's candidates to load."""
    notes = []
    board = host or profile
    if architecture and architecture not in board.architectures:
        notes.append(
            f"profile {board.name} is for {', '.join(board.architectures)} but this system is {architecture}"
        )
    delegates = {c.delegate for c in resolve_candidates(profile, host)}
    if "edgetpu" in delegates and "libedgetpu.so.1" not in evidence.libraries:
        notes.append("libedgetpu.so.1 not found: install libedgetpu1-std from Coral's apt repository")
    if "TensorrtExecutionProvider" in delegates and "libnvinfer.so" not in evidence.libraries:
        notes.append("TensorRT (libnvinfer.so) not found: the TensorRT candidates will not load")
    if "CUDAExecutionProvider" in delegates and "libcudart.so" not in evidence.libraries:
        notes.append("CUDA runtime (libcudart.so) not found: the CUDA candidates will not load")
    return notes
