"""`edgeagent bench` when a candidate fails: an error row, never a hang; non-zero when none runs.

The bundle below carries mlp.onnx and cnn.tflite with the MLP's golden set, so the LiteRT
candidate is fed (N, 64) samples for an (1, 8, 8, 1) input and raises InputError in its
worker process. Before the fix that exception could not be unpickled in the parent, the
pool's result thread died, and bench waited for ever: the pytest timeout turns such a
regression into a failure instead of a hung run.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from edgeagent.cli.agent import COMMANDS, DESCRIPTION
from edgeagent.cli.common import build_parser, run
from edgeagent.cli.isolated import Outcome, run_isolated
from tests.runtimes_support import golden_arrays, make_bundle, write_golden

pytestmark = pytest.mark.timeout(120)


def edgeagent(*argv: str | Path) -> int:
    return run(build_parser("edgeagent", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture(scope="module")
def mixed_bundle(tmp_path_factory, keypair, model_dir, digits):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("bench")
    golden = write_golden(root / "golden.npz", golden_arrays(digits, model_dir, images=False))
    models = [model_dir / "mlp.onnx", model_dir / "cnn.tflite"]
    # `bundle create` now checks the golden set against every model; older hosts checked the
    # first only, and such bundles are what a device still meets.
    import edgeagent.bundle.create as create

    first_only = create.check_golden
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(create, "check_golden", lambda path, entries: first_only(path, entries[:1]))
        return make_bundle(root / "out", keypair, models, golden).path


def _rows(capsys) -> dict[str, dict[str, object]]:  # type: ignore[no-untyped-def]
    report = json.loads(capsys.readouterr().out)
    return {r["candidate"]: r for r in report["rows"]}


@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["subprocess", "in-process"])
def test_a_worker_error_is_a_row_not_a_hang(mixed_bundle: Path, keypair, capsys, mode) -> None:  # type: ignore[no-untyped-def]
    trust = ["--trusted", keypair.public]
    assert (
        edgeagent("bench", mixed_bundle, *trust, "--profile", "generic-x86_64", "--json", *mode) == 0
    )  # the ONNX candidate ran
    rows = _rows(capsys)
    assert rows["onnxruntime/CPUExecutionProvider/fp32"]["verdict"] == "pass"
    litert = rows["litert/xnnpack/fp32"]
    verdict = str(litert["verdict"])
    assert verdict.startswith("error: ") and "\n" not in verdict
    assert "shape" in verdict, verdict  # the InputError's own message came back
    assert litert["p50_ms"] is None


def test_timeout_kills_the_candidate(mixed_bundle: Path, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    # No process can spawn, import a runtime and load a model in a millisecond.
    trust = ["--trusted", keypair.public]
    assert edgeagent("bench", mixed_bundle, *trust, "--profile", "rpi4", "--json", "--timeout", "0.001") == 1
    captured = capsys.readouterr()
    rows = {r["candidate"]: r for r in json.loads(captured.out)["rows"]}
    assert all(str(r["verdict"]).startswith("error: timed out after 0.001 s") for r in rows.values())
    assert "no candidate of profile rpi4 ran" in captured.err and captured.err.count("\n") == 1


def test_no_candidate_runs_exits_non_zero(mixed_bundle: Path, keypair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # A board whose only candidate is an Edge TPU, and a bundle without an Edge TPU build.
    profile = tmp_path / "tpu-only.toml"
    profile.write_text(
        'name = "tpu-only"\ndescription = "Edge TPU board"\narchitectures = ["x86_64"]\n'
        'memory_class = "small"\n[[candidates]]\nruntime = "litert"\ndelegate = "edgetpu"\n'
        'precision = "int8"\nartifact_suffix = "_edgetpu.tflite"\n'
    )
    trust = ["--trusted", keypair.public]
    assert edgeagent("bench", mixed_bundle, *trust, "--profile-file", profile) == 1
    captured = capsys.readouterr()
    assert "artifact: " in captured.out
    assert (
        captured.err == "edgeagent: error: no candidate of profile tpu-only ran the bundle (see the table)\n"
    )


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_timeout_is_a_usage_error(mixed_bundle: Path, value: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exited:
        edgeagent("bench", mixed_bundle, "--timeout", value)
    assert exited.value.code == 2
    assert "--timeout" in capsys.readouterr().err


# --- the isolation itself, with jobs that misbehave in ways a runtime can ----------------------


class _Unpicklable(Exception):
    def __init__(self, message: str, *, code: str) -> None:  # the shape that hung bench
        super().__init__(message)
        self.code = code


def _raises_unpicklable() -> None:
    raise _Unpicklable("bad\nshape", code="bad_shape")


def _crashes() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _returns(value: int) -> dict[str, int]:
    return {"value": value}


def test_isolated_outcomes() -> None:
    assert run_isolated(_returns, (3,), timeout_s=60) == Outcome(result={"value": 3})
    raised = run_isolated(_raises_unpicklable, (), timeout_s=60)
    assert raised.error == "_Unpicklable: bad shape"
    crashed = run_isolated(_crashes, (), timeout_s=60)
    assert crashed.error == "worker died without an answer (killed by SIGKILL)"
