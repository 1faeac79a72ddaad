"""The agent under a (test-played) systemd: sd_notify datagrams, watchdog pings, STATUS, SIGTERM.

The end-to-end tests run ``python -m edgeagent.cli.agent run`` as a real process with
NOTIFY_SOCKET pointing at a datagram socket this test binds, exactly as systemd would.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.detect import detect
from edgeagent import sdnotify
from edgeagent.bundle.manifest import Manifest
from edgeagent.config import AgentConfig, load_config
from edgeagent.service import AgentService, PeriodicTask, ServiceState, read_active_models, status_line

BOARDS = Path(__file__).parent / "fixtures" / "boards"
REPO = Path(__file__).parents[1]


class NotifyListener:
    """The systemd end of NOTIFY_SOCKET: collects datagrams with their arrival times."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout_s: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, value: str | None = None, timeout_s: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fields = self.receive(deadline - time.monotonic())
            if fields is not None and key in fields and (value is None or value in fields[key]):
                return fields
        seen = [m for _, m in self.messages]
        raise AssertionError(f"no {key}={value or '*'} within {timeout_s} s; got {seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    yield notify
    notify.close()


def make_bundle_dir(state_dir: Path, name: str, version: str) -> str:
    """An extracted bundle under bundles/<sha256>/ with a valid manifest; returns the id."""
    model = b"not a real model: the status line reads only the manifest"
    manifest = Manifest.model_validate(
        {
            "schema_version": 1,
            "name": name,
            "version": version,
            "files": [
                {"path": "models/m.onnx", "size": len(model), "sha256": hashlib.sha256(model).hexdigest()}
            ],
            "models": [
                {
                    "path": "models/m.onnx",
                    "format": "onnx",
                    "precision": "fp32",
                    "inputs": [{"name": "x", "shape": [None, 64], "dtype": "float32"}],
                    "outputs": [{"name": "y", "shape": [None, 10], "dtype": "float32"}],
                }
            ],
        }
    )
    data = manifest.to_bytes()
    bundle_id = hashlib.sha256(data + version.encode()).hexdigest()
    folder = state_dir / "bundles" / bundle_id
    (folder / "models").mkdir(parents=True)
    (folder / "models/m.onnx").write_bytes(model)
    (folder / "manifest.json").write_bytes(data)
    return bundle_id


def activate(state_dir: Path, model: str, bundle_id: str) -> None:
    """Point models/<model>/current at the bundle the way the store does (temp link + rename)."""
    folder = state_dir / "models" / model
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".current.tmp"
    tmp.symlink_to(Path("../../bundles") / bundle_id)
    tmp.replace(folder / "current")


def write_config(tmp_path: Path, **extra: str) -> Path:
    settings = {
        "state_dir": f'"{tmp_path / "state"}"',
        "detect_root": f'"{BOARDS / "rpi4"}"',
        "status_interval_s": "0.2",
        "log_level": '"DEBUG"',
        **extra,
    }
    path = tmp_path / "agent.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return path


def start_agent(
    config: Path, notify_socket: str, watchdog_usec: int | None = 200_000
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEAGENT_", "NOTIFY_", "WATCHDOG_"))}
    env["NOTIFY_SOCKET"] = notify_socket
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return subprocess.Popen(
        [sys.executable, "-m", "edgeagent.cli.agent", "run", "--config", str(config)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    return proc.returncode, err


# --- end to end ---------------------------------------------------------------------------------


def test_agent_under_systemd_protocol(tmp_path: Path, listener: NotifyListener) -> None:
    state = tmp_path / "state"
    v1 = make_bundle_dir(state, "digits", "1.2.0")
    v2 = make_bundle_dir(state, "digits", "1.3.0")
    activate(state, "digits", v1)
    (state / "models" / "classifier").mkdir(parents=True)  # a model slot with nothing active yet
    proc = start_agent(write_config(tmp_path), listener.address)
    try:
        ready = listener.wait_for("READY", "1")
        assert ready["STATUS"] == (
            f"profile rpi4 (detected); classifier: no model active; digits: digits 1.2.0 ({v1[:12]})"
        )
        # Periodic WATCHDOG=1 at half of WATCHDOG_USEC (0.1 s).
        for _ in range(4):
            listener.wait_for("WATCHDOG", "1", timeout_s=2)
        pings = [t for t, m in listener.messages if m.get("WATCHDOG") == "1"]
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        assert gaps[len(gaps) // 2] < 0.2, f"median ping gap {gaps} is not below WATCHDOG_USEC"
        # The store switches the model over; the next status refresh names the new bundle.
        activate(state, "digits", v2)
        updated = listener.wait_for("STATUS", "digits 1.3.0", timeout_s=5)
        assert updated["STATUS"].endswith(f"digits: digits 1.3.0 ({v2[:12]})")
        rc, err = stop(proc, signal.SIGTERM)
        listener.wait_for("STOPPING", "1", timeout_s=5)
    finally:
        proc.kill()
    assert rc == 0, err
    assert "Traceback" not in err
    stopping = next(m for _, m in listener.messages if "STOPPING" in m)
    assert stopping["STATUS"] == "stopping (SIGTERM)"


def test_agent_with_no_model_and_sigint(tmp_path: Path) -> None:
    abstract = NotifyListener(f"@edgeagent-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        proc = start_agent(
            write_config(tmp_path, profile='"generic-arm64"'), abstract.address, watchdog_usec=None
        )
        try:
            ready = abstract.wait_for("READY", "1")
            assert ready["STATUS"] == "profile generic-arm64 (override); no model active"
            rc, err = stop(proc, signal.SIGINT)
            abstract.wait_for("STOPPING", "1", timeout_s=5)
        finally:
            proc.kill()
        assert rc == 0, err
        assert not any("WATCHDOG" in m for _, m in abstract.messages)  # watchdog off: no pings
    finally:
        abstract.close()


def test_bad_config_fails_in_one_line_before_ready(tmp_path: Path, listener: NotifyListener) -> None:
    config = write_config(tmp_path, statos_interval_s="1")
    proc = start_agent(config, listener.address)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    known = ", ".join(AgentConfig.model_fields)
    assert err.strip() == f"edgeagent: error: {config}: unknown key 'statos_interval_s' (known: {known})"
    assert listener.receive(0.1) is None


# --- sd_notify ----------------------------------------------------------------------------------


def test_notify_is_a_no_op_outside_systemd() -> None:
    assert sdnotify.notify("READY=1", environ={}) is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_of_lines(tmp_path: Path, abstract: bool) -> None:
    address = f"@edgeagent-unit-{time.monotonic_ns()}" if abstract else str(tmp_path / "n.sock")
    sink = NotifyListener(address)
    try:
        assert sdnotify.notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": address})
        assert sink.receive(1) == {"READY": "1", "STATUS": "up"}
    finally:
        sink.close()


def test_notify_to_a_vanished_socket_logs_and_returns_false(tmp_path: Path) -> None:
    assert sdnotify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_notify_refuses_a_newline_inside_a_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="newline"):
        sdnotify.notify("STATUS=a\nREADY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "x")})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_ping_interval(environ: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_ping_interval_s(0.5, environ) == expected


# --- the loop, in process -----------------------------------------------------------------------


def test_service_runs_tasks_and_stops_on_request(tmp_path: Path, listener: NotifyListener) -> None:
    config = load_config(write_config(tmp_path), environ={})
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "100000"}
    service = AgentService(config, detect(config.detect_root), environ=env)
    runs: list[float] = []

    def work() -> None:
        runs.append(time.monotonic())
        if len(runs) == 3:
            service.stop.request("test done")

    service.add_task(PeriodicTask("work", 0.02, work))
    assert service.run() == 0
    assert service.state is ServiceState.STOPPED
    assert len(runs) == 3
    kinds = [next(iter(m)) for _, m in _drain(listener)]
    assert kinds[0] == "READY" and kinds[-1] == "STOPPING"
    with pytest.raises(RuntimeError, match="cannot run a stopped service"):
        service.run()
    with pytest.raises(RuntimeError, match="cannot add task 'late' to a stopped service"):
        service.add_task(PeriodicTask("late", 1, work))


def test_a_failing_task_ends_the_service_with_stopping(tmp_path: Path, listener: NotifyListener) -> None:
    config = load_config(write_config(tmp_path), environ={})
    service = AgentService(config, detect(config.detect_root), environ={"NOTIFY_SOCKET": listener.address})

    def broken() -> None:
        raise KeyError("bug")

    service.add_task(PeriodicTask("broken", 1, broken))
    with pytest.raises(KeyError):
        service.run()
    assert [m for _, m in _drain(listener)][-1] == {"STOPPING": "1", "STATUS": "stopping (error)"}


def _drain(listener: NotifyListener) -> list[tuple[float, dict[str, str]]]:
    while listener.receive(0.05) is not None:
        pass
    return listener.messages


def test_active_models_and_status_line(tmp_path: Path) -> None:
    assert read_active_models(tmp_path / "nothing") == []
    bundle = make_bundle_dir(tmp_path, "det", "2.0.0-rc.1")
    activate(tmp_path, "detector", bundle)
    (tmp_path / "models" / "broken").mkdir()
    (tmp_path / "models" / "broken" / "current").symlink_to("../../bundles/" + "0" * 64)
    models = read_active_models(tmp_path)
    assert [m.describe() for m in models] == [
        f"broken: unreadable manifest ({'0' * 12})",
        f"detector: det 2.0.0-rc.1 ({bundle[:12]})",
    ]
    detection = detect(BOARDS / "rpi4", override="coral-usb")
    assert status_line(detection, models[1:]) == (
        f"profile coral-usb on rpi4 (override); detector: det 2.0.0-rc.1 ({bundle[:12]})"
    )
