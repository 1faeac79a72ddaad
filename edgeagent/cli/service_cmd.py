"""``edgeagent install-service``: install the systemd unit, sysusers.d, tmpfiles.d and config.

Every action is printed; ``--dry-run`` prints them and changes nothing. ``--root`` installs
into another root filesystem (an SD-card image being prepared, or a test's temp folder);
the systemd tools then do not run, because they would act on this machine, not on that root.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import EdgeError, UsageError

UNIT_NAME = "edgeagent.service"
DEFAULT_EXEC = Path("/usr/bin/edgeagent")
# Where the unit files are looked for, first match wins: --source, a source checkout, and
# the data files of an installed wheel (<prefix>/share/edgeagent/systemd).
_CHECKOUT_SOURCE = Path(__file__).resolve().parents[2] / "systemd"
_WHEEL_SOURCE = Path(sys.prefix) / "share" / "edgeagent" / "systemd"
# Folders a unit setting hides from the service (ExecStart must not live there), per value.
_HIDING: tuple[tuple[str, tuple[str, ...], tuple[Path, ...]], ...] = (
    ("ProtectHome", ("yes", "true", "tmpfs"), (Path("/home"), Path("/root"), Path("/run/user"))),
    ("PrivateTmp", ("yes", "true", "on", "1"), (Path("/tmp"), Path("/var/tmp"))),  # noqa: S108 - names, not files
)
# Drop-ins installed when detection finds the hardware they are for: profile prefix -> file.
_DROPINS = {"jetson-": "jetson.conf", "coral-usb": "coral-usb.conf"}

EPILOG = """\
examples:
  sudo /opt/edgeagent/bin/edgeagent install-service --dry-run   # show what it would do
  sudo /opt/edgeagent/bin/edgeagent install-service
  sudo systemctl enable --now edgeagent
  edgeagent install-service --root /mnt/sdcard                   # prepare an image
"""


@dataclass(frozen=True)
class _Copy:
    source: str  # file name under the source folder
    dest: str  # path under root
    overwrite: bool = True


_FILES = (
    _Copy("edgeagent.service", f"etc/systemd/system/{UNIT_NAME}"),
    _Copy("edgeagent.sysusers", "etc/sysusers.d/edgeagent.conf"),
    _Copy("edgeagent.tmpfiles", "etc/tmpfiles.d/edgeagent.conf"),
    _Copy("agent.toml.example", "etc/edgeagent/agent.toml.example"),
    # The operator's configuration is never overwritten.
    _Copy("agent.toml.example", "etc/edgeagent/agent.toml", overwrite=False),
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "install-service",
        help="install the systemd service, its user, directories and example config",
        description=(
            "Copy edgeagent.service (ExecStart pointing at this edgeagent), the sysusers.d and "
            "tmpfiles.d files, and the example agent.toml; add hardware drop-ins (Jetson, Coral "
            "USB) that detection calls for. On the live system (--root /) also create the user "
            "and directories and reload systemd. Enable it yourself with systemctl."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="print the actions, change nothing")
    parser.add_argument(
        "--root", "--prefix", type=Path, default=Path("/"), help="root filesystem to install into (default /)"
    )
    parser.add_argument(
        "--exec-start",
        type=Path,
        metavar="PATH",
        help="edgeagent program for ExecStart (default: the one beside this Python, else /usr/bin/edgeagent)",
    )
    parser.add_argument("--source", type=Path, metavar="DIR", help="folder holding the unit files to install")
    parser.set_defaults(handler=_run)


def default_exec_start() -> Path:
    """The edgeagent script of this installation (a venv's bin/edgeagent), else /usr/bin/edgeagent."""
    beside = Path(sys.executable).parent / "edgeagent"
    return beside if beside.is_file() else DEFAULT_EXEC


def render_unit(text: str, exec_start: Path) -> str:
    """The unit text with ExecStart's program replaced by ``exec_start`` (arguments kept)."""
    new, count = re.subn(r"^ExecStart=\S+", f"ExecStart={exec_start}", text, flags=re.MULTILINE)
    if count != 1:
        raise EdgeError(f"{UNIT_NAME} must have exactly one ExecStart= line, found {count}")
    return new


def hidden_by_unit(unit_text: str, program: Path) -> str | None:
    """Which setting of the unit hides ``program`` from the service ('PrivateTmp=yes hides /tmp'), or None.

    The service sees its own, emptied /tmp (PrivateTmp) and no home folders (ProtectHome), so
    a program there exists for the installer but not for systemd: the unit would never start.
    """
    settings = {key: value.strip() for key, value in re.findall(r"^(\w+)=(.*)$", unit_text, re.MULTILINE)}
    for key, values, folders in _HIDING:
        value = settings.get(key, "")
        if value.lower() in values:
            for folder in folders:
                if program.is_relative_to(folder):
                    return f"{key}={value} hides {folder}"
    for entry in settings.get("InaccessiblePaths", "").split():
        folder = Path(entry.lstrip("-+"))
        if program.is_relative_to(folder):
            return f"InaccessiblePaths= hides {folder}"
    return None


def source_dir(explicit: Path | None = None) -> Path:
    """The folder with the files to install (see the search order above)."""
    candidates = [explicit] if explicit else [_CHECKOUT_SOURCE, _WHEEL_SOURCE]
    for folder in candidates:
        if folder is not None and (folder / UNIT_NAME).is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise UsageError(f"cannot find {UNIT_NAME} (looked in {looked}); pass --source DIR")


def _run(args: argparse.Namespace) -> int:
    root: Path = args.root
    live = root.resolve() == Path("/")
    exec_start: Path = args.exec_start or default_exec_start()
    if not exec_start.is_absolute():
        raise UsageError(f"--exec-start must be an absolute path, got {exec_start}")
    source = source_dir(args.source)
    hidden = hidden_by_unit((source / UNIT_NAME).read_text(encoding="utf-8"), exec_start)
    if hidden is not None:
        raise UsageError(
            f"ExecStart {exec_start} cannot start: {hidden} from the service; "
            "install edgeagent in a venv under /opt (see docs/devices.md) or pass --exec-start"
        )
    would = "would " if args.dry_run else ""

    for item in _FILES + _dropins(root):
        dest = root / item.dest
        if dest.exists() and not item.overwrite:
            print(f"{would}keep     {dest} (exists; compare with {dest.name}.example)")
            continue
        data = (source / item.source).read_bytes()
        if item.source == UNIT_NAME:
            data = render_unit(data.decode("utf-8"), exec_start).encode("utf-8")
            print(f"{would}install  {dest} (ExecStart={exec_start} run)")
        else:
            print(f"{would}install  {dest}")
        if not args.dry_run:
            _write(dest, data)

    for argv in _system_commands(live):
        if shutil.which(argv[0]) is None:
            print(f"skip     {' '.join(argv)} ({argv[0]} not found)")
            continue
        print(f"{would}run      {' '.join(argv)}")
        if not args.dry_run:
            result = subprocess.run(argv, check=False, capture_output=True, text=True)
            if result.returncode != 0:
                lines = (result.stderr or result.stdout).strip().splitlines()
                detail = lines[-1] if lines else "no output"
                raise EdgeError(f"{' '.join(argv)} failed (rc {result.returncode}): {detail}")
    if not live:
        print(f"note     systemd tools not run: {root} is not this system's root")
    print(f"next: systemctl enable --now edgeagent   (configure {root / 'etc/edgeagent/agent.toml'} first)")
    return 0


def _dropins(root: Path) -> tuple[_Copy, ...]:
    """Drop-ins for the hardware detection finds under ``root`` (none if detection fails)."""
    from devices.detect import detect  # pydantic: not at --help time
    from devices.errors import DeviceError

    try:
        detection = detect(root)
    except DeviceError as exc:
        print(f"note     no hardware drop-ins: {exc}")
        return ()
    names = {detection.profile, detection.host_profile or ""}
    return tuple(
        _Copy(f"dropins/{conf}", f"etc/systemd/system/{UNIT_NAME}.d/{conf}")
        for prefix, conf in _DROPINS.items()
        if any(name.startswith(prefix) for name in names)
    )


def _system_commands(live: bool) -> list[list[str]]:
    if not live:
        return []
    return [
        ["systemd-sysusers", "/etc/sysusers.d/edgeagent.conf"],
        ["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/edgeagent.conf"],
        ["systemctl", "daemon-reload"],
    ]


def _write(dest: Path, data: bytes) -> None:
    from edgeagent.storage import atomic_write_bytes

    try:
        atomic_write_bytes(dest, data, mode=0o644)
    except PermissionError as exc:
        raise UsageError(f"cannot write {dest}: permission denied (run as root, e.g. with sudo)") from exc
    except OSError as exc:
        raise EdgeError(f"cannot write {dest}: {exc.strerror}") from exc
