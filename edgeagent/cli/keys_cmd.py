"""``edgectl keys``: make signing keys, and manage the root-signed key set devices trust."""

from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path

from edgeagent.defaults import DEFAULT_PREFIX
from edgeagent.errors import UsageError

KEYSET_EPILOG = """\
examples:
  edgectl keys generate --name root --out offline/          # keep root.key offline
  edgectl keys rotate --root offline/root.key --set keyset.json --add keys/release.pub
  edgectl keys publish --set keyset.json --broker mqtts://broker:8883 --ca-file ca.pem \\
      --cert-file edgectl.pem --key-file edgectl.key
  edgectl keys rotate --root offline/root.key --set keyset.json --add keys/release-2.pub --key-expires 180d
  edgectl keys revoke --root offline/root.key --set keyset.json 3f9a0c1d2e4b5a69

Each change writes version + 1 of the signed key set to --set; devices with trust_root in
agent.toml accept it from the broker once published, and refuse any older version.
See docs/security.md.
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="make signing keys, rotate and revoke them",
        description="Make the Ed25519 keys that sign bundles, and manage the key set devices trust.",
        epilog=KEYSET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    rotate = sub.add_parser(
        "rotate",
        help="sign the next key set: add (or remove) release keys, renew its expiry",
        description="Write the next version of the key set, signed by the root key. Without --set "
        "FILE existing, the first version (1) is made: add the release keys devices trust today.",
        epilog=KEYSET_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _keyset_options(rotate)
    rotate.add_argument("--add", type=Path, action="append", default=[], metavar="PUB", help="trust this key")
    rotate.add_argument("--key-expires", metavar="WHEN", help="expiry of the keys added (YYYY-MM-DD or Nd)")
    rotate.add_argument("--remove", action="append", default=[], metavar="KEY_ID", help="stop trusting a key")
    rotate.set_defaults(handler=_rotate)

    revoke = sub.add_parser(
        "revoke",
        help="sign the next key set with KEY_ID revoked",
        description="Write the next version of the key set with the keys removed and revoked: devices "
        "refuse bundles, desired documents and commands they signed (code revoked_key).",
    )
    _keyset_options(revoke)
    revoke.add_argument("key_ids", nargs="+", metavar="KEY_ID", help="16 hex digits (edgectl keys generate)")
    revoke.set_defaults(handler=_revoke)

    publish = sub.add_parser(
        "publish",
        help="send the signed key set to the fleet (retained on edge/v1/trust)",
        description="Publish the key set file, retained, so every device gets it now or when it reconnects.",
    )
    publish.add_argument("--set", required=True, type=Path, dest="keyset", metavar="FILE")
    publish.add_argument("--broker", required=True, help="broker URL, e.g. mqtts://broker:8883")
    publish.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default: %(default)s)")
    publish.add_argument("--ca-file", type=Path, help="CA bundle for the broker's certificate (mqtts)")
    publish.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS")
    publish.add_argument("--key-file", type=Path, help="private key of the client certificate")
    publish.set_defaults(handler=_publish)


def _keyset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, type=Path, metavar="ROOT.key", help="the root private key")
    parser.add_argument("--set", required=True, type=Path, dest="keyset", metavar="FILE", help="key set file")
    parser.add_argument(
        "--expires", default="365d", metavar="WHEN", help="the set's expiry: YYYY-MM-DD or Nd (default 365d)"
    )


def parse_when(text: str, now: float) -> int:
    """``YYYY-MM-DD`` (midnight UTC) or ``Nd`` (N days from now) as Unix seconds."""
    if match := re.fullmatch(r"(\d{1,5})d", text):
        return int(now) + int(match.group(1)) * 86400
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a date (YYYY-MM-DD) or a number of days (e.g. 90d)") from None
    return int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp())


def _generate(args: argparse.Namespace) -> int:
    from edgeagent.signing import generate_keypair  # cryptography: not at --help time

    private, public, kid = generate_keypair(args.name, args.out)
    print(f"private key: {private}")
    print(f"public key:  {public}")
    print(f"key id:      {kid}")
    return 0


def _next(
    args: argparse.Namespace,
    *,
    add: list[Path],
    key_expires: str | None,
    remove: list[str],
    revoke: list[str],
) -> int:
    from edgeagent.signing import SigningKey, key_id, load_public_key
    from edgeagent.trust import next_keyset, read_keyset_file, sign_keyset, write_keyset_file

    now = time.time()
    root = SigningKey.load(args.root)
    held = read_keyset_file(args.keyset, root)
    publics = {key_id(k): k for k in (load_public_key(p) for p in add)}
    if root.key_id in publics:
        raise UsageError("the root key signs key sets only; it cannot be a release key")
    for kid in remove + revoke:
        if not re.fullmatch(r"[0-9a-f]{16}", kid):
            raise UsageError(f"{kid!r} is not a key id (16 lowercase hex digits)")
    keyset = next_keyset(
        held,
        add=publics,
        key_expires=parse_when(key_expires, now) if key_expires else None,
        remove=remove,
        revoke=revoke,
        expires=parse_when(args.expires, now),
        now=now,
    )
    write_keyset_file(args.keyset, sign_keyset(keyset, root))
    print(f"{args.keyset}: {keyset.summary()}")
    print("next: edgectl keys publish --set FILE --broker URL")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    return _next(args, add=args.add, key_expires=args.key_expires, remove=args.remove, revoke=[])


def _revoke(args: argparse.Namespace) -> int:
    return _next(args, add=[], key_expires=None, remove=[], revoke=args.key_ids)


def _publish(args: argparse.Namespace) -> int:
    import logging
    import uuid

    from edgeagent.errors import EdgeError
    from edgeagent.mqtt import BrokerConfig, MqttSession, TLSConfig
    from edgeagent.protocol import Topics
    from edgeagent.trust import peek_keyset

    try:
        data = args.keyset.read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.keyset}: cannot read the key set ({exc.strerror})") from exc
    try:
        keyset = peek_keyset(data)  # the devices check the signature; this catches a wrong file
    except EdgeError as exc:
        raise UsageError(f"{args.keyset}: not a key set ({exc})") from exc
    if bool(args.cert_file) != bool(args.key_file):
        raise UsageError("mutual TLS needs both --cert-file and --key-file")
    tls = TLSConfig.from_files(args.ca_file, args.cert_file, args.key_file)
    broker = BrokerConfig.from_url(args.broker, tls=tls)
    topic = Topics(args.prefix).trust
    session = MqttSession(broker, f"edgectl-keys-{uuid.uuid4().hex[:8]}", connect_log_level=logging.DEBUG)
    with session:
        if not session.wait_connected(10):
            reason = session.last_connect_error or "no answer"
            raise UsageError(f"cannot connect to the broker at {broker.url} ({reason})")
        info = session.publish_tracked(topic, data, qos=1, retain=True)
        deadline = time.monotonic() + 10
        while info is not None and not info.is_published() and time.monotonic() < deadline:
            time.sleep(0.05)
        if info is None or not info.is_published():
            raise UsageError(f"the broker at {broker.url} did not acknowledge the key set")
    print(f"{topic}: published key set version {keyset.version} (retained)")
    return 0
