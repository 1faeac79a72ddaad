"""``edgectl keys``: make the Ed25519 key pair that signs bundles and desired state."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="make signing keys",
        description="Make and manage the Ed25519 keys that sign bundles.",
    )
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser(
        "generate",
        help="write NAME.key (private, 0600) and NAME.pub",
        description=(
            "Write DIR/NAME.key (private, mode 0600: keep it on the build host) and DIR/NAME.pub "
            "(copy it to devices, e.g. /etc/edgeagent/keys/). Never overwrites an existing key."
        ),
    )
    gen.add_argument("--name", required=True, help="key name, e.g. 'release'")
    gen.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the two files")
    gen.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from edgeagent.signing import generate_keypair  # cryptography: not at --help time

    private, public, kid = generate_keypair(args.name, args.out)
    print(f"private key: {private}")
    print(f"public key:  {public}")
    print(f"key id:      {kid}")
    return 0
