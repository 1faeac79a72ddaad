"""The systemd files: the unit verifies, its exposure score stays low, the installer installs,
the example config matches AgentConfig, and the runtimes work under MemoryDenyWriteExecute.

`systemd-analyze verify` refuses a unit whose ExecStart program does not exist, and the
unit names /usr/bin/edgeagent (where a distribution package would put it), so the tests
verify the unit as `edgeagent install-service` writes it: ExecStart rewritten to this
venv's edgeagent, the same rewrite an install into a venv gets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.cli.agent import main as agent_main
from edgeagent.cli.service_cmd import default_exec_start, render_unit
from edgeagent.config import AgentConfig, load_config

REPO = Path(__file__).parents[1]
SYSTEMD = REPO / "systemd"
BOARDS = REPO / "tests" / "fixtures" / "boards"
MODELS = REPO / "tests" / "fixtures" / "models"
MAX_EXPOSURE = 2.5

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None, reason="systemd-analyze is not installed (apt-get install systemd; CI installs it)"
)


def installed_unit(folder: Path, dropins: tuple[str, ...] = ()) -> Path:
    """The unit as install-service writes it, plus drop-ins, in ``folder``."""
    unit = folder / "edgeagent.service"
    unit.write_text(render_unit((SYSTEMD / "edgeagent.service").read_text(), default_exec_start()))
    for name in dropins:
        (folder / "edgeagent.service.d").mkdir(exist_ok=True)
        shutil.copy(SYSTEMD / "dropins" / name, folder / "edgeagent.service.d" / name)
    return unit


@needs_analyze
@pytest.mark.parametrize(
    "dropins", [(), ("jetson.conf",), ("coral-usb.conf",)], ids=["base", "jetson", "coral"]
)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, dropins: tuple[str, ...]) -> None:
    assert default_exec_start().is_file(), "the venv's edgeagent script is needed for verify"
    unit = installed_unit(tmp_path, dropins)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys; any message about our files is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
@pytest.mark.parametrize(
    "dropins", [(), ("jetson.conf",), ("coral-usb.conf",)], ids=["base", "jetson", "coral"]
)
def test_exposure_score_is_at_most_2_5(
    tmp_path: Path, dropins: tuple[str, ...], record_property: pytest.RecordProperty
) -> None:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    installed_unit(root / "etc/systemd/system", dropins)
    result = subprocess.run(
        [analyze, "security", "--offline=true", f"--root={root}", "--no-pager", "edgeagent.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for edgeagent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    record_property("exposure", score)
    print(f"systemd-analyze security exposure {dropins or 'base'}: {score}")
    assert score <= MAX_EXPOSURE


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_file_creates_the_user_and_device_groups(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "edgeagent.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc/passwd").read_text()
    groups = dict(line.split(":")[0::3] for line in (tmp_path / "etc/group").read_text().splitlines())
    assert re.search(r"^edgeagent:x:\d+:\d+:.*:/var/lib/edgeagent:/usr/sbin/nologin$", passwd, re.MULTILINE)
    for group in ("video", "plugdev", "apex"):
        assert groups[group] == "edgeagent"


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles needs root to chown in the test root")
def test_installed_root_gets_user_directories_and_config_mode(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    assert install(tmp_path) == 0
    for tool in ("systemd-sysusers", "systemd-tmpfiles --create"):
        conf = "sysusers.d" if "sysusers" in tool else "tmpfiles.d"
        subprocess.run(
            [*tool.split(), f"--root={tmp_path}", str(tmp_path / "etc" / conf / "edgeagent.conf")],
            check=True,
            capture_output=True,
            timeout=60,
        )
    uid = int(re.search(r"^edgeagent:x:(\d+):", (tmp_path / "etc/passwd").read_text(), re.MULTILINE)[1])
    state = (tmp_path / "var/lib/edgeagent").stat()
    assert (state.st_uid, oct(state.st_mode & 0o777)) == (uid, "0o750")
    assert oct((tmp_path / "etc/edgeagent/agent.toml").stat().st_mode & 0o777) == "0o640"
    assert (tmp_path / "etc/edgeagent/keys").is_dir()


# --- edgeagent install-service --------------------------------------------------------------


def install(root: Path, *extra: str) -> int:
    # The default ExecStart is this checkout's venv, which install-service refuses when the
    # checkout lies under /tmp or /home (the unit hides them): name where a board keeps it.
    if "--exec-start" not in extra:
        extra = ("--exec-start", "/opt/edgeagent/bin/edgeagent", *extra)
    with pytest.raises(SystemExit) as info:
        agent_main(["install-service", "--root", str(root), *extra])
    return int(info.value.code or 0)


EXPECTED = [
    "etc/edgeagent/agent.toml",
    "etc/edgeagent/agent.toml.example",
    "etc/systemd/system/edgeagent.service",
    "etc/sysusers.d/edgeagent.conf",
    "etc/tmpfiles.d/edgeagent.conf",
]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_install_service_dry_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--dry-run") == 0
    assert tree(tmp_path) == []
    out = capsys.readouterr().out
    assert f"would install  {tmp_path}/etc/systemd/system/edgeagent.service (ExecStart=" in out
    assert "systemd tools not run" in out


def test_install_service_into_a_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--exec-start", "/opt/edgeagent/bin/edgeagent") == 0
    assert tree(tmp_path) == EXPECTED
    unit = (tmp_path / "etc/systemd/system/edgeagent.service").read_text()
    assert "\nExecStart=/opt/edgeagent/bin/edgeagent run\n" in unit
    assert (tmp_path / "etc/edgeagent/agent.toml").read_bytes() == (
        SYSTEMD / "agent.toml.example"
    ).read_bytes()
    # A second install keeps the operator's configuration.
    (tmp_path / "etc/edgeagent/agent.toml").write_text('device_id = "mine"\n')
    assert install(tmp_path) == 0
    assert (tmp_path / "etc/edgeagent/agent.toml").read_text() == 'device_id = "mine"\n'
    assert "keep     " in capsys.readouterr().out


def test_install_service_adds_the_jetson_drop_in(tmp_path: Path) -> None:
    root = tmp_path / "jetson"
    shutil.copytree(BOARDS / "jetson-orin", root, symlinks=True)
    assert install(root) == 0
    assert (root / "etc/systemd/system/edgeagent.service.d/jetson.conf").is_file()
    assert not (root / "etc/systemd/system/edgeagent.service.d/coral-usb.conf").exists()


def test_install_service_refuses_an_exec_start_hidden_by_protect_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install(tmp_path, "--exec-start", "/home/pi/venv/bin/edgeagent") == 2
    assert "ProtectHome=yes hides" in capsys.readouterr().err
    assert tree(tmp_path) == []


def test_render_unit_replaces_only_the_program() -> None:
    text = render_unit("[Service]\nExecStart=/usr/bin/edgeagent run\n", Path("/opt/x/bin/edgeagent"))
    assert text == "[Service]\nExecStart=/opt/x/bin/edgeagent run\n"


# --- the example configuration --------------------------------------------------------------

_OPTION = re.compile(r"^# (\w+) = (.+)$", re.MULTILINE)


# Options the example shows with an example value rather than the default.
EXAMPLE_VALUES = (
    "device_id",
    "profile",
    "precision",
    "model_precision",
    "broker_url",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "groups",
    "telemetry_root",
    "trust_root",
)


def test_example_config_loads_and_documents_every_option(tmp_path: Path) -> None:
    text = (SYSTEMD / "agent.toml.example").read_text()
    assert load_config(SYSTEMD / "agent.toml.example", environ={}) is not None  # all commented: defaults
    documented = dict(_OPTION.findall(text))
    assert list(documented) == list(AgentConfig.model_fields), "the example must list every option, in order"
    uncommented = tmp_path / "agent.toml"
    uncommented.write_text(_OPTION.sub(r"\1 = \2", text))
    config = load_config(uncommented, environ={})
    defaults = AgentConfig()
    for name in AgentConfig.model_fields:
        if name not in EXAMPLE_VALUES:  # examples, not defaults
            assert getattr(config, name) == getattr(defaults, name), (
                f"{name}: the example shows a wrong default"
            )


# --- MemoryDenyWriteExecute -----------------------------------------------------------------

# systemd's MemoryDenyWriteExecute=yes is this seccomp filter (src/shared/seccomp-util.c,
# seccomp_memory_deny_write_execute): no mmap with PROT_WRITE|PROT_EXEC, no mprotect or
# pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC.
MDWE_SCRIPT = """
import errno, mmap, sys
sys.path.append("/usr/lib/python3/dist-packages")
import seccomp
import numpy as np
W, X = mmap.PROT_WRITE, mmap.PROT_EXEC
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
f.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, 0o100000, 0o100000))
f.load()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | W | X)
    sys.exit("the filter did not block a writable+executable mapping")
except PermissionError:
    pass
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
models = sys.argv[1]
for name in ("mlp.onnx", "cnn.onnx"):
    s = ort.InferenceSession(f"{models}/{name}", providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
for name in ("mlp.tflite", "mlp_int8.tflite", "cnn.tflite", "cnn_int8.tflite"):
    it = Interpreter(model_path=f"{models}/{name}", num_threads=2)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    it.invoke()
print("ok")
"""


def test_runtimes_work_under_memory_deny_write_execute() -> None:
    probe = "import sys; sys.path.append('/usr/lib/python3/dist-packages'); import seccomp, onnxruntime"
    probe += "; import ai_edge_litert.interpreter"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("needs python3-seccomp (apt) for this Python, onnxruntime and ai-edge-litert")
    if not (MODELS / "cnn_int8.tflite").is_file():
        pytest.skip("model fixtures missing (scripts/make_fixtures.py)")
    result = subprocess.run(
        [sys.executable, "-c", MDWE_SCRIPT, str(MODELS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
