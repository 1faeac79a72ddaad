"""The device install from a clone: scripts/device-wheelhouse on the host, install.sh on the board.

Here the "board" is this x86-64 machine with a fresh venv: the wheelhouse is built for it
(x86_64, this Python, ONNX Runtime), install.sh installs from the folder with no index, and
the installed agent must run and must not carry the host-only frameworks. The aarch64 build of
the same script is exercised under emulation by scripts/arm64-smoke (tests/test_arm64.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device-wheelhouse"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = pytest.mark.slow


def wheelhouse(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True, check=False
    )


@pytest.mark.timeout(600)
def test_wheelhouse_installs_the_agent_without_network_or_host_frameworks(tmp_path: Path) -> None:
    out = tmp_path / "wheelhouse"
    built = wheelhouse("--arch", "x86_64", "--python", PY, "--runtime", "onnx", "-o", out)
    if built.returncode != 0 and "could not download" in built.stderr and os.environ.get("CI") != "true":
        pytest.skip(f"no package index here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    names = sorted(p.name for p in out.glob("*.whl"))
    assert any(n.startswith("edgeagent-") for n in names) and any(n.startswith("onnxruntime-") for n in names)
    assert not [n for n in names if n.startswith(("tensorflow", "torch", "onnx-", "scikit_learn"))]

    venv = tmp_path / "opt-edgeagent"
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    env.pop("PYTHONPATH", None)  # the board has no clone
    installed = subprocess.run(
        [str(out / "install.sh"), str(venv)], capture_output=True, text=True, env=env, check=False
    )
    assert installed.returncode == 0, installed.stderr
    assert f"installed: {venv}/bin/edgeagent" in installed.stdout
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.util as u, edgeagent, onnxruntime; print(edgeagent.__file__); "
         "print([m for m in ('tensorflow', 'torch', 'onnx', 'sklearn') if u.find_spec(m)])"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    where, heavy = probe.stdout.splitlines()
    assert where.startswith(str(venv)) and heavy == "[]"
    agent = str(venv / "bin" / "edgeagent")
    detect = subprocess.run([agent, "detect", "--json"], capture_output=True, text=True, env=env, check=False)
    assert detect.returncode == 0, detect.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "armv7l"], "--arch must be aarch64 or x86_64"),
        (["--python", "3.9"], "--python must be like 3.11"),
        (["--runtime", "tensorflow"], "--runtime must be litert, onnx"),
        (["--colour"], "unknown argument --colour"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    result = wheelhouse(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_install_sh_refuses_another_python(tmp_path: Path) -> None:
    """A wheelhouse made for one CPython must not be installed with another (pip would say
    'no matching distribution' about some dependency; the script says why)."""
    out = tmp_path / "wh"
    out.mkdir()
    built = wheelhouse("--arch", "x86_64", "--python", "3.13", "--runtime", "none", "-o", out)
    if built.returncode != 0:
        pytest.skip(f"no package index here: {built.stderr.strip().splitlines()[-1]}")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run([str(out / "install.sh"), str(tmp_path / "v")], capture_output=True, text=True,
                            env=env, check=False)  # fmt: skip
    assert result.returncode == 2
    assert f"these wheels are for Python 3.13, {sys.executable} is {PY}" in result.stderr
    assert not (tmp_path / "v").exists()
