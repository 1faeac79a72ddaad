"""The operator's precision override: agent.toml ``precision``/``model_precision`` and
``--precision``, on real bundles and runtimes (mlp.onnx fp32 + mlp_int8.tflite)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devices.detect import detect
from devices.profile import load_profile, resolve_candidates
from edgeagent.agent import Agent
from edgeagent.cli.agent import COMMANDS, DESCRIPTION
from edgeagent.cli.common import build_parser, run
from edgeagent.client import Client
from edgeagent.config import AgentConfig, ConfigError, load_config
from edgeagent.errors import UsageError
from edgeagent.selection import prefer_precisions
from edgeagent.serving.loader import prepare_served_model
from edgeagent.signing import KeyRing, load_public_key
from edgeagent.store import Store
from tests.runtimes_support import extract, golden_arrays, make_bundle, write_golden

X86 = list(load_profile("generic-x86_64").candidates)


def edgeagent(*argv: str | Path) -> int:
    return run(build_parser("edgeagent", DESCRIPTION, COMMANDS), [str(a) for a in argv])


@pytest.fixture(scope="module")
def digits_bundle(tmp_path_factory, keypair, model_dir, digits):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("precision")
    golden = write_golden(root / "golden.npz", golden_arrays(digits, model_dir, images=False))
    created = make_bundle(
        root / "out", keypair, [model_dir / "mlp.onnx", model_dir / "mlp_int8.tflite"], golden
    )
    return created, extract(created, root / "bundle", keypair), root / "bundle"


def test_order_follows_the_list_then_the_profile() -> None:
    ordered = [str(c) for c in prefer_precisions(X86, ["fp32", "int8"])]
    assert ordered == [
        "onnxruntime/CPUExecutionProvider/fp32",
        "litert/xnnpack/fp32",
        "onnxruntime/CPUExecutionProvider/int8",
        "litert/xnnpack/int8",
    ]
    assert prefer_precisions(X86, []) == X86


def test_the_artifact_precision_is_what_matches() -> None:
    assert [str(c) for c in prefer_precisions(X86, ["fp16"])] == ["litert/xnnpack/fp32 (from fp16)"]
    nano = [str(c) for c in prefer_precisions(load_profile("jetson-nano").candidates, ["fp32"])]
    assert nano[0] == "onnxruntime/TensorrtExecutionProvider/fp16 (from fp32)"


def test_an_override_that_leaves_nothing_is_one_line() -> None:
    edgetpu_only = resolve_candidates(load_profile("coral-usb"))
    with pytest.raises(
        UsageError, match=r"^precision override fp32 leaves no candidate of the profile \(they load int8\)$"
    ):
        prefer_precisions(edgetpu_only, ["fp32"])


def test_served_model_follows_the_override(digits_bundle) -> None:  # type: ignore[no-untyped-def]
    _, verified, folder = digits_bundle
    default = prepare_served_model(folder, verified.manifest, X86, profile="generic-x86_64")
    fp32 = prepare_served_model(folder, verified.manifest, X86, profile="generic-x86_64", precisions=["fp32"])
    try:
        assert (default.model.runtime, default.model.precision) == ("litert", "int8")
        assert (fp32.model.runtime, fp32.model.precision) == ("onnxruntime", "fp32")
    finally:
        default.model.close()
        fp32.model.close()
    with pytest.raises(UsageError, match="precision override fp16 leaves"):
        prepare_served_model(
            folder, verified.manifest, X86[:2], profile="generic-x86_64", precisions=["fp16"]
        )


def test_bench_precision_flag(digits_bundle, keypair, capsys) -> None:  # type: ignore[no-untyped-def]
    created, _, _ = digits_bundle
    argv = ["bench", created.path, "--trusted", keypair.public, "--profile", "generic-x86_64", "--in-process"]
    assert edgeagent(*argv, "--precision", "fp32", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["candidate"] for r in rows] == ["onnxruntime/CPUExecutionProvider/fp32", "litert/xnnpack/fp32"]
    for bad in ("fp64", "fp32,fp32", ""):
        with pytest.raises(SystemExit) as exited:
            edgeagent(*argv, "--precision", bad)
        assert exited.value.code == 2


def test_config_per_model_wins_over_device_wide(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('precision = ["fp32", "int8"]\n[model_precision]\ndetector = ["fp16"]\n')
    config = load_config(path, environ={})
    assert config.precision_for("detector") == ["fp16"]
    assert config.precision_for("classifier") == ["fp32", "int8"]
    from_env = load_config(path, environ={"EDGEAGENT_PRECISION": "int8"})
    assert from_env.precision_for("classifier") == ["int8"]
    path.write_text('precision = ["fp32", "fp32"]\n')
    with pytest.raises(ConfigError, match=r"agent.toml: precision: .* names a precision twice"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("settings", "runtime"),
    [
        ({}, "litert"),  # the profile's order: int8 first
        ({"precision": ["fp32"]}, "onnxruntime"),
        ({"precision": ["fp32"], "model_precision": {"digits": ["int8", "fp32"]}}, "litert"),
    ],
)
def test_the_agent_serves_installed_models_with_the_override(  # type: ignore[no-untyped-def]
    tmp_path: Path, digits_bundle, keypair, settings, runtime
) -> None:
    created, _, _ = digits_bundle
    config = AgentConfig(
        state_dir=tmp_path / "state",
        socket_path=tmp_path / "agent.sock",
        profile="generic-x86_64",
        **settings,
    )
    trusted = KeyRing([load_public_key(keypair.public)])
    store = Store(config.state_dir)
    store.install(created.path, created.sha256, trusted)
    store.set_link("digits", "current", created.sha256)
    detection = detect(Path("/"), override=config.profile)
    agent = Agent(config, detection, trusted=trusted).start()
    try:
        with Client(config.socket_path) as client:
            reply = client.predict(np.zeros((1, 64), np.float32), model="digits")
        assert reply.runtime == runtime
    finally:
        agent.close()


# --- the bundle author's preference: manifest serve_precision (edgectl bundle create --precision)


def test_bundle_preference_applies_and_the_device_override_wins(
    tmp_path: Path, keypair, model_dir, digits
) -> None:  # type: ignore[no-untyped-def]
    golden = write_golden(tmp_path / "golden.npz", golden_arrays(digits, model_dir, images=False))
    models = [model_dir / "mlp.onnx", model_dir / "mlp_int8.tflite"]
    created = make_bundle(tmp_path / "out", keypair, models, golden, serve_precision=["fp32"])
    verified = extract(created, tmp_path / "bundle", keypair)
    assert verified.manifest.serve_precision == ["fp32"]
    folder = tmp_path / "bundle"
    author = prepare_served_model(folder, verified.manifest, X86, profile="generic-x86_64")
    device = prepare_served_model(
        folder, verified.manifest, X86, profile="generic-x86_64", precisions=["int8"]
    )
    try:
        assert (author.model.runtime, author.model.precision) == ("onnxruntime", "fp32")
        assert (device.model.runtime, device.model.precision) == ("litert", "int8")
    finally:
        author.model.close()
        device.model.close()


def test_a_bundle_without_preference_keeps_its_manifest_bytes(digits_bundle) -> None:  # type: ignore[no-untyped-def]
    _, verified, folder = digits_bundle
    assert verified.manifest.serve_precision == []
    assert b"serve_precision" not in (folder / "manifest.json").read_bytes()


def test_bundle_create_precision_flag(tmp_path: Path, keypair, model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["bundle", "create", "--name", "digits", "--version", "1.0.0", "--key", keypair.private]
    base += ["--model", model_dir / "mlp.onnx", "--model", model_dir / "mlp_int8.tflite", "-o", tmp_path]
    assert edgeagent(*base, "--precision", "fp16") == 2
    assert "serve_precision lists fp16 but no model artifact has it" in capsys.readouterr().err
    assert edgeagent(*base, "--precision", "fp32,int8") == 0
    bundle = capsys.readouterr().out.splitlines()[0]
    assert edgeagent("bundle", "inspect", bundle) == 0
    assert "serve precision: fp32, int8 (the author's preference)" in capsys.readouterr().out
