"""Structured pruning on the real-model suite's CNNs (issue 22), when they are cached.

Only latency, size and what pruning without fine-tuning does to accuracy: fine-tuning these
models needs their training data (and graphs the ONNX-to-torch importer does not cover: HardSwish,
Slice), so the accuracy column shows the damage a fine-tuning run would have to repair. Models
whose weights are Constant nodes (the PaddleOCR exports) have nothing structured pruning can cut
and get a row saying so. Skipped, with one line, when the cache is empty
(``scripts/fetch_real_models.py``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from converter.data import Dataset
from converter.errors import PassFailed
from converter.evaluate import EvaluateConfig, Evaluator
from converter.model import ModelArtifact
from converter.passes.structured import StructuredConfig, StructuredPass

ROOT = Path(__file__).resolve().parent.parent
CNNS = ("doc-orientation", "ppocr-cls")
FRACTIONS = (0.25, 0.5)


def real_rows(runs: int, rounds: int, samples: int = 24) -> list[tuple[str, str, str]] | None:
    """(model, variant, markdown cells) rows, or None when no real CNN is cached."""
    sys.path.insert(0, str(ROOT))
    from compression import interleaved_p50

    from tests.real_models_support import CATALOGUE, missing_reason, sample_set

    models = [m for m in CATALOGUE if m.key in CNNS and missing_reason(m) is None]
    if not models:
        print("real-model CNNs not cached: skipped (python scripts/fetch_real_models.py)", file=sys.stderr)
        return None
    out = []
    for model in models:
        samples_set = sample_set(model, samples)
        data = Dataset(
            inputs={model.inputs[0].name: samples_set.x}, y=samples_set.labels, calib=None, source="real"
        )
        evaluator = Evaluator(data, EvaluateConfig(latency_runs=3, latency_warmup=1))
        source = ModelArtifact(model.path(), "onnx")
        base = evaluator.evaluate(source).metrics
        with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
            variants: list[tuple[str, ModelArtifact, Any]] = [("fp32", source, base)]
            refused = None
            for fraction in FRACTIONS:
                folder = Path(tmp) / f"{fraction}"
                folder.mkdir()
                config = StructuredConfig(fraction=fraction, multiple_of=8)
                try:
                    pruned = StructuredPass(config).run(source, folder).model
                except PassFailed as exc:
                    refused = (model.key, "structured", f"does not apply: {exc} |||||")
                    break
                variants.append(
                    (f"structured {fraction:.0%}, no ft", pruned, evaluator.evaluate(pruned).metrics)
                )
            p50 = interleaved_p50([v[1] for v in variants], data, max(5, runs // 20), rounds)
        for (label, _, m), t in zip(variants, p50, strict=True):
            acc = "-" if m.accuracy is None else f"{m.accuracy * 100:.1f}%"
            agree = "-" if m.top1_agreement is None else f"{m.top1_agreement * 100:.1f}%"
            out.append(
                (model.key, label, f"{acc} | {agree} | {m.size_bytes:,} | {m.transfer_bytes:,} | {t:.2f} "
                 f"| {p50[0] / t:.2f} |")
            )  # fmt: skip
        out += [refused] if refused else []
    return out


def real_table(rows: list[tuple[str, str, str]] | None) -> str:
    if rows is None:
        return "(real-model CNNs not cached: `python scripts/fetch_real_models.py` adds these rows)"
    lines = [
        "| model | variant | top-1 | agreement with fp32 | bytes | xz bytes | ORT p50 ms | ORT speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {model} | {variant} | {cells}" for model, variant, cells in rows]
    return "\n".join(lines)
