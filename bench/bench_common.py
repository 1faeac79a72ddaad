"""What the compression benchmarks share: digits models, training, the machine line, RESULTS.md."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from converter import extras

RESULTS = Path(__file__).parent / "RESULTS.md"


def build(kind: str) -> Any:
    """A fresh digits classifier: 'mlp' (64-300-100-10, LeNet-300-100's shape), 'teacher'
    (64-512-256-10 MLP), 'cnn' (Conv 16 -> pool -> Conv 32 -> pool -> Dense, NCHW input) or
    'cnn-teacher' (NHWC input; Conv 32 -> Conv 64 -> pool -> Dense 128 -> Dense 10: 151k parameters)."""
    torch = extras.torch()
    nn = torch.nn
    if kind == "teacher":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )
    if kind == "cnn-teacher":

        class ChannelsFirst(nn.Module):  # type: ignore[misc, name-defined]
            def forward(self, x: Any) -> Any:
                return x.permute(0, 3, 1, 2)

        return nn.Sequential(
            ChannelsFirst(),
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def train(kind: str, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float = 2e-3) -> Any:
    """``build(kind)`` trained with Adam (batch 64) on ``x``, ``y`` for ``epochs`` epochs, seeded."""
    torch = extras.torch()
    torch.manual_seed(seed)
    net = build(kind)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return net.eval()


def machine() -> str:
    """CPU model, OS, architecture and Python version of this host, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def now() -> str:
    return subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()


def write_results(text: str, heading: str) -> None:
    """Replace the section ``heading`` of RESULTS.md, or append it; one write."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if heading in current:
        start = current.index(heading)
        end = current.find("\n## ", start + len(heading))
        current = current[:start] + text.rstrip() + "\n" + (current[end:] if end != -1 else "")
    else:
        current = current.rstrip() + "\n\n" + text
    RESULTS.write_text(current)
