"""`edgeagent serve`, `infer` and `bench` as a user runs them, on a real signed bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeagent.cli.agent import COMMANDS, DESCRIPTION
from edgeagent.cli.common import build_parser, run
from tests.runtimes_support import golden_arrays, make_bundle, wait_for, write_golden


def edgeagent(*argv: str | Path) -> int:
    return run(build_parser("edgeagent", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, keypair, model_dir, digits):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("cli")
    golden = write_golden(root / "golden.npz", golden_arrays(digits, model_dir, images=False))
    return make_bundle(
        root / "out", keypair, [model_dir / "mlp.onnx", model_dir / "mlp_int8.tflite"], golden
    ).path


def test_serve_then_infer(tmp_path: Path, bundle: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "agent.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.cli.agent", "serve", str(bundle), "--trusted", str(keypair.public),
         "--socket", str(sock), "--profile", "generic-x86_64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="the socket")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        sample = tmp_path / "x.npy"
        np.save(sample, np.zeros((1, 64), np.float32))
        assert edgeagent("infer", "--socket", sock, "--input", sample) == 0
        reply = json.loads(capsys.readouterr().out)
        assert reply["model"] == "digits" and reply["version"] == "1.0.0"
        assert (reply["runtime"], reply["delegate"]) == ("litert", "xnnpack")  # int8 goes first on x86-64
        assert np.asarray(reply["outputs"]["StatefulPartitionedCall:0"]).shape == (1, 10)
        as_json = tmp_path / "x.json"
        as_json.write_text(json.dumps({"inputs": [[0.5] * 64]}))
        assert edgeagent("infer", "--socket", sock, "--input", as_json, "--model", "digits") == 0
        assert json.loads(capsys.readouterr().out)["id"] != reply["id"]
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([[1.0, 2.0]]))
        assert edgeagent("infer", "--socket", sock, "--input", bad) == 1
        err = capsys.readouterr().err
        assert "HTTP 422 bad_shape" in err and err.count("\n") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"digits 1.0.0: litert/xnnpack int8" in out and b"acceptance passed" in out
    assert not sock.exists()


def test_infer_user_errors_are_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert edgeagent("infer", "--socket", tmp_path / "none.sock", "--input", tmp_path / "missing.npy") == 2
    assert "no such input file" in capsys.readouterr().err
    sample = tmp_path / "x.npy"
    np.save(sample, np.zeros((1, 64), np.float32))
    assert edgeagent("infer", "--socket", tmp_path / "none.sock", "--input", sample) == 1
    err = capsys.readouterr().err
    assert "cannot connect to the agent" in err and err.count("\n") == 1


def test_bench_prints_one_row_per_candidate(bundle: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = edgeagent("bench", bundle, "--trusted", keypair.public, "--profile", "generic-x86_64", "--json")
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["candidate"]: r for r in report["rows"]}
    assert list(rows) == [
        "onnxruntime/CPUExecutionProvider/int8",
        "litert/xnnpack/int8",
        "onnxruntime/CPUExecutionProvider/fp32",
        "litert/xnnpack/fp32",
        "litert/xnnpack/fp32 (from fp16)",
    ]
    assert rows["onnxruntime/CPUExecutionProvider/int8"]["verdict"].startswith("artifact: ")
    for name in ("litert/xnnpack/int8", "onnxruntime/CPUExecutionProvider/fp32"):
        row = rows[name]
        assert row["verdict"] == "pass"
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["load_ms"] > 0 and row["peak_rss_mib"] > 10


def test_bench_table_in_process(bundle: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = edgeagent("bench", bundle, "--trusted", keypair.public, "--profile", "coral-usb", "--in-process")
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("digits 1.0.0 on profile coral-usb")
    assert lines[1].split()[:5] == ["runtime", "delegate", "precision", "artifact", "load"]
    edgetpu = next(line for line in lines if " edgetpu " in line)
    assert "artifact: " in edgetpu  # no _edgetpu.tflite in this bundle
    assert sum(line.rstrip().endswith("pass") for line in lines) == 2
