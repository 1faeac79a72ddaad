"""A PyTorch module through the Python API: exported to ONNX, quantized, packaged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converter.datasets import flat
from tests.lazy_imports import lazy, needs

torch = lazy("torch")
pytestmark = [pytest.mark.torch, needs("torch", "needs the torch extra: pip install 'edgeagent[torch]'")]
ort = pytest.importorskip("onnxruntime", reason="needs the host extra")


def test_torch_module_is_exported_and_converted(tmp_path: Path, keypair: Any, digits: Any) -> None:
    from converter.api import convert_torch
    from converter.recipe import recipe_from_dict

    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x, y = torch.from_numpy(flat(digits.x_train)), torch.from_numpy(digits.y_train)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    recipe = recipe_from_dict(
        {
            "data": {"dataset": "digits"},
            "passes": [{"type": "quantize", "mode": "dynamic"}],
            "package": {"name": "torch-mlp", "version": "0.1.0"},
        }
    )
    result = convert_torch(net, x[:2], recipe, tmp_path / "out", keypair.load(), name="mlp")
    exported = tmp_path / "out" / "mlp.onnx"
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    test_x = flat(digits.x_test)
    with torch.no_grad():
        expected = net(torch.from_numpy(test_x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": test_x})[0], expected, rtol=1e-4, atol=1e-4)
    accuracy = float(np.mean(expected.argmax(1) == digits.y_test))
    assert result.pipeline.baseline.accuracy == pytest.approx(accuracy, abs=1e-9)
    assert accuracy > 0.9
    assert result.packaged is not None
    assert result.packaged.bundle.manifest.models[0].precision == "int8"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"][0]["after"]["size_bytes"] < report["baseline"]["size_bytes"]
