"""Structured pruning of Keras Sequential models: fewer Dense units and Conv2D filters.

The Keras side of the ``structured`` pass, so that a pruned model reaches LiteRT through the
``tflite`` pass. A Dense/Conv2D layer is prunable when the next weighted layer (Dense or Conv2D)
follows it through layers that keep channels (activations, dropout, pools, batch norm, Flatten,
global pooling); the model is rebuilt from its config with the new unit/filter counts and the
sliced weights. Keras is channels-last, so after a Flatten of (H, W, C) the feature of channel c
at position p is p * C + c.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from converter import extras
from converter.errors import ModelLoadError

_PASSTHROUGH = frozenset(
    {"Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "MaxPooling2D", "AveragePooling2D",
     "BatchNormalization", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten"}
)  # fmt: skip
_WEIGHTED = frozenset({"Dense", "Conv2D"})

#: keep(kernel, layer name) -> sorted ids of the output channels to keep, or None = keep all.
Chooser = Callable[[npt.NDArray[Any], str], npt.NDArray[np.int64] | None]


def _plan(net: Any) -> tuple[dict[int, int], dict[int, str]]:
    """{producer index: consumer index} for prunable layers, and why the others are not."""
    layers, plan, blocked = net.layers, {}, {}
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind not in _WEIGHTED or (kind == "Conv2D" and layer.groups != 1):
            continue
        for j in range(i + 1, len(layers)):
            follower = type(layers[j]).__name__
            if follower in _WEIGHTED:
                plan[i] = j
                break
            if follower not in _PASSTHROUGH:
                blocked[i] = f"its channels reach {follower} {layers[j].name!r}"
                break
        else:
            blocked[i] = "its channels are the model's output"
    return plan, blocked


def prune_sequential(
    net: Any, choose: Chooser, exclude: list[str]
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """A new Sequential model with fewer channels, per-layer (before, after), and why not others."""
    keras = extras.require("keras")
    if not isinstance(net, keras.Sequential):
        raise ModelLoadError("structured pruning of Keras models takes Sequential models")
    plan, blocked = _plan(net)
    weights = [[np.asarray(w) for w in layer.get_weights()] for layer in net.layers]
    config = net.get_config()
    configs = [c for c in config["layers"] if c["class_name"] != "InputLayer"]
    for layer_config in configs:  # built shapes name the old channel counts; rebuild from the input
        layer_config.pop("build_config", None)
    report: dict[str, Any] = {}
    for i, j in plan.items():
        layer = net.layers[i]
        if any(fnmatch.fnmatchcase(layer.name, p) for p in exclude):
            continue
        kept = choose(weights[i][0], layer.name)
        if kept is None:
            continue
        channels = weights[i][0].shape[-1]
        report[layer.name] = {"channels_before": int(channels), "channels_after": len(kept)}
        weights[i] = [w[..., kept] for w in weights[i]]  # kernel's last axis and the bias
        configs[i]["config"]["units" if "units" in configs[i]["config"] else "filters"] = len(kept)
        features = np.arange(channels)
        for k in range(i + 1, j):
            middle = net.layers[k]
            if type(middle).__name__ == "BatchNormalization":
                weights[k] = [w[kept] for w in weights[k]]
            elif type(middle).__name__ == "Flatten":
                positions = int(np.prod(middle.input.shape[1:-1]))
                features = np.tile(np.arange(channels), positions)
        rows = np.flatnonzero(np.isin(features, kept))
        weights[j] = [np.take(weights[j][0], rows, axis=-2), *weights[j][1:]]
    rebuilt = keras.Sequential.from_config(config)
    for layer, values in zip(rebuilt.layers, weights, strict=True):
        layer.set_weights(values)
    return rebuilt, report, {net.layers[k].name: r for k, r in blocked.items()}
