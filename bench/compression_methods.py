"""Compression that pays on the device (issue 22): structured pruning, clustering, mixed precision.

Part of ``bench/compression.py``'s run. Each variant is a chain of the converter's own passes
(fine-tuning = the ``finetune`` pass on the digits training split), measured with the converter's
evaluator (top-1 on the 360-sample test split, size, xz size) and timed with ONNX Runtime and, for
a Keras twin of the same weights converted by the ``tflite`` pass, with LiteRT (XNNPACK), all
variants of a model round-robin. Models: the digits MLP (64-300-100-10), the small digits CNN
(Conv 16 -> Conv 32 -> Dense 10, ~6k weights) and a larger one (``cnn-large``: Conv 32 -> Conv 64
-> Dense 128 -> Dense 10, 151k weights).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter import extras
from converter.api import export_torch
from converter.data import Dataset
from converter.datasets import flat, load_digits_splits
from converter.evaluate import EvaluateConfig, Evaluator, Metrics
from converter.model import ModelArtifact
from converter.passes import Pass, PassContext
from converter.passes.cluster import ClusterConfig, ClusterPass
from converter.passes.finetune import FinetuneConfig, FinetunePass
from converter.passes.mixed import MixedConfig, MixedPass
from converter.passes.prune import PruneConfig, PrunePass
from converter.passes.quantize import QuantizeConfig, QuantizePass
from converter.passes.structured import StructuredConfig, StructuredPass
from converter.passes.tflite import TfliteConfig, TflitePass

SECTION = "## Compression that pays on the device (issue 22)"
MODELS = {"mlp": "mlp", "cnn": "cnn", "cnn-large": "cnn-teacher"}  # label -> bench_common.build kind
#: Variants: label -> chain of step keys (see ``_step``). "int8" at the end also makes LiteRT int8.
VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "int8 (static, per-tensor)": ("int8",),
    "mixed precision (max drop 0.5 pt)": ("mixed",),
    "structured 50%": ("s50",),
    "structured 50% + ft": ("s50", "ft"),
    "structured 75% + ft": ("s75", "ft"),
    "structured 50% + ft + int8": ("s50", "ft", "int8"),
    "cluster 16": ("c16",),
    "cluster 16 + ft": ("c16", "ft"),
    "cluster 256": ("c256",),
    "prune 90% + ft": ("p90", "ft"),
    "prune 90% + ft + int8": ("p90", "ft", "int8"),
    "prune 90% + ft + cluster 16 + ft": ("p90", "ft", "c16", "ft"),
    "structured 50% + ft + prune 85% + ft + cluster 16 (+1-D) + ft": (
        *("s50", "ft", "p85", "ft", "c16b", "ft"),
    ),
}


def _step(key: str, epochs: int) -> tuple[type[Pass[Any]], Any]:
    static = QuantizeConfig(mode="static", quantize_bias=False)
    steps: dict[str, tuple[type[Pass[Any]], Any]] = {
        "s50": (StructuredPass, StructuredConfig(fraction=0.5)),
        "s75": (StructuredPass, StructuredConfig(fraction=0.75)),
        "ft": (FinetunePass, FinetuneConfig(epochs=epochs, patience=6)),
        "p90": (PrunePass, PruneConfig(sparsity=0.9)),
        "c16": (ClusterPass, ClusterConfig(clusters=16)),
        "p85": (PrunePass, PruneConfig(sparsity=0.85)),
        "c16b": (ClusterPass, ClusterConfig(clusters=16, include_1d=True, min_elements=64)),
        "c256": (ClusterPass, ClusterConfig(clusters=256)),
        "int8": (QuantizePass, static),
        "mixed": (MixedPass, MixedConfig(max_drop=0.005, quantize_bias=False)),
    }
    return steps[key]


@dataclass
class Row:
    label: str
    onnx: ModelArtifact
    metrics: Metrics
    tflite: ModelArtifact | None = None  # LiteRT twin (fp32, or int8 after an int8 step)
    tflite_accuracy: float | None = None
    ort_p50: float = 0.0
    litert_p50: float | None = None
    sparse_tflite: ModelArtifact | None = None  # the same weights in TFLite's sparse format
    sparse_p50: float | None = None
    tflite_bytes: int | None = None
    sparse_bytes: int | None = None
    arm_ort_p50: float | None = None  # under the arm64 emulation (Cortex-A72)
    arm_litert_p50: float | None = None


def _data(kind: str) -> tuple[Dataset, Any]:
    splits = load_digits_splits(seed=0)

    def shape(x: Any) -> Any:
        return flat(x) if kind == "mlp" else x.transpose(0, 3, 1, 2).copy() if kind == "cnn" else x

    data = Dataset(
        inputs={"x": splits.x_test},
        y=splits.y_test,
        calib={"x": splits.x_calib},
        train_x=shape(splits.x_train),
        train_y=splits.y_train,
        source="digits",
    )
    return data, shape(splits.x_train)


def build_variants(kind: str, epochs: int, ft_epochs: int, work: Path, train: Any) -> list[Row]:
    """Train ``kind``, run every variant's chain (sharing common prefixes) and evaluate each."""
    data, x_train = _data(kind)
    net = train(MODELS[kind], x_train, data.train_y, epochs, seed=0)
    source = export_torch(net, extras.torch().from_numpy(x_train[:2]), work / f"{kind}.onnx")
    evaluator = Evaluator(data, EvaluateConfig(latency_runs=5, latency_warmup=0))
    baseline = evaluator.evaluate(source).metrics
    ctx = PassContext(data=data, evaluator=evaluator, baseline=baseline)
    done: dict[tuple[str, ...], ModelArtifact] = {(): source}
    rows = []
    for label, chain in VARIANTS.items():
        for i in range(1, len(chain) + 1):
            if chain[:i] not in done:
                cls, config = _step(chain[i - 1], ft_epochs)
                folder = work / "-".join(chain[:i])
                folder.mkdir(exist_ok=True)
                done[chain[:i]] = cls(config, ctx).run(done[chain[: i - 1]], folder).model
        model = done[chain]
        rows.append(Row(label, model, evaluator.evaluate(model).metrics))
        float_model = done[chain[:-1]] if chain and chain[-1] in ("int8", "mixed") else model
        if chain[-1:] != ("mixed",):
            _litert(rows[-1], float_model, "int8" if chain[-1:] == ("int8",) else "fp32", ctx, work, data)
        if label in ("fp32", "prune 90% + ft"):
            rows[-1].sparse_tflite = _tflite(float_model, TfliteConfig(mode="fp32", sparse=True), ctx, work)
    return rows


def _tflite(model: ModelArtifact, config: TfliteConfig, ctx: PassContext, work: Path) -> ModelArtifact:
    from keras_twin import keras_twin

    folder = Path(tempfile.mkdtemp(dir=work, prefix="twin-"))
    twin = ModelArtifact(keras_twin(model.path, folder / f"{model.stem}.keras"), "keras")
    return TflitePass(config, ctx).run(twin, folder).model


def _litert(row: Row, model: ModelArtifact, mode: str, ctx: PassContext, work: Path, data: Dataset) -> None:
    """The LiteRT artifact of ``model`` (fp32 or full int8 with float I/O) and its top-1."""
    import numpy as np

    from converter.runners import open_runner

    config = TfliteConfig(mode="int8", int8_io=False) if mode == "int8" else TfliteConfig(mode="fp32")
    row.tflite = _tflite(model, config, ctx, work)
    runner = open_runner(row.tflite)
    x = np.asarray(data.inputs["x"], np.float32)
    predicted = runner.predict(x.reshape(len(x), *[int(d or 1) for d in runner.sample_shape]))
    row.tflite_accuracy = float(np.mean(predicted.reshape(len(x), -1).argmax(1) == np.asarray(data.y)))


def measure_methods(
    kinds: list[str], epochs: int, ft_epochs: int, runs: int, rounds: int, arm64: bool = False
) -> dict[str, list[Row]]:
    """Every variant of every model in ``kinds``, timed on ORT and LiteRT (round-robin per runtime)."""
    from bench_common import train
    from compression import interleaved_p50

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        for kind in kinds:
            work = Path(tmp) / kind
            work.mkdir()
            rows = build_variants(kind, epochs, ft_epochs, work, train)
            data, _ = _data(kind)
            for row, p50 in zip(
                rows, interleaved_p50([r.onnx for r in rows], data, runs, rounds), strict=True
            ):
                row.ort_p50 = p50
            lite = [r for r in rows if r.tflite is not None]
            tflites = [r.tflite for r in lite if r.tflite is not None]
            for row, p50 in zip(lite, interleaved_p50(tflites, data, runs, rounds), strict=True):
                row.litert_p50 = p50
            sparse = [r for r in rows if r.sparse_tflite is not None]
            models = [r.sparse_tflite for r in sparse if r.sparse_tflite is not None]
            for row, p50 in zip(sparse, interleaved_p50(models, data, runs, rounds), strict=True):
                row.sparse_p50 = p50
            if arm64:
                _arm64(rows, runs)
            for row in rows:  # the files vanish with the folder: keep their sizes
                row.tflite_bytes = row.tflite.size_bytes() if row.tflite else None
                row.sparse_bytes = row.sparse_tflite.size_bytes() if row.sparse_tflite else None
            results[kind] = rows
    return results


def _arm64(rows: list[Row], runs: int) -> None:
    """Both runtimes' p50 of every variant under the arm64 emulation, when its cache is there."""
    from arm64_timing import arm64_p50

    paths = [r.onnx.path.resolve() for r in rows] + [r.tflite.path.resolve() for r in rows if r.tflite]
    times = arm64_p50(paths, runs=max(20, runs // 4))
    if times is None:
        return
    for row in rows:
        row.arm_ort_p50 = times.get(str(row.onnx.path.resolve()))
        row.arm_litert_p50 = times.get(str(row.tflite.path.resolve())) if row.tflite else None


def _ratio(base: float | None, value: float | None) -> str:
    return "-" if not base or not value else f"{base / value:.2f}"


def table(results: dict[str, list[Row]]) -> str:
    arm = any(r.arm_ort_p50 is not None for rows in results.values() for r in rows)
    lines = [
        "| model | variant | top-1 | Δ pts | bytes | xz bytes | xz ×smaller | ORT p50 µs | ORT speed-up "
        "| LiteRT top-1 | LiteRT p50 µs | LiteRT speed-up |"
        + (" arm64 emu ORT | arm64 emu LiteRT |" if arm else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if arm else ""),
    ]
    for kind, rows in results.items():
        base = rows[0]
        for r in rows:
            m, acc0 = r.metrics, base.metrics.accuracy or 0.0
            lite_acc = "-" if r.tflite_accuracy is None else f"{r.tflite_accuracy * 100:.2f}%"
            lite = "-" if r.litert_p50 is None else f"{r.litert_p50 * 1000:.1f}"
            lines.append(
                f"| {kind} | {r.label} | {(m.accuracy or 0) * 100:.2f}% | {((m.accuracy or 0) - acc0) * 100:+.2f} "
                f"| {m.size_bytes:,} | {m.transfer_bytes:,} | {base.metrics.size_bytes / m.transfer_bytes:.1f} "
                f"| {r.ort_p50 * 1000:.1f} | {_ratio(base.ort_p50, r.ort_p50)} | {lite_acc} | {lite} "
                f"| {_ratio(base.litert_p50, r.litert_p50)} |"
                + (
                    f" {_ratio(base.arm_ort_p50, r.arm_ort_p50)} | {_ratio(base.arm_litert_p50, r.arm_litert_p50)} |"
                    if arm
                    else ""
                )
            )
    return "\n".join(lines)


def sparse_table(results: dict[str, list[Row]]) -> str:
    lines = [
        "| model | weights | dense .tflite bytes | LiteRT p50 µs | sparse .tflite bytes | LiteRT p50 µs | sparse/dense p50 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind, rows in results.items():
        for r in rows:
            if r.sparse_p50 is None or r.litert_p50 is None:
                continue
            lines.append(
                f"| {kind} | {r.label} | {r.tflite_bytes:,} | {r.litert_p50 * 1000:.1f} | {r.sparse_bytes:,} "
                f"| {r.sparse_p50 * 1000:.1f} | {r.sparse_p50 / r.litert_p50:.2f} |"
            )
    return "\n".join(lines)


def _row(rows: list[Row], label: str) -> Row:
    return next(r for r in rows if r.label == label)


def findings(results: dict[str, list[Row]]) -> str:
    """The targets and what does not pay, in words, with this run's numbers."""
    out = []
    for kind, rows in results.items():
        base, s50 = rows[0], _row(rows, "structured 50% + ft")
        best = _row(rows, "structured 50% + ft + prune 85% + ft + cluster 16 (+1-D) + ft")
        old = _row(rows, "prune 90% + ft + int8")

        def pts(r: Row, acc0: float = base.metrics.accuracy or 0.0) -> float:
            return ((r.metrics.accuracy or 0.0) - acc0) * 100

        out.append(
            f"- **{kind}**: structured 50% + fine-tuning: p50 {_ratio(base.ort_p50, s50.ort_p50)}x lower on "
            f"ORT and {_ratio(base.litert_p50, s50.litert_p50)}x on LiteRT at {pts(s50):+.2f} points; "
            f"the full pipeline transfers {base.metrics.size_bytes / best.metrics.transfer_bytes:.1f}x smaller "
            f"than fp32 at {pts(best):+.2f} points (prune 90% + ft + int8, the best pipeline before: "
            f"{base.metrics.size_bytes / old.metrics.transfer_bytes:.1f}x at {pts(old):+.2f})."
        )
    return "\n".join(out)


def section(
    results: dict[str, list[Row]], seconds: float, epochs: int, ft_epochs: int, rounds: int, real: str
) -> str:
    from bench_common import machine, now

    ort = extras.require("onnxruntime")
    return f"""{SECTION}

Measured {now()} on {machine()}; onnxruntime {ort.__version__}, LiteRT through the converter's
TFLite runner, {extras.THREADS} threads; `.venv/bin/python bench/compression.py --write`
({seconds:.0f} s; `--only methods` runs this table alone). Models trained {epochs} epochs; every "+ ft" is the `finetune`
pass, at most {ft_epochs} epochs (patience 6) on the digits training split, pruning masks and
cluster assignments held. int8 = ORT static QDQ, per-tensor, float biases, MinMax; LiteRT int8 =
the `tflite` pass's full-int8 conversion of the same float weights (float I/O). LiteRT columns time
a Keras twin of each ONNX model (`bench/keras_twin.py`; its top-1 is shown and matches), fp32 unless
the variant ends in int8. xz ×smaller = fp32 bytes on disk / xz bytes (the transfer size the
converter reports, as in the table above). Speed-up = fp32 p50 / variant p50, all variants of a
model timed round-robin ({rounds} rounds), single-sample calls.

{table(results)}

{findings(results)}

Where it does not pay: the small digits CNN (~10 µs a call) is bound by per-call overhead, so
removing channels barely moves ORT's p50 (LiteRT, with less overhead, gains a little); int8 is
slower than fp32 on ORT at batch 1 for the MLP and the small CNN, and LiteRT's int8 pays clearly
only on `cnn-large` (1.7-2.5x over three runs; MLP 0.98-1.24x, small CNN slower); clustering changes no latency at all (ORT folds the codebook into dense weights
when the session loads; LiteRT runs the twin's dense weights), it pays in transfer size only;
mixed precision chose all-int8 on every model here because int8 alone cost nothing (the pass
matters where a layer breaks under int8: `tests/test_converter_shrink.py`); the small CNN loses
8-12 points with 90% or 85% magnitude pruning even after fine-tuning (6k weights have no slack).

arm64 emulation (`--arm64`: every file timed under `qemu-aarch64`, Cortex-A72, see docs/arm64.md)
is cheap (~1 min a model) but its ratios are not a board's. Measured once (2026-12-02, host load
average ~20): int8/fp32 "speed-ups" of 3.6x (ORT) and 38.6x (LiteRT) on the MLP, and 0.09-2.5x
between files that run the same dense kernels (fp32 vs cluster 16, whose codebook ORT folds at
load). QEMU executes floating-point instructions in software (softfloat) while integer SIMD maps
almost directly, so emulated float is many times slower than on silicon. The structured rows
pointed the same way as on x86 (mlp 2.7x, cnn-large 10.8x ORT), but only a real Pi gives numbers.

Sparse weights in LiteRT (`tflite` pass with `sparse = true`: TFLite's EXPERIMENTAL_SPARSITY
format), same weights, dense vs sparse file:

{sparse_table(results)}

The sparse format shrinks the file of a 90%-pruned model 6.4x (mlp; xz of the dense file is still
smaller) and changes no latency beyond noise (sparse/dense p50 0.74-1.28 over three runs, in no
consistent direction): the tensors are densified when LiteRT prepares the graph, and XNNPACK runs
its dense kernels. XNNPACK's sparse inference (the Fast Sparse ConvNets kernels) applies only to
float subgraphs that start with a 3x3 stride-2 convolution on 3 input channels, end in a spatial
MEAN, and hold 1x1 convolutions at least 2/3 zero (its README): MobileNet-shaped image models, not
these 1-channel 8x8 CNNs or MLPs. It pays for disk, not for speed.

Structured pruning on the real-model suite's CNNs (`bench/compression_real.py`; `multiple_of = 8`;
top-1 on 24 rendered, turned text samples; **not fine-tuned**: that needs the models' training data):

{real}
"""
