"""The rollout controller's unit verifies (ExecStart rewritten to this venv's edgectl, as an
install into a venv would), and the command line it runs parses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
analyze = shutil.which("systemd-analyze")


@pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed (apt-get install systemd)")
def test_rollout_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    edgectl = Path(sys.executable).parent / "edgectl"
    assert edgectl.is_file()
    text = (REPO / "systemd" / "edgectl-rollout.service").read_text()
    assert "ExecStart=/usr/bin/edgectl rollout run --all" in text
    unit = tmp_path / "edgectl-rollout.service"
    unit.write_text(text.replace("ExecStart=/usr/bin/edgectl", f"ExecStart={edgectl}"))
    assert analyze is not None
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Only complaints about our own file count (a container lacks some of the host's units).
    assert "edgectl-rollout.service" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rollout", "run", "--broker", "mqtt://127.0.0.1:1", "--key", "k"], "name one rollout, or --all"),
        (["rollout", "status", "nope"], "no fleet database here"),
        (["rollout", "create", "b", "--group", "g", "--waves", "1,0%", "--key", "k", "--registry", "."],
         "'0%' is neither a device count nor a percentage"),
        (["fleet", "tag", "add", "dev-1"], "name devices and at least one --tag"),
    ],
)  # fmt: skip
def test_rollout_cli_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "edgectl"), *argv, "--db", str(tmp_path / "fleet.db")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
