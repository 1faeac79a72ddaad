"""A test certificate authority and a Mosquitto that runs the shipped deploy/mosquitto config.

The broker reads ``deploy/mosquitto/edge.conf`` and ``edge.acl`` as shipped; only the
listener (a free loopback port), the certificate folder and test-only lines (log file,
no persistence, run as the invoking user) are changed.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeagent.mqtt import BrokerConfig, TLSConfig
from tests.conftest import MOSQUITTO_USER_LINE, free_port, mosquitto_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
SHIPPED_CERT_DIR = "/etc/mosquitto/edge/"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestCA:
    """A fleet CA in a folder: ``ca.pem``, and ``<cn>.pem`` + ``<cn>.key`` per issued identity."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("edge test CA"))
            .issuer_name(_name("edge test CA"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = False) -> tuple[Path, Path]:
        """A certificate for ``cn`` (client, or the broker's with 127.0.0.1): (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{cn}.pem", self.folder / f"{cn}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path


class FleetBroker:
    """Mosquitto with the shipped TLS + ACL configuration: a device CA and a host CA.

    Identities whose CN starts with '_' (the shipped ACL's host programs) get certificates
    from the host CA and connect to the host listener; every other CN is a device.
    """

    def __init__(self, workdir: Path) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
        self.workdir = workdir
        self.ca = TestCA(workdir / "pki")  # devices, and the broker's own certificate
        self.host_ca = TestCA(workdir / "host-pki")
        broker_cert, broker_key = self.ca.issue("broker", server=True)
        # The shipped names, in the test's folder.
        certs = workdir / "etc"
        certs.mkdir()
        (certs / "ca.pem").write_bytes(self.ca.ca_file.read_bytes())
        (certs / "host-ca.pem").write_bytes(self.host_ca.ca_file.read_bytes())
        (certs / "broker.pem").write_bytes(broker_cert.read_bytes())
        (certs / "broker.key").write_bytes(broker_key.read_bytes())
        (certs / "edge.acl").write_text((DEPLOY / "edge.acl").read_text())
        self.port, self.host_port = free_port(), free_port()
        shipped = (DEPLOY / "edge.conf").read_text()
        for line in ("listener 8883\n", "listener 8884\n", SHIPPED_CERT_DIR):
            assert line in shipped, f"deploy/mosquitto/edge.conf lost {line!r}"
        conf = (
            shipped.replace("listener 8883\n", f"listener {self.port} 127.0.0.1\n")
            .replace("listener 8884\n", f"listener {self.host_port} 127.0.0.1\n")
            .replace(SHIPPED_CERT_DIR, f"{certs}/")
        )
        self.log = workdir / "mosquitto.log"
        conf = f"{MOSQUITTO_USER_LINE}persistence false\nlog_dest file {self.log}\nlog_type all\n" + conf
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(conf)
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        for port in (self.port, self.host_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.log}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto did not listen on port {port} within 10 s") from None
                    time.sleep(0.05)

    def wait_subscribed(self, client_id: str, count: int, timeout: float = 10) -> None:
        """Wait until the broker has acknowledged ``count`` subscriptions of ``client_id`` (its
        log says so), so a test's publishes cannot overtake a subscription."""
        line = f"Sending SUBACK to {client_id}\n"
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count(line) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{client_id} did not get {count} SUBACKs within {timeout} s")
            time.sleep(0.02)

    @staticmethod
    def is_host(cn: str) -> bool:
        return cn.startswith("_")

    def folder_of(self, cn: str) -> tuple[Path, Path]:
        """(certificate, key) of identity ``cn``, issued by its CA on first use."""
        ca = self.host_ca if self.is_host(cn) else self.ca
        cert, key = ca.folder / f"{cn}.pem", ca.folder / f"{cn}.key"
        if not cert.exists():
            return ca.issue(cn)
        return cert, key

    def tls(self, cn: str) -> TLSConfig:
        cert, key = self.folder_of(cn)
        return TLSConfig(ca_file=str(self.ca.ca_file), cert_file=str(cert), key_file=str(key))

    def config(self, cn: str, *, port: int | None = None) -> BrokerConfig:
        """Identity ``cn`` on its own listener (or ``port``)."""
        default = self.host_port if self.is_host(cn) else self.port
        return BrokerConfig("127.0.0.1", port or default, tls=self.tls(cn))

    def url(self, cn: str) -> str:
        return f"mqtts://127.0.0.1:{self.host_port if self.is_host(cn) else self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
