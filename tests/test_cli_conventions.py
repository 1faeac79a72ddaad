"""Operator conventions of both programs: --version, global options anywhere, journald and
JSON log lines, and a --help that imports no heavy library (docs/cli.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent import __version__
from edgeagent.cli.common import build_parser
from edgeagent.cli.logformat import under_journald

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"edgectl": "fleet.edgectl", "edgeagent": "edgeagent.cli.agent"}
# What a --help must not import: each costs tenths of a second (numpy, pydantic, cryptography)
# or more, and the host ones are not even installed on a device.
HEAVY = ("numpy", "pydantic", "cryptography", "paho", "psutil", "onnx", "onnxruntime", "rich", "torch")


def program(prog: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", MODULES[prog], *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("prog", sorted(MODULES))
def test_version(prog: str) -> None:
    done = program(prog, "--version")
    assert (done.returncode, done.stdout) == (0, f"{prog} {__version__}\n")


@pytest.mark.parametrize(
    ("prog", "argv"),
    [
        ("edgectl", ["--help"]),
        ("edgectl", ["bundle", "--help"]),
        ("edgectl", ["convert", "--help"]),
        ("edgectl", ["fleet", "status", "--help"]),
        ("edgeagent", ["--help"]),
        ("edgeagent", ["run", "--help"]),
        ("edgeagent", ["serve", "--help"]),
    ],
)
def test_help_imports_no_heavy_library(prog: str, argv: list[str]) -> None:
    # Counted, not timed: `python -X importtime` lists every module the help imported.
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", MODULES[prog], *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.startswith("usage:")
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert sorted(m for m in imported if m.split(".")[0] in HEAVY) == []


def test_global_options_are_accepted_after_the_sub_command() -> None:
    parser = build_parser("edgeagent", "", ("edgeagent.cli.bundle_cmd",))
    before = parser.parse_args(["-v", "--log-format", "json", "bundle", "inspect", "x"])
    after = parser.parse_args(["bundle", "inspect", "x", "-vv", "--log-format", "json"])
    both = parser.parse_args(["-v", "bundle", "inspect", "-v", "x"])
    assert (before.verbose, before.log_format) == (1, "json")
    assert (after.verbose + after.verbose_after, after.log_format) == (2, "json")
    assert both.verbose + both.verbose_after == 2


def _run_agent(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """The log lines of `edgeagent run` (a config without a broker) up to READY, then SIGTERM."""
    stderr = tmp_path / "stderr"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEAGENT_", "JOURNAL_STREAM"))}
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nsocket_path = "{tmp_path / "agent.sock"}"\n')
    with stderr.open("w") as err:
        journal = {"JOURNAL_STREAM": f"{os.fstat(err.fileno()).st_dev}:{os.fstat(err.fileno()).st_ino}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeagent.cli.agent", *argv, "--config", str(config)],
            env={**base, "PYTHONPATH": str(ROOT), **(journal if env is None else env)},
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 30
            while "ready" not in stderr.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    return stderr.read_text().splitlines()


def test_under_systemd_log_lines_carry_journald_priorities(tmp_path: Path) -> None:
    lines = _run_agent(tmp_path, "run", "-v")  # -v after the sub-command
    assert any(line.startswith("<4>edgeagent.cli.run_cmd: config ") for line in lines), lines
    assert any(line.startswith("<6>edgeagent.service: ready") for line in lines), lines
    assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines


def test_log_format_json(tmp_path: Path) -> None:
    lines = _run_agent(tmp_path, "-v", "run", "--log-format", "json", env={})
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["level"] == "info" and r["message"].startswith("ready") for r in records)


def test_journal_stream_of_another_file_is_not_the_journal(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        assert under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, a)  # type: ignore[arg-type]
        assert not under_journald({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, b)  # type: ignore[arg-type]
        assert not under_journald({}, a)  # type: ignore[arg-type]


def test_amqtt_is_only_in_the_demo_extra() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["host"] if d.startswith("amqtt")]  # host users never need it
    assert [d for d in extras["demo"] if d.startswith("amqtt")]
    assert "demo" in extras["dev"][0]  # the tests run the demo on amqtt too
    assert 'ensure_venv "host,litert,demo"' in (ROOT / "scripts" / "demo.sh").read_text()


def test_help_texts_name_their_own_program_and_no_future_work() -> None:
    device_bundle = program("edgeagent", "bundle", "--help").stdout
    assert "edgeagent bundle verify" in device_bundle and "edgectl" not in device_bundle
    assert "edgectl bundle create" in program("edgectl", "bundle", "--help").stdout
    assert "as they land" not in program("edgectl", "--help").stdout


def test_the_help_time_defaults_agree_with_the_modules_that_use_them() -> None:
    from devices.profile import DEFAULT_PROFILES_DIR
    from edgeagent import defaults

    assert defaults.DEFAULT_PROFILES_DIR == DEFAULT_PROFILES_DIR


def test_the_error_line_follows_the_log_format(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    done = program("edgeagent", "run", "--config", str(missing), "--log-format", "json")
    record = json.loads(done.stderr)
    assert done.returncode == 2
    assert (record["level"], record["logger"]) == ("error", "edgeagent")
    assert record["message"] == f"error: config file {missing} does not exist"
    with (tmp_path / "journal").open("w") as journal:
        st = os.fstat(journal.fileno())
        proc = subprocess.run(
            [sys.executable, "-m", MODULES["edgeagent"], "run", "--config", str(missing)],
            stderr=journal,
            env={**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            check=False,
            timeout=60,
        )
    assert proc.returncode == 2
    assert (
        tmp_path / "journal"
    ).read_text() == f"<3>edgeagent: error: config file {missing} does not exist\n"
