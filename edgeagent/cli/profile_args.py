"""The device-profile flags ``serve``, ``bench`` and ``detect`` share, and what they resolve to.

``--profile NAME`` or ``--profile-file PATH`` (an operator's own profile, any file name)
replace detection; ``--profiles-dir DIR`` is where local profiles are looked up by name
(default ``$EDGEAGENT_PROFILES_DIR`` or ``/etc/edgeagent/profiles``, as for the agent);
``--precision`` is the precision override (``serve`` and ``bench``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from edgeagent.defaults import DEFAULT_PROFILES_DIR

if TYPE_CHECKING:  # pydantic models: imported when the flags are used, not at --help time
    from devices.detect import Detection
    from devices.profile import Candidate

PROFILES_DIR_ENV = "EDGEAGENT_PROFILES_DIR"


def precisions() -> tuple[str, ...]:
    """The precision names a profile knows (devices.profile.Precision)."""
    from devices.profile import Precision

    return get_args(Precision)


def add_profile_args(parser: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """Add --profile / --profile-file, --profiles-dir and (with ``precision``) --precision."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--profile",
        metavar="NAME",
        help="device profile whose candidates to try (default: detect this hardware; see 'edgeagent detect')",
    )
    which.add_argument(
        "--profile-file",
        type=Path,
        metavar="PATH",
        help="use the profile in this TOML file (the format of devices/profiles/*.toml; see docs/devices.md)",
    )
    parser.add_argument(
        "--profiles-dir",
        type=Path,
        metavar="DIR",
        default=Path(os.environ.get(PROFILES_DIR_ENV) or DEFAULT_PROFILES_DIR),
        help=(
            "folder of local profiles, <name>.toml each; one named like a shipped profile replaces it "
            f"(default: ${PROFILES_DIR_ENV} or {DEFAULT_PROFILES_DIR})"
        ),
    )
    if precision:
        parser.add_argument(
            "--precision",
            type=precision_list,
            default=[],
            metavar="LIST",
            help=(
                "serve only artifacts of these precisions, most preferred first, e.g. 'fp32,int8' "
                "(default: the profile's order)"
            ),
        )


def precision_list(text: str) -> list[str]:
    """argparse type of ``--precision``: 'fp32,int8' -> ['fp32', 'int8']."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = precisions()
    unknown = [p for p in names if p not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {', '.join(known)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a precision twice")
    return names


def detection_from_args(args: argparse.Namespace, root: Path = Path("/")) -> Detection:
    """Detect the hardware under ``root``, with the profile the flags name, if any."""
    from devices.detect import detect
    from devices.profile import load_profile_file

    override = load_profile_file(args.profile_file) if args.profile_file else args.profile
    return detect(root, override=override, profiles_dir=args.profiles_dir)


def candidates_for(args: argparse.Namespace) -> tuple[str, list[Candidate]]:
    """(profile name, ordered candidates) for the flags (before any precision override)."""
    detection = detection_from_args(args)
    return detection.profile, list(detection.candidates)
