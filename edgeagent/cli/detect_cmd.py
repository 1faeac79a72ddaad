"""``edgeagent detect``: which device profile fits this hardware, and why."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.cli.profile_args import add_profile_args, detection_from_args

if TYPE_CHECKING:  # pydantic models: imported by the handlers, not at --help time
    from devices.detect import Detection

EPILOG = """\
examples:
  edgeagent detect                      # this device
  edgeagent detect --json               # the same, machine-readable
  edgeagent detect --root /mnt/sdcard   # a mounted SD-card image or another root filesystem
  edgeagent detect --profile rpi4       # what an operator override would give
  edgeagent detect --profile-file ./myboard.toml   # check a profile you wrote

The agent runs the same detection at start, and `profile = "..."` in agent.toml overrides it.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="show the device profile for this hardware and the evidence",
        description=(
            "Read /proc, /sys, /dev, /etc and the library folders under ROOT, pick the device "
            "profile, and list the runtimes/delegates the agent will try in order."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=Path("/"), help="root filesystem to inspect (default /)")
    add_profile_args(parser, precision=False)
    parser.add_argument("--json", action="store_true", help="print the detection as JSON")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    detection = detection_from_args(args, args.root)
    if args.json:
        print(detection.model_dump_json(indent=2))
    else:
        print(format_detection(detection))
    return 0


def format_detection(d: Detection) -> str:
    """A human-readable table of a detection."""
    from devices.detect import CORAL_USB_IDS

    ev = d.evidence
    profile = f"{d.profile} (host {d.host_profile})" if d.host_profile else d.profile
    memory = f"{ev.mem_total_mib} MiB ({d.memory_class})" if ev.mem_total_mib else "unknown"
    rows = [
        ("profile", f"{profile}  [{d.source}]"),
        ("reason", d.reason),
        ("architecture", d.architecture or "unknown"),
        ("cpus", str(ev.cpu_count) if ev.cpu_count else "unknown"),
        ("memory", memory),
        ("accelerators", ", ".join(d.accelerators) or "none"),
        ("board model", ev.model or ev.cpuinfo_model or "-"),
        ("compatible", ", ".join(ev.compatible) or "-"),
        ("cpu", ev.cpu_name or "-"),
        ("jetson linux", f"{ev.l4t_release} ({ev.l4t_board})" if ev.l4t_release else "-"),
        ("edge tpu", ", ".join(ev.apex_devices + [u for u in ev.usb_ids if u in CORAL_USB_IDS]) or "-"),
    ]
    rows += [(f"lib {name}", ", ".join(paths)) for name, paths in sorted(ev.libraries.items())]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append("")
    lines.append("candidates, best first:")
    for i, c in enumerate(d.candidates, 1):
        extra = []
        if c.artifact_precision and c.artifact_precision != c.precision:
            extra.append(f"from {c.artifact_precision} artifact")
        if c.artifact_suffix:
            extra.append(f"artifact *{c.artifact_suffix}")
        if c.threads:
            extra.append(f"threads={c.threads}")
        lines.append(f"  {i}. {c.runtime:<12} {c.delegate:<26} {c.precision:<5} {', '.join(extra)}".rstrip())
    for note in d.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
