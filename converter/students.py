"""Student architectures for ``distill``, named on the command line or given as a factory.

* ``mlp:H1,H2,...``: Flatten -> Linear(H1) -> ReLU -> ... -> Linear(classes), e.g. ``mlp:64``;
* ``cnn:small``: for (H, W, C) channel-last images: Conv 3x3x8 -> ReLU -> MaxPool 2 ->
  Conv 3x3x16 -> ReLU -> MaxPool 2 -> Flatten -> Linear(classes);
* ``package.module:factory``: ``factory(sample_shape, classes)`` returns a torch module taking
  a batch shaped ``(N, *sample_shape)`` and returning ``(N, classes)`` logits.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from converter import extras

_MLP = re.compile(r"^mlp:(\d+(?:,\d+)*)$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
NAMED = ("mlp:H1[,H2...]", "cnn:small", "module:factory")


def check_spec(spec: str) -> str:
    """``spec`` if it names a student architecture; ValueError naming the forms otherwise."""
    if _MLP.match(spec) or spec == "cnn:small" or (_FACTORY.match(spec) and not spec.startswith("mlp:")):
        return spec
    raise ValueError(f"unknown student {spec!r}; expected one of {', '.join(NAMED)}")


def build_student(spec: str, sample_shape: tuple[int, ...], classes: int) -> Any:
    """A fresh, randomly initialised student (seed torch first for repeatable weights)."""
    torch = extras.torch()
    nn = torch.nn
    if match := _MLP.match(spec):
        sizes = [int(s) for s in match.group(1).split(",")]
        layers: list[Any] = [nn.Flatten()]
        width = 1
        for d in sample_shape:
            width *= d
        for size in sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, classes))
        return nn.Sequential(*layers)
    if spec == "cnn:small":
        if len(sample_shape) != 3:
            raise ValueError(f"cnn:small takes (H, W, C) images, not samples shaped {list(sample_shape)}")
        height, width_, channels = sample_shape

        class ChannelsFirst(nn.Module):  # type: ignore[misc, name-defined]
            def forward(self, x: Any) -> Any:
                return x.permute(0, 3, 1, 2)

        return nn.Sequential(
            ChannelsFirst(),
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 4) * (width_ // 4), classes),
        )
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(sample_shape, classes)
