"""Process hygiene of the agent: one agent per state folder, stop on SIGTERM, `edgeagent status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent.deploy import Journal, JournalFile, State
from edgeagent.errors import UsageError
from edgeagent.protocol import BundleRef
from edgeagent.statelock import state_lock

BIN = Path(sys.executable).parent
REF = BundleRef(name="digits", version="1.1.0", sha256="b" * 64, size=1000)


def test_a_second_holder_of_the_state_folder_is_refused(tmp_path: Path) -> None:
    with (
        state_lock(tmp_path),
        pytest.raises(UsageError, match=f"another edgeagent \\(pid {os.getpid()}\\) runs on"),
        state_lock(tmp_path),
    ):
        pass
    with state_lock(tmp_path):  # released with the first holder
        pass


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nsocket_path = "{tmp_path / "agent.sock"}"\n'
        'profile = "generic-x86_64"\ntelemetry_interval_s = 0\n'
    )
    return config


@pytest.mark.slow
def test_second_run_on_one_state_folder_exits_with_one_line_and_sigterm_stops_fast(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = subprocess.Popen(
        [str(BIN / "edgeagent"), "run", "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "agent.sock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first agent did not start"
            time.sleep(0.1)
        second = subprocess.run(
            [str(BIN / "edgeagent"), "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and f"another edgeagent (pid {first.pid}) runs on" in errors[0]
        assert "Traceback" not in second.stderr
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
        assert time.monotonic() - started < 5, "stopped within 5 s of SIGTERM"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_status_prints_the_journal_and_the_last_outcome(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "journal").mkdir(parents=True)
    journal = Journal("default", State.IDLE, REF, attempts=2, code="insufficient_space", reason="no room")
    JournalFile(state / "journal", "default").save(journal)
    out = subprocess.run(
        [str(BIN / "edgeagent"), "status", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    body = json.loads(out)["models"]["default"]
    assert body["active"] is None and body["journal"]["attempts"] == 2
    assert body["last_outcome"]["code"] == "insufficient_space" and body["last_outcome"]["ok"] is False
    text = subprocess.run(
        [str(BIN / "edgeagent"), "status", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "journal   idle (target 1.1.0, attempts 2)" in text and "FAILED insufficient_space 1.1.0" in text
    assert not (state / "downloads").exists(), "status creates nothing"


def test_deployment_steps_show_in_systemd_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    from types import SimpleNamespace

    from edgeagent.deploy import DeviceStore
    from edgeagent.protocol import Topics
    from edgeagent.reporting import Reporter
    from edgeagent.signing import KeyRing
    from edgeagent.store import Store

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    store = DeviceStore(Store(tmp_path / "state"), KeyRing(), allow_unsigned=False, keep_bundles=3)
    detection = SimpleNamespace(profile="generic-x86_64", host_profile=None, source="override")
    reporter = Reporter(
        "pi-1",
        Topics(),
        store,
        server=None,  # type: ignore[arg-type]  # not reached without a session
        detection=detection,  # type: ignore[arg-type]
        groups=[],
        states={},
        desired_seqs=dict,
    )
    try:
        reporter.state("default", REF, "downloading")
        assert sock.recv(4096) == b"STATUS=deploying default digits 1.1.0: downloading"
        reporter.state("default", REF, "idle")
        assert sock.recv(4096) == b"STATUS=profile generic-x86_64 (override); no model active"
    finally:
        sock.close()
