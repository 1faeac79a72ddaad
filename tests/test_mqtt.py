"""The MQTT session: mutual TLS against a real Mosquitto, URL parsing, backoff, drop counting."""

from __future__ import annotations

import datetime
import ipaddress
import queue
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeagent.errors import UsageError
from edgeagent.mqtt import Backoff, BrokerConfig, MqttSession, TLSConfig
from tests.conftest import MOSQUITTO_USER_LINE, free_port, mosquitto_binary


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool = False, san_ip: str | None = None):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san_ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(san_ip)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:  # type: ignore[no-untyped-def]
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(path)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test-ca", None, None, ca_key, ca=True)
    files = {
        "ca": _write(tmp_path / "ca.pem", cert=ca),
        "server": _write(
            tmp_path / "server.pem",
            cert=_cert("localhost", ca_key, ca.subject, server_key, san_ip="127.0.0.1"),
        ),
        "server_key": _write(tmp_path / "server.key", key=server_key),
        "client": _write(tmp_path / "client.pem", cert=_cert("pi-1", ca_key, ca.subject, client_key)),
        "client_key": _write(tmp_path / "client.key", key=client_key),
    }
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n{MOSQUITTO_USER_LINE}"
        f"cafile {files['ca']}\ncertfile {files['server']}\nkeyfile {files['server_key']}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
        f"persistence false\nlog_dest file {tmp_path / 'mosquitto.log'}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield port, files
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.mosquitto
def test_mutual_tls(tls_broker) -> None:  # type: ignore[no-untyped-def]
    port, files = tls_broker
    tls = TLSConfig(ca_file=files["ca"], cert_file=files["client"], key_file=files["client_key"])
    got: queue.Queue[bytes] = queue.Queue()
    with MqttSession(BrokerConfig("127.0.0.1", port, tls=tls), "pi-1") as session:
        assert session.wait_connected(10), "mutual TLS connection failed"
        session.subscribe("edge/v1/device/pi-1/desired", lambda m: got.put(m.payload))
        time.sleep(0.2)
        assert session.publish("edge/v1/device/pi-1/desired", b"over tls")
        assert got.get(timeout=5) == b"over tls"
    # Without a client certificate the broker refuses the TLS handshake.
    no_cert = MqttSession(
        BrokerConfig("127.0.0.1", port, tls=TLSConfig(ca_file=files["ca"])),
        "anon",
        backoff=Backoff(base_s=0.05, cap_s=0.1),
    )
    with no_cert:
        assert not no_cert.wait_connected(2)


def test_broker_urls() -> None:
    plain = BrokerConfig.from_url("mqtt://user:p%40ss@broker.local")
    assert (plain.host, plain.port, plain.username, plain.password, plain.tls) == (
        "broker.local",
        1883,
        "user",
        "p@ss",
        None,
    )
    secure = BrokerConfig.from_url("mqtts://broker.local")
    assert secure.port == 8883 and secure.tls == TLSConfig()
    assert secure.url == "mqtts://broker.local:8883"
    for bad in ("http://x", "mqtt://", "broker:1883", "mqtt://x:99999"):
        with pytest.raises(UsageError):
            BrokerConfig.from_url(bad)


def test_backoff_grows_with_jitter_and_resets() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(delays[4:]) > max(delays[:1])  # the ceiling grows
    backoff.reset()
    assert backoff.next_delay() <= 0.5


@pytest.mark.mosquitto
def test_oversized_messages_are_dropped_and_counted(mosquitto) -> None:  # type: ignore[no-untyped-def]
    got: queue.Queue[bytes] = queue.Queue()
    with MqttSession(BrokerConfig(mosquitto.host, mosquitto.port), f"small-{time.monotonic_ns()}") as session:
        assert session.wait_connected(5)
        session.subscribe("t/limit", lambda m: got.put(m.payload), max_bytes=100)
        session.subscribe("t/boom", lambda m: 1 / 0)
        time.sleep(0.2)
        session.publish("t/limit", b"x" * 101)
        session.publish("t/boom", b"x")
        session.publish("t/limit", b"ok")
        assert got.get(timeout=5) == b"ok"
        time.sleep(0.2)
        assert session.stats.dropped_oversize == 1
        assert session.stats.handler_errors == 1
    assert not session.publish("t/limit", b"closed")  # a closed session says so


@pytest.mark.mosquitto
def test_mqtt5_option(mosquitto) -> None:  # type: ignore[no-untyped-def]
    got: queue.Queue[bytes] = queue.Queue()
    broker = BrokerConfig(mosquitto.host, mosquitto.port, protocol="5")
    with MqttSession(broker, f"v5-{time.monotonic_ns()}") as session:
        assert session.wait_connected(5)
        session.subscribe("t/v5", lambda m: got.put(m.payload))
        time.sleep(0.2)
        session.publish("t/v5", b"five")
        assert got.get(timeout=5) == b"five"


@pytest.mark.mosquitto
def test_publishing_from_many_threads_over_tls_keeps_the_connection(tls_broker) -> None:  # type: ignore[no-untyped-def]
    # An OpenSSL connection must not be written by one thread while another reads it: paho
    # writes a publish at once in the caller's thread, and a registry's workers or an agent's
    # deployer and telemetry threads publish while the network thread reads. That broke the
    # TLS record stream ("bad record mac") and cost a reconnect under load.
    port, files = tls_broker
    tls = TLSConfig(ca_file=files["ca"], cert_file=files["client"], key_file=files["client_key"])
    got: queue.Queue[bytes] = queue.Queue()
    with MqttSession(BrokerConfig("127.0.0.1", port, tls=tls), "pi-1", max_inflight=256) as session:
        assert session.wait_connected(10)
        session.subscribe("load/#", lambda m: got.put(m.payload), inline=True)
        time.sleep(0.3)
        payload = b"x" * 8192

        def publisher(n: int) -> None:
            for i in range(300):
                assert session.publish(f"load/{n}", payload + i.to_bytes(4, "big"), qos=1)

        threads = [threading.Thread(target=publisher, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        deadline = time.monotonic() + 30
        while got.qsize() < 1200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (got.qsize(), session.stats.disconnects, session.stats.connects) == (1200, 0, 1)
