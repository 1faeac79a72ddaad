"""Compression benchmark (issue 3): what pruning and int8 cost and buy on the digits data set.

Trains two small classifiers in PyTorch on scikit-learn's digits (no download), exports them
to ONNX, and measures each variant with the converter's own evaluator, in one run:

* ``mlp``: LeNet-300-100-shaped MLP, 64-300-100-10 (the Deep Compression paper's reference);
* ``cnn``: Conv 3x3x16 -> pool -> Conv 3x3x32 -> pool -> Dense 10.

Variants: fp32; magnitude-pruned (global threshold, no retraining) at 50/70/90%, stored dense and
(70/90%) as ONNX sparse initializers; static int8
(ORT QDQ, per-channel, MinMax on the 180-sample calibration split); pruned + int8; dynamic int8.
Columns: top-1 on the 360-sample test split, size on disk, transfer size (xz and zlib), host p50
latency of single-sample inference (ORT, 2 threads), and the ratios against fp32 of the same run.

    .venv/bin/python bench/compression.py              # print the table
    .venv/bin/python bench/compression.py --write      # also put it into bench/RESULTS.md

``--training`` measures instead what fine-tuning and distillation recover (issue 8): the MLP
pruned 90% with and without the ``finetune`` pass, each then int8; and a >=100k-parameter teacher
distilled into an ``mlp:64`` student against the same student trained on hard labels alone
(``alpha = 0``, same epochs and early stopping), over 3 seeds. Its own section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from converter import extras
from converter.api import export_torch
from converter.data import Dataset
from converter.datasets import flat, load_digits_splits
from converter.evaluate import EvaluateConfig, Evaluator, Metrics, compressed_size
from converter.model import ModelArtifact
from converter.passes import PassContext
from converter.passes.prune import PruneConfig, PrunePass
from converter.passes.quantize import QuantizeConfig, QuantizePass
from converter.passes.sparsify import SparsifyConfig, SparsifyPass
from converter.runners import fit_inputs, open_runner, time_invocations

SECTION = "## Compression (issue 3)"
TRAINING_SECTION = "## Fine-tuning and distillation (issue 8)"
RESULTS = Path(__file__).parent / "RESULTS.md"
SPARSITIES = (0.5, 0.7, 0.9)


def build(kind: str) -> Any:
    torch = extras.torch()
    nn = torch.nn
    if kind == "teacher":  # 64-512-256-10: 166k parameters
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
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


def train(kind: str, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> Any:
    torch = extras.torch()
    torch.manual_seed(seed)
    net = build(kind)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return net.eval()


def variants(source: ModelArtifact, ctx: PassContext, work: Path) -> list[tuple[str, ModelArtifact]]:
    # Per-tensor weight scales and float biases: for models this small, per-channel scales and
    # int32 biases with their own scales are a visible share of the file (see docs/converter.md).
    static = QuantizeConfig(mode="static", quantize_bias=False)
    out: list[tuple[str, ModelArtifact]] = [("fp32", source)]
    pruned = {}
    for s in SPARSITIES:
        pruned[s] = PrunePass(PruneConfig(sparsity=s), ctx).run(source, work).model
        out.append((f"pruned {s:.0%}", pruned[s]))
        if s >= 0.7:
            out.append(
                (
                    f"pruned {s:.0%}, sparse storage",
                    SparsifyPass(SparsifyConfig(), ctx).run(pruned[s], work).model,
                )
            )
    out.append(("int8", QuantizePass(static, ctx).run(source, work).model))
    for s in (0.5, 0.9):
        out.append((f"pruned {s:.0%} + int8", QuantizePass(static, ctx).run(pruned[s], work).model))
    per_channel = QuantizeConfig(mode="static", per_channel=True)
    out.append(("int8 per-channel, int32 bias", QuantizePass(per_channel, ctx).run(source, work).model))
    out.append(("dynamic int8", QuantizePass(QuantizeConfig(mode="dynamic"), ctx).run(source, work).model))
    return out


def measure(kind: str, epochs: int, runs: int, rounds: int) -> list[tuple[str, Metrics, int]]:
    splits = load_digits_splits(seed=0)
    x_train = flat(splits.x_train) if kind == "mlp" else splits.x_train.transpose(0, 3, 1, 2).copy()
    net = train(kind, x_train, splits.y_train, epochs, seed=0)
    data = Dataset(x=splits.x_test, y=splits.y_test, calib=splits.x_calib, source="digits")
    evaluator = Evaluator(data, EvaluateConfig(latency_runs=10, latency_warmup=0))
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        work = Path(tmp)
        source = export_torch(net, extras.torch().from_numpy(x_train[:2]), work / f"{kind}.onnx")
        evaluator.evaluate(source)  # the fp32 model is the agreement reference
        ctx = PassContext(data=data, evaluator=evaluator)
        models = variants(source, ctx, work)
        measured = [(label, evaluator.evaluate(model).metrics, model) for label, model in models]
        p50 = interleaved_p50([model for _, _, model in measured], data, runs, rounds)
        return [
            (label, m.model_copy(update={"latency_p50_ms": p}), compressed_size(model.read_bytes(), "zlib"))
            for (label, m, model), p in zip(measured, p50, strict=True)
        ]


def interleaved_p50(models: list[ModelArtifact], data: Dataset, runs: int, rounds: int) -> list[float]:
    """Median over ``rounds`` of each model's median single-sample latency, models taken in turn.

    On a shared host the load drifts; timing all variants round-robin spreads the drift evenly
    instead of charging it to whichever variant happened to run during a busy second.
    """
    runners = [open_runner(m) for m in models]
    samples = [fit_inputs(data.x[:1], r.sample_shape) for r in runners]
    for runner, sample in zip(runners, samples, strict=True):
        time_invocations(runner, sample, runs=1, warmup=50)
    medians: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, (runner, sample) in enumerate(zip(runners, samples, strict=True)):
            medians[i].append(float(np.median(time_invocations(runner, sample, runs, warmup=5))))
    return [float(np.median(m)) for m in medians]


Results = dict[str, list[tuple[str, Metrics, int]]]


def summary(results: Results) -> str:
    """The findings in words, with this run's numbers."""
    out = []
    for kind, rows in results.items():
        m = {label: metrics for label, metrics, _ in rows}
        base, int8, p90q = m["fp32"], m["int8"], m["pruned 90% + int8"]
        drop = ((base.accuracy or 0.0) - (int8.accuracy or 0.0)) * 100
        out.append(
            f"- **{kind}**: int8 is {base.size_bytes / int8.size_bytes:.2f}x smaller on disk and "
            f"{base.size_bytes / int8.transfer_bytes:.2f}x smaller to transfer than fp32, losing {drop:.2f} points "
            f"of top-1; p50 latency int8/fp32 = {int8.latency_p50_ms / base.latency_p50_ms:.2f}. "
            f"Pruning 90% + int8 transfers {base.size_bytes / p90q.transfer_bytes:.1f}x smaller, but at "
            f"{(p90q.accuracy or 0.0) * 100:.1f}% top-1 without retraining."
        )
    out += [
        "",
        "Reading it: int8 weights are exactly 4x smaller; the rest of an int8 file is float biases, scales",
        "and the graph itself (QDQ nodes, tensor names), which weigh more the smaller the model, so the",
        "disk ratio approaches 4x only for larger models (the 50k-weight MLP here falls short of the",
        "3.8x target on disk and beats it in transfer size). Pruning without retraining leaves the file",
        "size unchanged when tensors stay dense, while xz squeezes out the zeros, so transfer size falls",
        "with sparsity either way; stored as sparse initializers (COO, int64 indices) the file itself",
        "shrinks too from ~70% sparsity on, and transfers about as small as dense + xz. Accuracy holds",
        "to about 50-70% sparsity (MLP) and breaks down towards 90%, which is why Deep",
        "Compression (LeNet-300-100: 40x, 1070 KB -> 27 KB) retrained after pruning. On this x86 host int8",
        "is not faster than fp32 at batch 1 for models this small: at ~10-30 us a call, per-call and",
        "quantize/dequantize overhead outweigh the cheaper matrix products (the p50 ratio says by how much);",
        "dynamic int8 pays for quantizing activations on every call.",
    ]
    return "\n".join(out)


def table(results: Results) -> str:
    lines = [
        "| model | variant | top-1 | Δ top-1 (pts) | bytes | xz bytes | zlib bytes | p50 ms "
        "| size ×smaller | xz ×smaller | p50 ×fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, rows in results.items():
        base = rows[0][1]
        for label, m, zlib_bytes in rows:
            acc, acc0 = m.accuracy or 0.0, base.accuracy or 0.0
            lines.append(
                f"| {kind} | {label} | {acc * 100:.2f}% | {(acc - acc0) * 100:+.2f} | {m.size_bytes:,} "
                f"| {m.transfer_bytes:,} | {zlib_bytes:,} | {m.latency_p50_ms:.4f} "
                f"| {base.size_bytes / m.size_bytes:.2f} | {base.size_bytes / m.transfer_bytes:.2f} "
                f"| {m.latency_p50_ms / base.latency_p50_ms:.2f} |"
            )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def section(results: Results, seconds: float, epochs: int, runs: int, rounds: int) -> str:
    body, findings = table(results), summary(results)
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    ort = extras.require("onnxruntime")
    return f"""{SECTION}

Measured {date} on {machine()}; onnxruntime {ort.__version__}, {extras.THREADS} threads;
`.venv/bin/python bench/compression.py --write` ({seconds:.0f} s). Data: scikit-learn digits, seed 0
(train 1257 / calibration 180 / test 360). Models trained {epochs} epochs in PyTorch, exported to
ONNX (opset 17). Pruning: global magnitude threshold, **no retraining**. int8: ORT static QDQ,
per-tensor weights, float biases, MinMax calibration on the calibration split (the per-channel
row keeps ORT's defaults: int32 biases with their own scales). Transfer size: the artifact
compressed with xz (LZMA2 preset 9e, what the converter reports) and, for comparison, zlib 9.
Latency: single-sample ORT CPU invocations, all variants of a model timed round-robin ({rounds} rounds
of {runs}); the median over rounds of each round's median. Ratios are against fp32 of the same run
(size ×smaller = fp32 bytes / bytes; xz ×smaller = fp32 bytes on disk / xz bytes; p50 ×fp32 > 1
means slower than fp32).

{body}

{findings}
"""


def write_results(text: str, heading: str = SECTION) -> None:
    """Replace the section ``heading`` of RESULTS.md, or append it; one write."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if heading in current:
        start = current.index(heading)
        end = current.find("\n## ", start + len(heading))
        current = current[:start] + text.rstrip() + "\n" + (current[end:] if end != -1 else "")
    else:
        current = current.rstrip() + "\n\n" + text
    RESULTS.write_text(current)


# ------------------------------------------------------------------ fine-tuning and distillation


def _digits_context(epochs: int, kind: str, work: Path) -> tuple[ModelArtifact, PassContext, int]:
    """``kind`` trained ``epochs`` epochs (seed 0) and exported; a context with the digits data."""
    from converter.data import DataConfig, load_data

    data = load_data(DataConfig(dataset="digits"))
    if data is None or data.train_x is None or data.train_y is None:
        raise SystemExit("the digits data set did not load")
    x_train = flat(data.train_x)
    net = train(kind, x_train, data.train_y, epochs, seed=0)
    params = sum(int(p.numel()) for p in net.parameters())
    source = export_torch(net, extras.torch().from_numpy(x_train[:2]), work / f"{kind}.onnx")
    evaluator = Evaluator(data, EvaluateConfig(latency_runs=20, latency_warmup=5))
    baseline = evaluator.evaluate(source).metrics
    return source, PassContext(data=data, evaluator=evaluator, baseline=baseline), params


def finetune_rows(epochs: int, work: Path) -> list[tuple[str, Metrics]]:
    """The MLP: fp32, pruned 90% without / with fine-tuning, each then int8."""
    from converter.passes.finetune import FinetuneConfig, FinetunePass

    source, ctx, _ = _digits_context(epochs, "mlp", work)
    if ctx.evaluator is None or ctx.baseline is None:
        raise SystemExit("no evaluator")
    static = QuantizeConfig(mode="static", quantize_bias=False)
    pruned = PrunePass(PruneConfig(sparsity=0.9), ctx).run(source, work).model
    tuned = FinetunePass(FinetuneConfig(epochs=60), ctx).run(pruned, work).model
    pruned95 = PrunePass(PruneConfig(sparsity=0.95), ctx).run(source, work).model
    tuned95 = FinetunePass(FinetuneConfig(epochs=60), ctx).run(pruned95, work).model
    models = [
        ("fp32", source),
        ("int8", QuantizePass(static, ctx).run(source, work).model),
        ("pruned 90%", pruned),
        ("pruned 90% + int8", QuantizePass(static, ctx).run(pruned, work).model),
        ("pruned 90% + fine-tuned", tuned),
        ("pruned 90% + fine-tuned + int8", QuantizePass(static, ctx).run(tuned, work).model),
        ("pruned 95% + fine-tuned", tuned95),
        ("pruned 95% + fine-tuned + int8", QuantizePass(static, ctx).run(tuned95, work).model),
    ]
    return [(label, ctx.evaluator.evaluate(model).metrics) for label, model in models]


STUDENTS = ("mlp:64", "mlp:16")


def distill_rows(epochs: int, work: Path, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per student and seed: distilled from the teacher, and trained on hard labels alone."""
    from converter.passes.distill import DistillConfig, DistillPass

    teacher, ctx, params = _digits_context(epochs, "teacher", work)
    rows = []
    for student in STUDENTS:
        for seed in seeds:
            row: dict[str, Any] = {"seed": seed, "teacher_parameters": params, "student": student}
            for label, alpha in (("distilled", 0.7), ("hard labels", 0.0)):
                folder = work / f"{student.replace(':', '-')}-{label.replace(' ', '-')}-{seed}"
                folder.mkdir()
                # patience = epochs: both run the full budget (early stopping on 189 validation
                # samples otherwise ends noisy hard-label runs after a few dozen epochs).
                config = DistillConfig(
                    student=student, alpha=alpha, temperature=4.0, seed=seed, epochs=100, patience=100
                )
                row[label] = DistillPass(config, ctx).run(teacher, folder).details
            rows.append(row)
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def training_section(epochs: int, started: float) -> str:
    """The issue 8 section: fine-tuning table, distillation table, findings."""
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        (work / "ft").mkdir()
        (work / "kd").mkdir()
        ft = finetune_rows(epochs, work / "ft")
        distilled = distill_rows(epochs, work / "kd", (0, 1, 2))
    base = ft[0][1]
    acc0 = base.accuracy or 0.0
    lines = [
        "| variant | top-1 | Δ top-1 (pts) | bytes | xz bytes | xz ×smaller than fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in ft:
        acc = m.accuracy or 0.0
        lines.append(
            f"| {label} | {acc * 100:.2f}% | {(acc - acc0) * 100:+.2f} | {m.size_bytes:,} "
            f"| {m.transfer_bytes:,} | {base.size_bytes / m.transfer_bytes:.1f} |"
        )
    kd = [
        "| student | seed | teacher params | teacher top-1 | student params | distilled top-1 | hard-label top-1 "
        "| distilled − teacher (pts) | distilled − hard (pts) | best epoch (distilled / hard) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gaps: dict[str, list[float]] = {s: [] for s in STUDENTS}
    gains: dict[str, list[float]] = {s: [] for s in STUDENTS}
    for row in distilled:
        d, h = row["distilled"], row["hard labels"]
        t_acc, d_acc, h_acc = d["teacher"]["accuracy"], d["student"]["accuracy"], h["student"]["accuracy"]
        gap, gain = (d_acc - t_acc) * 100, (d_acc - h_acc) * 100
        gaps[row["student"]].append(gap)
        gains[row["student"]].append(gain)
        kd.append(
            f"| `{row['student']}` | {row['seed']} | {row['teacher_parameters']:,} | {t_acc * 100:.2f}% "
            f"| {d['student']['parameters']:,} | {d_acc * 100:.2f}% | {h_acc * 100:.2f}% "
            f"| {gap:+.2f} | {gain:+.2f} | {d['best_epoch']} / {h['best_epoch']} |"
        )
    means = "; ".join(
        f"`{s}` distilled − teacher {np.mean(gaps[s]):+.2f} points, distilled − hard-label "
        f"{np.mean(gains[s]):+.2f} points"
        for s in STUDENTS
    )
    by_label = dict(ft)
    pruned_drop = (acc0 - (by_label["pruned 90%"].accuracy or 0.0)) * 100
    tuned_delta = ((by_label["pruned 90% + fine-tuned"].accuracy or 0.0) - acc0) * 100
    tuned_q = by_label["pruned 90% + fine-tuned + int8"]
    tuned_q_delta = ((tuned_q.accuracy or 0.0) - acc0) * 100
    q_ratio = base.size_bytes / tuned_q.transfer_bytes
    q95 = by_label["pruned 95% + fine-tuned + int8"]
    q95_ratio, q95_delta = base.size_bytes / q95.transfer_bytes, ((q95.accuracy or 0.0) - acc0) * 100
    kd_targets = "; ".join(
        f"`{s}`: within 1.5 points of the teacher {_met(min(gaps[s]) >= -1.5)}, "
        f">= 1 point better than hard labels {_met(float(np.mean(gains[s])) >= 1.0)}"
        for s in STUDENTS
    )
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    seconds = time.monotonic() - started
    return f"""{TRAINING_SECTION}

Measured {date} on {machine()}, torch and onnxruntime on {extras.THREADS} threads;
`.venv/bin/python bench/compression.py --training --write` ({seconds:.0f} s). Data: scikit-learn
digits, seed 0 (train 1257, of which the passes hold out 15% for validation / calibration 180 / test 360);
top-1 on the test split. Models trained {epochs} epochs (Adam, seed 0) and exported to ONNX.

**(a) 90% magnitude pruning of the 64-300-100-10 MLP, without and with the `finetune` pass**
(global threshold; fine-tuning: Adam 1e-3, at most 60 epochs, early stopping with patience 8,
pruned weights held at zero), then static int8 (per-tensor, float biases). xz ×smaller = fp32
bytes on disk / xz bytes of the variant.

{chr(10).join(lines)}

**(b) Distillation** of a 64-512-256-10 teacher into `mlp:64` and `mlp:16` students (T = 4, alpha = 0.7),
against the same student trained on hard labels alone (alpha = 0): same seed, same initial
weights, same budget: 100 epochs each (Adam 3e-3, batch 64), keeping the epoch with the best
validation top-1 (no early stop, so neither run is cut short by a noisy validation split).

{chr(10).join(kd)}

Mean over seeds: {means}.

Reading it: pruning 90% without retraining costs {pruned_drop:.1f} points; fine-tuning with the
masks fixed ends {tuned_delta:+.2f} points from the dense model (target: within 0.5 point: {_met(tuned_delta >= -0.5)}).
With int8 on top it transfers {base.size_bytes / tuned_q.transfer_bytes:.1f}x smaller than the fp32 file at
{tuned_q_delta:+.2f} points (target: >= 20x at <= 0.5 point loss: {_met(q_ratio >= 20 and tuned_q_delta >= -0.5)}).
At 95% sparsity (an extra row) int8 transfers {q95_ratio:.1f}x smaller at {q95_delta:+.2f} points.
Distillation targets per student: {kd_targets}. On digits these small MLPs trained on hard labels for
the same 100 epochs already come within about a point of the teacher, which leaves soft labels
little to add. (With early stopping at patience 15, hard-label runs stopped after 27-93 epochs on
the noisy 189-sample validation split and distillation looked up to 3.9 points better for `mlp:16`:
an effect of the stopping rule, which is why both runs now get the full budget.) A 360-sample
test split moves in steps of 0.28 points, so differences of one or two samples are noise.
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=int, default=200, help="timed invocations per variant and round")
    parser.add_argument("--rounds", type=int, default=7, help="round-robin timing rounds")
    parser.add_argument("--write", action="store_true", help=f"write the table into {RESULTS}")
    parser.add_argument("--training", action="store_true", help="fine-tuning and distillation (issue 8)")
    args = parser.parse_args()
    started = time.monotonic()
    if args.training:
        text = training_section(args.epochs, started)
        print(text)
        if args.write:
            write_results(text, TRAINING_SECTION)
            print(f"written to {RESULTS}")
        return
    results = {kind: measure(kind, args.epochs, args.runs, args.rounds) for kind in ("mlp", "cnn")}
    print(table(results))
    print(summary(results))
    if args.write:
        write_results(section(results, time.monotonic() - started, args.epochs, args.runs, args.rounds))
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
