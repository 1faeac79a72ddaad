"""Streaming models in the converter: golden sequences with the state carried, step by step.

A model packaged with ``state`` pairs (``PackageConfig.state``, ``edgectl convert --state
OUT=IN``) is judged on a device as a stream: its golden set is one sequence, the first N rows
of the evaluation data in order, without the state inputs (the device feeds them), and the
reference outputs are the source model's with its own state carried from zeros — what the
device's acceptance replays. The evaluation and calibration data still hold the state inputs
(recorded states) like any other input: each pass is measured sample by sample on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from converter.errors import DataError
from converter.feeds import Feeds, rows
from converter.runners import Runner


def replay(
    runner: Runner, feeds: Mapping[str, npt.NDArray[Any]], pairs: Mapping[str, str]
) -> list[npt.NDArray[Any]]:
    """Every output of ``runner`` over the rows of ``feeds`` as one stream, state from zeros.

    ``pairs`` maps a state output to the input it feeds; the rows' own values of those
    inputs are ignored. DataError when a pair names a tensor the model lacks.
    """
    outputs = list(runner.output_names)
    specs = {s.name: s for s in runner.inputs}
    missing = [o for o in pairs if o not in outputs] + [i for i in pairs.values() if i not in specs]
    if missing:
        raise DataError(
            f"--state names {missing[0]!r}, which the model lacks (inputs {sorted(specs)}, outputs {outputs})"
        )
    carry = {inp: outputs.index(out) for out, inp in pairs.items()}
    # A state fed whole (Silero's (2, batch, 128): no batch dimension) is one row per step:
    # its rows are (1, *declared), and its outputs are stacked, one row per step.
    whole = {inp for inp in carry if specs[inp].whole}
    stacked = {j for inp, j in carry.items() if inp in whole}
    state: Feeds = {
        inp: np.zeros([1, *(1 if d is None else d for d in specs[inp].shape)], specs[inp].dtype)
        for inp in carry
    }
    steps = []
    for i in range(rows(feeds)):
        step: Feeds = {k: v[i : i + 1] for k, v in feeds.items()}
        step.update(state)
        result = runner.run(step)
        state = {
            inp: np.asarray(result[j])[None] if inp in whole else np.asarray(result[j])
            for inp, j in carry.items()
        }
        steps.append(result)
    return [
        np.stack(parts) if j in stacked else np.concatenate(parts)
        for j, parts in enumerate(zip(*steps, strict=True))
    ]


def golden_inputs(feeds: Feeds, pairs: Mapping[str, str]) -> Feeds:
    """The golden inputs of a stream: every input but the state inputs."""
    carried = set(pairs.values())
    return {k: v for k, v in feeds.items() if k not in carried}
