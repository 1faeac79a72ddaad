"""A real nginx on loopback (plain HTTP, TLS with a test CA, PUT through the dav module, a slow
location for stop-mid-file tests) and an S3 server (moto), for the delivery tests."""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def make_test_ca(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key) for 127.0.0.1, made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


class Nginx:
    """nginx serving ``root`` on http://127.0.0.1:PORT/ and https://127.0.0.1:TLS_PORT/.

    ``/slow/`` serves the same files at ``rate`` bytes/s (to stop the server mid-file);
    PUT creates files (dav_methods), so ``edgectl registry publish --to http://…`` works.
    """

    def __init__(self, workdir: Path, root: Path, rate: int = 4096) -> None:
        binary = nginx_binary()
        if binary is None:
            pytest.skip("nginx is not installed (apt-get install -y nginx; .ci/run does this)")
        self.binary = binary
        self.workdir = workdir
        self.root = root
        self.port = free_port()
        self.tls_port = free_port()
        self.ca, cert, key = make_test_ca(workdir)
        self.access_log = workdir / "access.log"
        (workdir / "tmp").mkdir(exist_ok=True)
        self.conf = workdir / "nginx.conf"
        tmp = workdir / "tmp"
        self.conf.write_text(
            f"user {getpass.getuser()};\n"
            "daemon off;\nworker_processes 1;\n"
            f"pid {workdir / 'nginx.pid'};\nerror_log {workdir / 'error.log'} info;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            f"  access_log {self.access_log};\n"
            f"  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;\n"
            f"  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;\n"
            "  client_max_body_size 1g;\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.port};\n"
            f"    listen 127.0.0.1:{self.tls_port} ssl;\n"
            f"    ssl_certificate {cert}; ssl_certificate_key {key};\n"
            f"    root {root};\n"
            "    location / { dav_methods PUT; create_full_put_path on; dav_access user:rw all:r; }\n"
            f"    location /slow/ {{ alias {root}/; limit_rate {rate}; }}\n"
            "  }\n"
            "}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}/"

    def start(self) -> Nginx:
        out = self.workdir / "nginx.out"
        with out.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf), "-p", str(self.workdir)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {out.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen within 10 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def statuses(self) -> list[str]:
        """The (status, path) of every request so far, as the access log has them."""
        if not self.access_log.exists():
            return []
        return [
            line.split('"')[2].split()[0] + " " + line.split('"')[1]
            for line in self.access_log.read_text().splitlines()
        ]


def s3_server(monkeypatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """moto's S3 server on a loopback port with a bucket ``edge``; yields its endpoint URL."""
    moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the dev extra)")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="edge")
    try:
        yield endpoint
    finally:
        server.stop()
