"""What the device and the agent process cost: memory, CPU, load, temperatures, throttling, disk.

Process and system counters come from this machine (psutil, ``os``); temperatures and
throttling come from ``/sys`` under a *root* path, so tests point it at a fake tree (the
same idea as hardware detection's ``detect_root``). Every reader tolerates a board that does
not expose a file: the figure is left out, never invented.

Sources (all plain sysfs, no vendor tool):

- ``sys/class/thermal/thermal_zone*/{type,temp}``: millidegrees C, on every Linux board
  (Raspberry Pi ``cpu-thermal``; Jetson ``CPU-therm``, ``GPU-therm``, ...).
- Raspberry Pi: ``sys/devices/platform/soc/soc:firmware/get_throttled``, the firmware's
  flags (what ``vcgencmd get_throttled`` prints): bit 0 under-voltage now, bit 1 ARM
  frequency capped now, bit 2 throttled now, bit 3 soft temperature limit now; bits 16-19
  the same "has occurred since boot".
- Elsewhere (Jetson, x86): ``sys/class/thermal/cooling_device*/{type,cur_state}``: a CPU/GPU
  frequency cooling device (type containing ``cpufreq``, ``devfreq`` or ``gpufreq``) in a
  state above 0 is thermal throttling in progress.
- Jetson power mode: ``var/lib/nvpmodel/status`` (``pmode:0002 fmode:quiet``, written by the
  nvpmodel service) names the mode number; its name comes from the first of
  ``odm/etc``, ``vendor/etc``, ``etc/nvpmodel.conf`` that exists (``< POWER_MODEL ID=2
  NAME=15W >``), the order NVIDIA's own tools search. Not throttling: a configured budget, but
  the same model runs at very different speeds in MAXN and in 7W, so latency needs it beside.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgeagent.protocol import PowerMode, ProcessTelemetry, SystemTelemetry, Throttling

RPI_THROTTLED = Path("sys/devices/platform/soc/soc:firmware/get_throttled")
THERMAL = Path("sys/class/thermal")
_RPI_UNDER_VOLTAGE = 1 << 0
_RPI_THROTTLING_NOW = (1 << 1) | (1 << 2) | (1 << 3)
_RPI_NAMES = {0: "under-voltage", 1: "arm frequency capped", 2: "throttled", 3: "soft temperature limit"}
_FREQ_COOLING = ("cpufreq", "devfreq", "gpufreq")
NVPMODEL_STATUS = Path("var/lib/nvpmodel/status")
NVPMODEL_CONFS = (Path("odm/etc/nvpmodel.conf"), Path("vendor/etc/nvpmodel.conf"), Path("etc/nvpmodel.conf"))
_PMODE = re.compile(r"pmode:(\d+)")
_POWER_MODEL = re.compile(r"^<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)", re.MULTILINE)
_MB = 1024 * 1024


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def read_temperatures(root: Path) -> dict[str, float]:
    """Thermal zone type -> degrees C; a zone that cannot be read (some error when off) is left out."""
    temps: dict[str, float] = {}
    zones = sorted((root / THERMAL).glob("thermal_zone*"), key=lambda p: _zone_number(p.name))
    for zone in zones:
        raw = _read(zone / "temp")
        if raw is None:
            continue
        try:
            value = int(raw) / 1000.0
        except ValueError:
            continue
        name = _read(zone / "type") or zone.name
        if name in temps:  # two zones of one type (e.g. per-cluster sensors): keep both
            name = f"{name}.{_zone_number(zone.name)}"
        temps[name] = round(value, 1)
    return temps


def _zone_number(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else -1


def read_throttling(root: Path) -> Throttling | None:
    """The board's throttling state, or None when it exposes none."""
    raw = _read(root / RPI_THROTTLED)
    if raw is not None:
        try:
            flags = int(raw, 16)
        except ValueError:
            flags = None
        if flags is not None:
            now = [text for bit, text in _RPI_NAMES.items() if flags & (1 << bit)]
            past = [text for bit, text in _RPI_NAMES.items() if flags & (1 << (bit + 16))]
            detail = "; ".join(
                part
                for part in (
                    f"now: {', '.join(now)}" if now else "",
                    f"since boot: {', '.join(past)}" if past else "",
                )
                if part
            )
            return Throttling(
                source="raspberrypi",
                throttled_now=bool(flags & _RPI_THROTTLING_NOW),
                flags=flags,
                under_voltage=bool(flags & _RPI_UNDER_VOLTAGE),
                detail=detail,
            )
    active: list[str] = []
    seen = False
    for device in sorted((root / THERMAL).glob("cooling_device*")):
        kind = _read(device / "type") or ""
        if not any(word in kind for word in _FREQ_COOLING):
            continue
        state = _read(device / "cur_state")
        if state is None or not state.isdigit():
            continue
        seen = True
        if int(state) > 0:
            active.append(f"{kind} state {state}")
    if not seen:
        return None
    return Throttling(source="cooling_device", throttled_now=bool(active), detail=", ".join(active))


_ModeNames = dict[Path, tuple[int, dict[int, str]]]  # nvpmodel.conf -> (mtime, mode id -> name)


def read_power_mode(root: Path, names: _ModeNames | None = None) -> PowerMode | None:
    """The Jetson nvpmodel mode, or None where the board has none (or it cannot be read).

    ``names`` caches each nvpmodel.conf's mode names by its mtime (the file is tens of KB on
    an Orin and changes only when someone edits it); pass the same dict on every call.
    """
    status = _read(root / NVPMODEL_STATUS)
    match = _PMODE.search(status) if status else None
    if match is None:
        return None
    mode = int(match.group(1))
    names = {} if names is None else names
    for rel in NVPMODEL_CONFS:
        path = root / rel
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            continue
        cached = names.get(path)
        if cached is None or cached[0] != mtime:
            text = _read(path) or ""
            cached = names[path] = (mtime, {int(i): name for i, name in _POWER_MODEL.findall(text)})
        return PowerMode(id=mode, name=cached[1].get(mode))
    return PowerMode(id=mode)


@dataclass
class SystemProbe:
    """Samples process and system figures; CPU percentages cover the time since the last sample."""

    root: Path
    store_dir: Path

    def __post_init__(self) -> None:
        self._process = psutil.Process()
        # The first cpu_percent(None) call only sets the baseline (psutil returns 0.0 for it).
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._power_mode_names: _ModeNames = {}

    def process(self) -> ProcessTelemetry:
        rss = self._process.memory_info().rss
        peak = _peak_rss_bytes()
        return ProcessTelemetry(
            rss_mb=round(rss / _MB, 2),
            peak_rss_mb=round(max(peak, rss) / _MB, 2),
            cpu_percent=round(self._process.cpu_percent(None), 2),
            threads=self._process.num_threads(),
        )

    def system(self) -> SystemTelemetry:
        memory = psutil.virtual_memory()
        load1, load5, load15 = os.getloadavg()
        try:
            disk = shutil.disk_usage(self.store_dir)
            free_mb, total_mb = disk.free / _MB, disk.total / _MB
        except OSError:  # the store is gone (a test, or an unmounted card): say so with zeros
            free_mb = total_mb = 0.0
        return SystemTelemetry(
            mem_total_mb=round(memory.total / _MB, 1),
            mem_available_mb=round(memory.available / _MB, 1),
            cpu_percent=round(psutil.cpu_percent(None), 2),
            cpu_count=psutil.cpu_count() or 1,
            load1=round(load1, 2),
            load5=round(load5, 2),
            load15=round(load15, 2),
            temperatures_c=read_temperatures(self.root),
            throttling=read_throttling(self.root),
            power_mode=read_power_mode(self.root, self._power_mode_names),
            disk_free_mb=round(free_mb, 1),
            disk_total_mb=round(total_mb, 1),
        )


def _peak_rss_bytes() -> int:
    # ru_maxrss is the peak resident set: KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
