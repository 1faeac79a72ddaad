"""The keys and bundle commands as a user runs them: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeagent.cli.common import build_parser, run
from fleet.edgectl import COMMANDS, DESCRIPTION

BIN = Path(sys.executable).parent


def edgectl(*argv: str | Path) -> int:
    return run(build_parser("edgectl", DESCRIPTION, COMMANDS), [str(a) for a in argv])


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def keys(tmp_path: Path, capsys) -> Path:  # type: ignore[no-untyped-def]
    assert edgectl("keys", "generate", "--name", "release", "--out", tmp_path / "keys") == 0
    capsys.readouterr()
    return tmp_path / "keys"


def test_keys_generate_writes_a_private_key_only_we_can_read(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert edgectl("keys", "generate", "--name", "release", "--out", tmp_path) == 0
    out = capsys.readouterr().out
    assert "key id:" in out
    assert stat.S_IMODE((tmp_path / "release.key").stat().st_mode) == 0o600
    assert (tmp_path / "release.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = (tmp_path / "release.key").read_bytes()

    assert edgectl("keys", "generate", "--name", "release", "--out", tmp_path) == 2
    assert "already exists" in _one_line_error(capsys.readouterr().err)
    assert (tmp_path / "release.key").read_bytes() == before


def test_create_verify_inspect_extract(tmp_path: Path, keys: Path, model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    golden = tmp_path / "golden.npz"
    rng = np.random.default_rng(0)
    np.savez(golden, inputs=rng.random((20, 64), dtype=np.float32), labels=rng.integers(0, 10, 20))
    rc = edgectl(
        "bundle",
        "create",
        "--name",
        "digits",
        "--version",
        "1.2.3",
        "--model",
        model_dir / "mlp.onnx",
        "--model",
        model_dir / "mlp_int8.tflite",
        "--golden",
        golden,
        "--min-accuracy",
        "0.9",
        "--latency-budget",
        "rpi4=7.5",
        "--key",
        keys / "release.key",
        "-o",
        tmp_path / "out",
    )
    assert rc == 0
    path_line, sha_line = capsys.readouterr().out.strip().splitlines()
    bundle = Path(path_line)
    assert bundle == tmp_path / "out" / "digits-1.2.3.bundle"
    sha = sha_line.removeprefix("sha256: ")

    assert edgectl("bundle", "verify", bundle, "--trusted", keys / "release.pub") == 0
    assert capsys.readouterr().out.startswith(f"{sha}  {bundle}")
    assert edgectl("bundle", "verify", bundle, "--trusted", keys, "--json") == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == sha

    assert edgectl("bundle", "inspect", bundle) == 0
    text = capsys.readouterr().out
    for expected in (
        "digits 1.2.3",
        "NOT verified",
        "models/mlp.onnx  onnx fp32",
        "models/mlp_int8.tflite  tflite int8",
        "in  input: float32[?x64]",
        "zero_point=",
        "accuracy >= 0.900",
        "p95 <= 7.5 ms on rpi4",
        "golden acceptance/golden.npz (20 samples)",
    ):
        assert expected in text, expected
    assert edgectl("bundle", "inspect", bundle, "--trusted", keys / "release.pub", "--json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["signature"] == {"key_id": body["signature"]["key_id"], "verified": True}
    assert body["manifest"]["models"][0]["inputs"][0]["name"] == "input"

    assert (
        edgectl("bundle", "extract", bundle, "--trusted", keys / "release.pub", "--to", tmp_path / "x") == 0
    )
    assert (tmp_path / "x" / "models" / "mlp.onnx").exists()


CREATE = "bundle create --name d --version 1.0.0 --key {key} -o {out}"


@pytest.mark.parametrize(
    ("command", "rc", "needle"),
    [
        ("bundle verify {bundle} --trusted {other}", 1, "not trusted"),
        ("bundle verify {tampered} --trusted {pub}", 1, "sha256"),
        ("bundle verify {bundle}", 2, "--trusted"),
        ("bundle verify {missing} --trusted {pub}", 2, "no such file"),
        ("bundle verify {bundle} --trusted {missing}", 2, "no such key"),
        ("bundle inspect {garbage}", 1, "not a tar archive"),
        ("bundle create --name d --version 1 --model {model} --key {key} -o {out}", 2, "semantic version"),
        (f"{CREATE} --model {{garbage}}", 2, "unknown model format"),
        (f"{CREATE} --model {{garbage_onnx}}", 1, "not a readable ONNX model"),
        (f"{CREATE} --model {{missing}}", 2, "no such model file"),
        ("bundle create --name d --version 1.0.0 --model {model} --key {pub} -o {out}", 2, "PEM private key"),
        (f"{CREATE} --model {{model}} --min-accuracy 0.9", 2, "--golden"),
        (f"{CREATE} --model {{model}} --min-accuracy 90", 2, "fraction"),
        (f"{CREATE} --model {{model}} --latency-budget rpi4", 2, "PROFILE=MS"),
        (f"{CREATE} --model {{model}} --golden {{garbage}}", 2, "not a readable golden .npz"),
        ("bundle frobnicate", 2, "invalid choice"),
        ("bundle verify --nope", 2, "error"),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, keys: Path, model_dir: Path, capsys, command, rc, needle
) -> None:  # type: ignore[no-untyped-def]
    edgectl("keys", "generate", "--name", "other", "--out", tmp_path / "other")
    edgectl(
        "bundle",
        "create",
        "--name",
        "d",
        "--version",
        "1.0.0",
        "--model",
        model_dir / "mlp.onnx",
        "--key",
        keys / "release.key",
        "-o",
        tmp_path,
    )
    bundle = tmp_path / "d-1.0.0.bundle"
    tampered = tmp_path / "tampered.bundle"
    data = bytearray(bundle.read_bytes())
    data[data.index(b"pytorch") if b"pytorch" in data else -2000] ^= 0x01
    tampered.write_bytes(bytes(data))
    (tmp_path / "garbage.bin").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage" * 10)
    capsys.readouterr()
    subst = {
        "{bundle}": bundle,
        "{tampered}": tampered,
        "{pub}": keys / "release.pub",
        "{key}": keys / "release.key",
        "{other}": tmp_path / "other" / "other.pub",
        "{missing}": tmp_path / "missing",
        "{out}": tmp_path / "o",
        "{garbage}": tmp_path / "garbage.bin",
        "{garbage_onnx}": tmp_path / "garbage.onnx",
        "{model}": model_dir / "mlp.onnx",
    }
    code = 0
    try:
        code = edgectl(*[str(subst.get(a, a)) for a in command.split()])
    except SystemExit as exc:  # argparse exits on its own for bad flags
        code = int(exc.code or 0)
    assert code == rc
    assert needle in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_console_scripts_run_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for prog in ("edgectl", "edgeagent"):
        help_run = subprocess.run(
            [BIN / prog, "--help"], capture_output=True, text=True, env=env, check=False
        )
        assert help_run.returncode == 0 and "usage:" in help_run.stdout
    bad = subprocess.run(
        [BIN / "edgeagent", "bundle", "verify", tmp_path / "nope.bundle", "--trusted", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"edgeagent: error: {tmp_path / 'nope.bundle'}: no such file"
