"""Host identities over mutual TLS (issue 19, item 4): a real Mosquitto that requires client
certificates (made here with `cryptography`), a real agent, and `edgectl push`, `command`,
`rollback` and `registry serve` given their CA, certificate and key by flag, environment or
config file; without them each fails in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.bundle import AcceptanceGate
from edgeagent.bundle.create import create_bundle
from edgeagent.signing import SigningKey, generate_keypair
from tests.conftest import MOSQUITTO_USER_LINE, MosquittoProcess
from tests.security_support import AgentProcess, make_pki

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

EDGECTL = str(Path(sys.executable).parent / "edgectl")
PREFIX = "tls"
DEVICE = "dev-tls"


class TlsFleet:
    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root = root
        self.pki = make_pki(root / "pki", (DEVICE, "edgectl-host", "registry"))
        self.broker_proc = MosquittoProcess(root)
        port = self.broker_proc.port
        self.broker_proc.conf.write_text(
            f"listener {port} 127.0.0.1\n{MOSQUITTO_USER_LINE}"
            f"cafile {self.pki['ca.crt']}\ncertfile {self.pki['server.crt']}\n"
            f"keyfile {self.pki['server.key']}\n"
            "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
            f"persistence false\nlog_dest file {root / 'mosquitto.log'}\n"
        )
        self.url = f"mqtts://127.0.0.1:{port}"
        generate_keypair("release", root / "keys")
        self.keys, self.key = root / "keys", root / "keys" / "release.key"
        self.registry = root / "registry"
        self.registry.mkdir()
        self.bundles = [
            create_bundle(
                name="digits", version=v, models=[model_dir / "mlp.onnx"], key=SigningKey.load(self.key),
                out_dir=self.registry, golden=model_dir / "golden_mlp.npz",
                gate=AcceptanceGate(min_accuracy=0.9, min_top1_agreement=0.95),
            )
            for v in ("1.0.0", "1.1.0")
        ]  # fmt: skip

    def identity(self, name: str) -> dict[str, str]:
        return {"EDGECTL_CA_FILE": str(self.pki["ca.crt"]), "EDGECTL_CERT_FILE": str(self.pki[f"{name}.crt"]),
                "EDGECTL_KEY_FILE": str(self.pki[f"{name}.key"])}  # fmt: skip

    def flags(self, name: str) -> list[str]:
        return ["--broker", self.url, "--ca-file", str(self.pki["ca.crt"]), "--cert-file",
                str(self.pki[f"{name}.crt"]), "--key-file", str(self.pki[f"{name}.key"])]  # fmt: skip


def _run(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    clean["XDG_CONFIG_HOME"] = "/nonexistent"
    return subprocess.run(
        [EDGECTL, *argv], capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})}
    )


@pytest.fixture
def tls_fleet(tmp_path: Path, model_dir: Path) -> Iterator[tuple[TlsFleet, AgentProcess]]:
    fleet = TlsFleet(tmp_path, model_dir)
    fleet.broker_proc.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    env.update(fleet.identity("registry"), EDGECTL_BROKER=fleet.url, EDGECTL_PREFIX=PREFIX)
    registry_log = tmp_path / "registry.log"
    with registry_log.open("wb") as out:
        registry = subprocess.Popen([EDGECTL, "registry", "serve", "--dir", str(fleet.registry)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    tls = {
        "ca_file": fleet.pki["ca.crt"],
        "cert_file": fleet.pki[f"{DEVICE}.crt"],
        "key_file": fleet.pki[f"{DEVICE}.key"],
    }
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(
        tmp_path / "agent", fleet.broker_proc.broker, fleet.keys, DEVICE, prefix=PREFIX, tls=tls
    )
    agent.start()
    try:
        yield fleet, agent
    finally:
        agent.stop()
        registry.terminate()
        registry.wait(20)
        fleet.broker_proc.stop()


def _active(agent: AgentProcess) -> str | None:
    link = agent.root / "state" / "models" / "default" / "current"
    return link.readlink().name if link.is_symlink() else None


def test_push_command_and_rollback_over_mutual_tls(tls_fleet: tuple[TlsFleet, AgentProcess]) -> None:
    fleet, agent = tls_fleet
    v1, v2 = fleet.bundles
    common = ["--device", DEVICE, "--key", str(fleet.key), "--prefix", PREFIX, "--timeout", "120"]
    # Flags.
    push = _run(
        ["push", str(v1.path), *common, "--registry", str(fleet.registry), *fleet.flags("edgectl-host")]
    )
    assert push.returncode == 0, push.stdout + push.stderr + agent.log.read_text()[-2000:]
    assert f"{DEVICE}: OK" in push.stdout and _active(agent) == v1.sha256
    # A config file (paths relative to it), the password-less way to keep them.
    config = fleet.root / "pki" / "edgectl.toml"
    config.write_text(f'[broker]\nurl = "{fleet.url}"\nca_file = "ca.crt"\ncert_file = "edgectl-host.crt"\n'
                      f'key_file = "edgectl-host.key"\nprefix = "{PREFIX}"\n')  # fmt: skip
    push = _run(["push", str(v2.path), "--device", DEVICE, "--key", str(fleet.key),
                 "--registry", str(fleet.registry), "--config", str(config)])  # fmt: skip
    assert push.returncode == 0, push.stdout + push.stderr
    assert _active(agent) == v2.sha256
    # Environment.
    cmd = _run(
        ["command", "refresh", "--device", DEVICE, "--key", str(fleet.key)], {"EDGECTL_CONFIG": str(config)}
    )
    assert cmd.returncode == 0 and f"{DEVICE}: OK (ok)" in cmd.stdout, cmd.stdout + cmd.stderr
    back = _run(["rollback", *common, *fleet.flags("edgectl-host")])
    assert back.returncode == 0, back.stdout + back.stderr
    assert _active(agent) == v1.sha256


def test_without_the_client_certificate_or_the_ca_each_command_fails_in_one_line(
    tls_fleet: tuple[TlsFleet, AgentProcess],
) -> None:
    fleet, _agent = tls_fleet
    v1 = fleet.bundles[0]
    base = ["--device", DEVICE, "--key", str(fleet.key), "--prefix", PREFIX, "--timeout", "20"]
    no_cert = ["--broker", fleet.url, "--ca-file", str(fleet.pki["ca.crt"])]
    no_ca = ["--broker", fleet.url, "--cert-file", str(fleet.pki["edgectl-host.crt"]),
             "--key-file", str(fleet.pki["edgectl-host.key"])]  # fmt: skip
    runs: dict[str, Any] = {
        "push without a client certificate": [
            "push",
            str(v1.path),
            *base,
            "--registry",
            str(fleet.registry),
            *no_cert,
        ],
        "push without the CA": ["push", str(v1.path), *base, "--registry", str(fleet.registry), *no_ca],
        "command without a client certificate": ["command", "refresh", *base, *no_cert],
        "rollback without the CA": ["rollback", *base, *no_ca],
    }
    for what, argv in runs.items():
        result = _run(argv, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (what, result.stdout, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("edgectl: error: cannot connect to the broker"), (
            what,
            lines,
        )
        if "CA" in what:
            assert "CERTIFICATE_VERIFY_FAILED" in lines[0], lines
