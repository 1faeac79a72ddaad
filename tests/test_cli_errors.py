"""Every command's errors: one line, no traceback, and the exit code docs/cli.md gives.

0 = done, 1 = the operation ran and failed (a bundle refused, a broker or agent unreachable),
2 = the input is wrong and nothing was done (a flag, a missing or wrong file, a bad config).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import edgeagent.cli.agent as agent_cli
import fleet.edgectl as edgectl_cli
from edgeagent.cli.common import build_parser, run
from edgeagent.config import DEFAULT_CONFIG_PATH
from tests.conftest import KeyPair, free_port

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"edgectl": edgectl_cli, "edgeagent": agent_cli}
UNREACHABLE = "mqtt://127.0.0.1:1"
CREATE = "bundle create --name d --version 1.0.0 --model {missing} --key {key} -o {tmp}/out"

# One input error per command, each naming what is wrong: (argv, exit code, text in the line).
BAD: dict[str, tuple[str, int, str]] = {
    "edgectl keys generate": ("keys generate --name k --out {file}", 2, "cannot make a folder"),
    "edgectl keys rotate": (
        "keys rotate --root {missing} --set {tmp}/ks.json --add {pub}",
        2,
        "no such key file",
    ),
    "edgectl keys revoke": ("keys revoke --root {key} --set {tmp}/ks.json not-a-key", 2, "is not a key id"),
    "edgectl keys publish": (
        f"keys publish --set {{missing}} --broker {UNREACHABLE}",
        2,
        "cannot read the key set",
    ),
    "edgectl bundle create": (CREATE, 2, "no such model file"),
    "edgectl bundle verify": ("bundle verify {tmp} --trusted {pub}", 2, "Is a directory"),
    "edgectl bundle inspect": ("bundle inspect {tmp}", 2, "Is a directory"),
    "edgectl bundle extract": ("bundle extract {missing} --trusted {pub} --to {tmp}/x", 2, "no such file"),
    "edgectl registry publish": ("registry publish {missing} --to {tmp}", 2, "no such bundle"),
    "edgectl registry serve": (
        f"registry serve --dir {{missing}} --broker {UNREACHABLE}",
        2,
        "no such folder",
    ),
    "edgectl push": (
        f"push {{bundle}} --key {{missing}} --broker {UNREACHABLE} --registry {{tmp}} --device d",
        2,
        "no such key file",
    ),
    "edgectl rollback": (f"rollback --key {{missing}} --broker {UNREACHABLE} --device d", 2, "no such key"),
    "edgectl command": (
        f"command refresh --device d --key {{missing}} --broker {UNREACHABLE}",
        2,
        "no such key",
    ),
    "edgectl fleet collect": (
        f"fleet collect --broker {UNREACHABLE} --db {{missing}}/x.db",
        2,
        "cannot open as a database",
    ),
    "edgectl fleet status": ("fleet status --db {missing}", 2, "no fleet database"),
    "edgectl fleet watch": ("fleet watch --db {missing}", 2, "no fleet database"),
    "edgectl fleet report": ("fleet report --html {tmp}/r.html --db {missing}", 2, "no fleet database"),
    # rollout (issue 20)
    "edgectl rollout create": (
        "rollout create {bundle} --group g --waves 0 --key {key} --registry {tmp} --db {missing}",
        2,
        "neither a device count nor a percentage",
    ),
    "edgectl rollout run": (
        f"rollout run r --broker {UNREACHABLE} --key {{key}} --db {{missing}}",
        2,
        "no fleet database",
    ),
    "edgectl rollout status": ("rollout status --db {missing}", 2, "no fleet database"),
    "edgectl rollout pause": ("rollout pause r --db {missing}", 2, "no fleet database"),
    "edgectl rollout resume": ("rollout resume r --db {missing}", 2, "no fleet database"),
    "edgectl rollout abort": ("rollout abort r --db {missing}", 2, "no fleet database"),
    "edgectl fleet history": ("fleet history --db {missing}", 2, "no fleet database"),
    "edgectl fleet tag": ("fleet tag add d --tag t --db {missing}", 2, "no fleet database"),
    "edgectl fleet inventory": ("fleet inventory --db {missing}", 2, "no fleet database"),
    "edgectl demo": ("demo --workdir {file}", 2, "not a folder"),
    "edgectl convert": (
        "convert {missing} --dataset digits --name m --version 1.0.0 --unsigned -o {tmp}/out",
        2,
        "no such model file",
    ),
    "edgeagent bundle create": (CREATE, 2, "no such model file"),
    "edgeagent bundle verify": ("bundle verify {missing} --trusted {pub}", 2, "no such file"),
    "edgeagent bundle inspect": ("bundle inspect {tmp}", 2, "Is a directory"),
    "edgeagent bundle extract": (
        "bundle extract {bundle} --trusted {missing} --to {tmp}/x",
        2,
        "no such key",
    ),
    "edgeagent detect": ("detect --profile pi4", 2, "unknown device profile"),
    "edgeagent run": ("run --config {missing}", 2, "does not exist"),
    "edgeagent status": ("status --state-dir {missing}", 2, "does not exist"),
    "edgeagent install-service": (
        "install-service --root {tmp} --exec-start /tmp/venv/bin/edgeagent",
        2,
        "PrivateTmp=yes hides /tmp",
    ),
    "edgeagent serve": ("serve {bundle} --trusted {missing}", 2, "no such key"),
    "edgeagent infer": ("infer --socket {tmp}/none.sock --input {missing}", 2, "no such input file"),
    "edgeagent feedback": ("feedback --socket {tmp}/none.sock 3f2a 7", 1, "cannot connect to the agent"),
    "edgeagent bench": ("bench {missing} --trusted {pub}", 2, "no such file"),
}


def leaf_commands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[str]:
    """Every runnable command line prefix of a parser ('edgectl bundle create', ...)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield prefix
        return
    for name, sub in groups[0].choices.items():
        yield from leaf_commands(sub, f"{prefix} {name}")


def parser_for(prog: str) -> argparse.ArgumentParser:
    module = PROGRAMS[prog]
    return build_parser(prog, module.DESCRIPTION, module.COMMANDS)


ALL_COMMANDS = sorted(c for prog in PROGRAMS for c in leaf_commands(parser_for(prog), prog))


def call(prog: str, argv: list[str]) -> int:
    try:
        return run(parser_for(prog), argv)
    except SystemExit as exc:  # argparse: --help and bad flags
        return int(exc.code or 0)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line, got: {err!r}"
    return lines[0]


def test_every_command_has_an_error_case() -> None:
    # A new command needs a line in BAD (and its error in docs/cli.md's table).
    assert sorted(BAD) == ALL_COMMANDS


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    prog, *words = command.split()
    assert call(prog, [*words, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_bad_input_is_one_line_with_the_documented_exit_code(
    command: str, tmp_path: Path, keypair: KeyPair, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, rc, needle = BAD[command]
    (tmp_path / "afile").write_text("x")
    bundle = tmp_path / "d-1.0.0.bundle"
    bundle.write_bytes(b"")  # never opened: each case fails on another argument first
    subst = {
        "{missing}": str(tmp_path / "missing"),
        "{tmp}": str(tmp_path),
        "{file}": str(tmp_path / "afile"),
        "{key}": str(keypair.private),
        "{pub}": str(keypair.public),
        "{bundle}": str(bundle),
    }
    for key, value in subst.items():
        argv = argv.replace(key, value)
    prog = command.split()[0]
    capsys.readouterr()
    assert call(prog, argv.split()) == rc
    assert needle in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_inspect_refuses_a_truncated_bundle(
    tmp_path: Path, keypair: KeyPair, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    create = (
        f"bundle create --name d --version 1.0.0 --model {model_dir / 'mlp.onnx'} --key {keypair.private}"
    )
    assert call("edgectl", [*create.split(), "-o", str(out)]) == 0
    whole = (out / "d-1.0.0.bundle").read_bytes()
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert call("edgectl", ["bundle", "inspect", str(cut)]) == 1
    assert "archive ends inside models/mlp.onnx" in one_line(capsys.readouterr().err)
    assert call("edgectl", ["bundle", "inspect", str(out / "d-1.0.0.bundle")]) == 0


def test_bundle_create_refuses_a_different_bundle_under_the_same_name_version(
    tmp_path: Path, keypair: KeyPair, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bundle", "create", "--name", "d", "--version", "1.0.0", "--key", str(keypair.private)]
    argv += ["-o", str(tmp_path)]
    assert call("edgectl", [*argv, "--model", str(model_dir / "mlp.onnx")]) == 0
    first = (tmp_path / "d-1.0.0.bundle").read_bytes()
    assert call("edgectl", [*argv, "--model", str(model_dir / "mlp.onnx")]) == 0  # same bytes: fine
    capsys.readouterr()
    assert call("edgectl", [*argv, "--model", str(model_dir / "cnn.onnx")]) == 2
    assert "already exists with different content" in one_line(capsys.readouterr().err)
    assert (tmp_path / "d-1.0.0.bundle").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d-1.0.0.bundle"]  # no temp files left


def _fixed_batch_model(path: Path, batch: int) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    weights = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def test_convert_of_a_fixed_batch_model_is_one_line_and_leaves_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fixed_batch_model(tmp_path / "b8.onnx", 8)
    argv = ["convert", str(tmp_path / "b8.onnx"), "--dataset", "digits", "--name", "m", "--version", "1.0.0"]
    assert call("edgectl", [*argv, "--unsigned", "--quiet", "-o", str(tmp_path / "out")]) == 1
    assert "fixed batch of 8" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_convert_never_mixes_two_runs_in_one_folder(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [
        "convert",
        str(model_dir / "mlp.onnx"),
        "--dataset",
        "digits",
        "--name",
        "m",
        "--version",
        "1.0.0",
    ]
    argv += ["--unsigned", "--quiet", "-o", str(out)]
    assert call("edgectl", argv) == 2
    assert "is not empty" in one_line(capsys.readouterr().err)
    assert call("edgectl", [*argv, "--force"]) == 2  # not an earlier conversion: left alone
    assert "holds no earlier conversion" in one_line(capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    (out / "notes.txt").unlink()
    assert call("edgectl", argv) == 0
    stale = out / "artifacts" / "stale-from-another-run.onnx"
    stale.write_bytes(b"old")
    assert call("edgectl", argv) == 2
    capsys.readouterr()
    assert call("edgectl", [*argv, "--force"]) == 0
    assert not stale.exists()
    assert (out / "m-1.0.0.bundle").is_file()


def test_a_recipe_typo_is_named(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "typo.toml"
    recipe.write_text(
        '[data]\ndataset = "digits"\n[[passes]]\ntype = "prune"\nsparsty = 0.7\n'
        '[package]\nname = "m"\nversion = "1.0.0"\n'
    )
    argv = [
        "convert",
        str(model_dir / "mlp.onnx"),
        "--recipe",
        str(recipe),
        "--unsigned",
        "-o",
        str(tmp_path / "o"),
    ]
    assert call("edgectl", argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "passes[0]: unknown key 'sparsty'" in line
    assert "passes[0].sparsity: Field required" in line
    assert "more)" not in line


@pytest.mark.parametrize(
    ("exec_start", "setting"),
    [
        ("/tmp/venv/bin/edgeagent", "PrivateTmp=yes hides /tmp"),
        ("/var/tmp/venv/bin/edgeagent", "PrivateTmp=yes hides /var/tmp"),
        ("/home/pi/venv/bin/edgeagent", "ProtectHome=yes hides /home"),
        ("/root/venv/bin/edgeagent", "ProtectHome=yes hides /root"),
    ],
)
def test_install_service_refuses_an_exec_start_the_unit_hides(
    tmp_path: Path, exec_start: str, setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["install-service", "--root", str(tmp_path), "--exec-start", exec_start]
    assert call("edgeagent", argv) == 2
    assert setting in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_push_to_an_unreachable_broker_copies_nothing_into_the_registry(
    tmp_path: Path, keypair: KeyPair, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create = ["bundle", "create", "--name", "d", "--version", "1.0.0", "--model", str(model_dir / "mlp.onnx")]
    assert call("edgectl", [*create, "--key", str(keypair.private), "-o", str(tmp_path)]) == 0
    registry = tmp_path / "registry"
    registry.mkdir()
    capsys.readouterr()
    broker = f"mqtt://127.0.0.1:{free_port()}"
    argv = ["push", str(tmp_path / "d-1.0.0.bundle"), "--key", str(keypair.private), "--broker", broker]
    assert call("edgectl", [*argv, "--registry", str(registry), "--device", "d1"]) == 1
    assert "cannot connect to the broker" in one_line(capsys.readouterr().err)
    assert list(registry.iterdir()) == []


def test_run_without_a_config_file_says_it_runs_on_defaults(tmp_path: Path) -> None:
    if Path(DEFAULT_CONFIG_PATH).exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    env.update(
        PYTHONPATH=str(ROOT),
        EDGEAGENT_STATE_DIR=str(tmp_path / "state"),
        EDGEAGENT_SOCKET_PATH=str(tmp_path / "agent.sock"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.cli.agent", "run"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert "WARNING" in first
    assert f"no config file at {DEFAULT_CONFIG_PATH}: running with the defaults" in first
    assert "broker none (no deployments or telemetry until broker_url is set)" in first


def test_the_exit_code_table_in_the_docs_matches_the_code() -> None:
    from edgeagent.cli.common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE

    text = (ROOT / "docs" / "cli.md").read_text()
    for code in (0, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED):
        assert f"\n| {code} |" in text
