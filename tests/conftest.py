"""Shared fixtures: a real Mosquitto broker, the digits data, signing keys, model fixtures."""

from __future__ import annotations

import getpass
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


# Run as root, Mosquitto drops to user "mosquitto", which cannot read pytest's private temp
# folders (config includes, certificates, its log file); as the invoking user it stays put.
MOSQUITTO_USER_LINE = f"user {getpass.getuser()}\n"


class MosquittoProcess:
    """A real Mosquitto on a loopback port that a test can stop and start again (same port)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.broker = Broker("127.0.0.1", self.port)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{MOSQUITTO_USER_LINE}"
            "allow_anonymous true\n"
            "persistence false\n"
            f"log_dest file {workdir / 'mosquitto.log'}\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MosquittoProcess:
        out = self.workdir / "mosquitto.out"
        # Output goes to a file, not a pipe nobody reads (a full pipe would stall the broker).
        with out.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {out.read_text(errors='replace')}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within 10 s")

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


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Mosquitto on a free loopback port for the whole test session."""
    proc = MosquittoProcess(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield proc.broker
    finally:
        proc.stop()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A Mosquitto of this test's own, for tests that stop and restart the broker."""
    proc = MosquittoProcess(tmp_path).start()
    try:
        yield proc
    finally:
        proc.stop()


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
