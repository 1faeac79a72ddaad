"""Shared fixtures: a real Mosquitto broker, the digits data, signing keys, model fixtures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeagent.signing import SigningKey, generate_keypair

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"


@dataclass(frozen=True)
class Broker:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {out.strip()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within {timeout_s} s")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Mosquitto on a free loopback port for the whole test session."""
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
    port = _free_port()
    conf_dir = tmp_path_factory.mktemp("mosquitto")
    conf = conf_dir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        f"log_dest file {conf_dir / 'mosquitto.log'}\n"
        "max_inflight_messages 0\n"
        "max_queued_messages 100000\n"
    )
    # Output goes to a file, not a pipe nobody reads (a full pipe would stall the broker).
    log_file = (conf_dir / "mosquitto.out").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_port("127.0.0.1", port, proc, timeout_s=10, log=conf_dir / "mosquitto.out")
        yield Broker("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


@pytest.fixture(scope="session")
def digits():  # type: ignore[no-untyped-def]
    """scikit-learn's digits (shipped with the package), split train/calibration/test."""
    pytest.importorskip("sklearn")
    from converter.datasets import load_digits_splits

    return load_digits_splits(seed=0)


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str

    def load(self) -> SigningKey:
        return SigningKey.load(self.private)


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    private, public, kid = generate_keypair("release", tmp_path_factory.mktemp("keys"))
    return KeyPair(private, public, kid)


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    private, public, kid = generate_keypair("intruder", tmp_path_factory.mktemp("other-keys"))
    return KeyPair(private, public, kid)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The committed model fixtures (regenerate with scripts/make_fixtures.py)."""
    if not (MODELS / "mlp.onnx").exists():
        pytest.fail("tests/fixtures/models is missing; run .venv/bin/python scripts/make_fixtures.py")
    return MODELS
