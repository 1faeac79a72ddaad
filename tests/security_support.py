"""Helpers for the security tests: an agent process with a minimal configuration, and a
private CA with server and client certificates for a Mosquitto that requires them."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


class AgentProcess:
    """``edgeagent run`` as a real process, configured for one device on one broker."""

    def __init__(
        self,
        root: Path,
        broker: Any,
        keys: Path,
        device: str,
        *,
        prefix: str,
        tls: dict[str, Path] | None = None,
        extra: str = "",
    ) -> None:
        self.root = root
        self.device = device
        self.socket = root / "agent.sock"
        self.config = root / "agent.toml"
        scheme = "mqtts" if tls else "mqtt"
        lines = [
            f'device_id = "{device}"',
            f'state_dir = "{root / "state"}"',
            f'socket_path = "{self.socket}"',
            f'broker_url = "{scheme}://{broker.host}:{broker.port}"',
            f'topic_prefix = "{prefix}"',
            f'trusted_keys = "{keys}"',
            'profile = "generic-x86_64"',
            "transfer_block_kib = 16",
            "transfer_window = 8",
            "telemetry_interval_s = 0",
        ]
        lines += [f'tls_{name} = "{path}"' for name, path in (tls or {}).items()]
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "agent.log"

    def start(self) -> AgentProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "edgeagent"), "-v", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ},
            )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_pki(folder: Path, clients: tuple[str, ...]) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and one client certificate per name
    (CN = the name), as PEM files in ``folder``; returns name -> path (``NAME.crt``/``NAME.key``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, Path] = {}

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        files[f"{name}.crt"] = folder / f"{name}.crt"
        files[f"{name}.key"] = folder / f"{name}.key"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def build(subject: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge test CA")])
    ca = (
        build("edge test CA", ca_key)
        .issuer_name(ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    leaves = [("server", ExtendedKeyUsageOID.SERVER_AUTH)] + [
        (c, ExtendedKeyUsageOID.CLIENT_AUTH) for c in clients
    ]
    for name, usage in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = build(name, key).issuer_name(ca_name)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if name == "server":
            alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        write(name, builder.sign(ca_key, hashes.SHA256()), key)
    return files
