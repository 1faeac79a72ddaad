"""Every Python snippet in docs/*.md runs.

A snippet runs in a fresh interpreter, in a folder holding the files the docs' examples name
(``mlp.onnx``, ``teacher.onnx``, ``keys/release.key``); a snippet that names the broker
``mqtt://localhost:1883`` gets the tests' own Mosquitto instead. A snippet that cannot run here
(it needs a device or a running agent) carries ``<!-- docs-test: skip (reason) -->`` on the line
before its fence.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Broker, KeyPair

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\n$")
BROKER = "mqtt://localhost:1883"


def _snippets() -> list[object]:
    params: list[object] = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            marks: list[pytest.MarkDecorator] = []
            skip = SKIP.search(text, 0, match.start())
            if skip and skip.end() == match.start():
                marks.append(pytest.mark.skip(reason=skip.group(1)))
            if re.search(r"^import torch|^from converter", match.group(1), re.MULTILINE):
                marks.append(pytest.mark.slow)
            params.append(pytest.param(match.group(1), id=f"{page.name}:{line}", marks=marks))
    return params


def test_the_docs_have_python_snippets() -> None:
    # Guards the regex: a change of fence style must not turn this file into zero tests.
    assert len(_snippets()) >= 4


@pytest.mark.parametrize("code", _snippets())
def test_docs_snippet_runs(
    code: str, tmp_path: Path, keypair: KeyPair, model_dir: Path, request: pytest.FixtureRequest
) -> None:
    if "torch" in code and importlib.util.find_spec("torch") is None:
        pytest.skip("needs the torch extra")
    if BROKER in code:
        broker: Broker = request.getfixturevalue("mosquitto")
        code = code.replace(BROKER, broker.url)
    (tmp_path / "keys").mkdir()
    shutil.copy(keypair.private, tmp_path / "keys" / "release.key")
    shutil.copy(model_dir / "mlp.onnx", tmp_path / "mlp.onnx")
    shutil.copy(model_dir / "mlp.onnx", tmp_path / "teacher.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_profile_names_in_the_docs_exist() -> None:
    # docs/telemetry.md once showed "raspberrypi5"; the profile is rpi5.
    from devices.profile import list_profiles

    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    text = "\n".join(page.read_text() for page in pages)
    named = set(re.findall(r'"profile": "([\w-]+)"|profile = "([\w-]+)"|--profile ([a-z][\w-]*)', text))
    own = set(re.findall(r"([\w-]+)\.toml", text))  # an operator's own profile the docs show (myboard)
    names = {n for group in named for n in group if n} - (own - set(list_profiles()))
    assert names and names <= set(list_profiles()), names - set(list_profiles())
