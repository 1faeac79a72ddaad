"""The conversion report: ``report.json``, ``report.md``, ``report.svg`` and, where an SVG
renderer is installed (rsvg-convert or cairosvg), ``report.png``.

One row per step (the source model first), each measured by the same evaluator. Sizes in
bytes, latencies in ms on this host, accuracies as fractions 0-1.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from converter import extras
from converter.evaluate import Metrics, accuracy_loss, regressions
from converter.package import Packaged
from converter.pipeline import PipelineResult
from edgeagent.storage import atomic_write_bytes
from edgeagent.svgchart import side_by_side, xy_chart

CHART_W, CHART_H = 420, 280


def artifact_warnings(result: PipelineResult) -> list[str]:
    """One line per produced artifact that is larger or slower (host p50) than the source model,
    or lost more than a few points of its top-1 accuracy."""
    source = result.source.path.name
    lines = []
    for model, metrics in result.artifacts():
        if model == result.source:
            continue
        reasons = regressions(metrics, result.baseline, f"the source {source}")
        lost = accuracy_loss(metrics, result.baseline, f"the source {source}")
        reasons += [lost] if lost else []
        if reasons:
            lines.append(f"{model.path.name}: {'; '.join(reasons)}")
    return lines


def report_dict(result: PipelineResult, data_source: str, packaged: Packaged | None) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data."""
    body: dict[str, Any] = {
        "source": {"path": str(result.source.path), "kind": result.source.kind},
        "data": data_source,
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "threads": extras.THREADS,
        },
        "baseline": result.baseline.model_dump(mode="json"),
        "warnings": artifact_warnings(result),
        "steps": [
            {
                "name": s.name,
                "params": s.params,
                "artifact": s.model.path.name,
                "kind": s.model.kind,
                "seconds": round(s.seconds, 3),
                "sparsity": s.sparsity,
                "before": s.before.model_dump(mode="json"),
                "after": s.after.model_dump(mode="json"),
                "details": s.details,
                "notes": s.notes,
            }
            for s in result.steps
        ],
    }
    if packaged is not None:
        body["bundle"] = {
            "path": str(packaged.bundle.path),
            "sha256": packaged.bundle.sha256,
            "models": [m.path for m in packaged.bundle.manifest.models],
            "gate": packaged.gate.model_dump(mode="json"),
            "gates": {name: g.model_dump(mode="json") for name, g in packaged.gates.items()},
            "intermediates": packaged.intermediates,
            "notes": packaged.notes,
            "measured_on_golden": packaged.measured,
        }
    return body


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _row(label: str, artifact: str, m: Metrics, sparsity: float | None) -> str:
    return (
        f"| {label} | `{artifact}` | {_pct(m.accuracy)} | {_pct(m.top_k_accuracy)} "
        f"| {_pct(m.top1_agreement)} "
        f"| {m.size_bytes:,} | {m.transfer_bytes:,} | {m.latency_p50_ms:.3f} | {m.latency_p95_ms:.3f} "
        f"| {_pct(sparsity)} |"
    )


def _training_lines(details: dict[str, Any]) -> list[str]:
    """finetune's accuracy chain, distill's teacher and student, and the epochs of either."""
    lines: list[str] = []
    chain = details.get("accuracy")
    if isinstance(chain, dict):
        lines += ["| top-1 | " + " | ".join(chain) + " |", "|---|" + "---:|" * len(chain)]
        lines += ["| | " + " | ".join(_pct(v) for v in chain.values()) + " |", ""]
    if "teacher" in details and "student" in details:
        lines += ["| model | artifact | parameters | bytes | top-1 |", "|---|---|---:|---:|---:|"]
        for role in ("teacher", "student"):
            m = details[role]
            params = "-" if m.get("parameters") is None else f"{m['parameters']:,}"
            lines.append(
                f"| {role} | `{m['artifact']}` | {params} | {m['size_bytes']:,} | {_pct(m['accuracy'])} |"
            )
        lines.append("")
    history = details.get("history")
    if history:
        lines += ["| epoch | loss | validation top-1 |", "|---:|---:|---:|"]
        best = details.get("best_epoch")
        lines += [
            f"| {h['epoch']}{' **best**' if h['epoch'] == best else ''} | {h['loss']:.4f} "
            f"| {_pct(h['val_accuracy'])} |"
            for h in history
        ]
    return lines


def _candidate_lines(details: dict[str, Any]) -> list[str]:
    """The search's candidates: settings, measurements and the verdict with its reason."""
    candidates = details.get("candidates")
    if not candidates:
        return []
    ref = details["reference"]
    lines = [
        f"Objective `{details['objective']}`; float model `{ref['artifact']}`: {ref['size_bytes']:,} bytes, "
        f"{ref['transfer_bytes']:,} transfer bytes, p50 {ref['latency_p50_ms']:.3f} ms.",
        "",
        "| # | mode | per-channel | calibration | excluded | top-1 | drop | bytes | transfer bytes "
        "| p50 ms | verdict | reason |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for j, c in enumerate(candidates):
        verdict = f"**{c['verdict']}**" if c["verdict"] == "chosen" else c["verdict"]
        lines.append(
            f"| {j} | {c['mode']} | {c['per_channel']} | {c['calibration'] or '-'} "
            f"| {', '.join(c['excluded_nodes']) or '-'} | {_pct(c['accuracy'])} | {_pct(c['drop'])} "
            f"| {c['size_bytes']:,} | {c['transfer_bytes']:,} | {c['latency_p50_ms']:.3f} | {verdict} "
            f"| {c['reason'] or '-'} |"
        )
    return lines


def _shrink_lines(details: dict[str, Any]) -> list[str]:
    """Tables of the structured, cluster and mixed passes: channels, codebooks, sensitivities."""
    lines: list[str] = []
    if layers := details.get("layers"):
        lines += ["| layer | channels before | after | top-1 drop alone |", "|---|---:|---:|---:|"]
        for name, d in layers.items():
            drop = d.get("sensitivity_drop")
            alone = "-" if drop is None else f"{drop * 100:+.2f} pts"
            lines.append(f"| `{name}` | {d['channels_before']} | {d['channels_after']} | {alone} |")
    if clustered := details.get("clustered"):
        lines += ["| tensor | shape | clusters | RMS error |", "|---|---|---:|---:|"]
        lines += [
            f"| `{n}` | {d['shape']} | {d['clusters']} | {d['rms_error']:.4g} |" for n, d in clustered.items()
        ]
    if sensitivity := details.get("sensitivity"):
        fp32 = set(details.get("fp32_nodes") or [])
        lines += ["| node | top-1 drop int8 alone | kept |", "|---|---:|---|"]
        lines += [
            f"| `{n}` | {d * 100:+.2f} pts | {'fp32' if n in fp32 else 'int8'} |"
            for n, d in sensitivity.items()
        ]
    return lines


def render_markdown(result: PipelineResult, data_source: str, packaged: Packaged | None) -> str:
    """The report as Markdown: the steps table, then per-step details."""
    m0 = result.baseline
    k = m0.top_k or "k"
    lines = [
        "# Conversion report",
        "",
        f"Source `{result.source.path.name}` ({result.source.kind}); "
        f"data: {data_source} ({m0.samples} samples).",
        f"Latency: single-sample invocations on this host ({platform.machine()}, {extras.THREADS} threads).",
        f"Transfer size: the artifact compressed with {m0.transfer_codec}.",
        "",
        f"| step | artifact | top-1 | top-{k} | agreement | bytes | transfer bytes "
        "| p50 ms | p95 ms | sparsity |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        _row("source", result.source.path.name, m0, None),
    ]
    lines += [_row(s.name, s.model.path.name, s.after, s.sparsity) for s in result.steps]
    warnings = artifact_warnings(result)
    if warnings:
        lines += ["", "**Warnings**: artifacts that are larger or slower than the source.", ""]
        lines += [f"- {w}" for w in warnings]
    for i, step in enumerate(result.steps, 1):
        lines += ["", f"## {i}. {step.name}", "", f"`{json.dumps(step.params, sort_keys=True)}`", ""]
        if step.notes:
            lines += [step.notes, ""]
        tensors = step.details.get("tensors")
        if tensors:
            lines += ["| tensor | shape | sparsity | threshold |", "|---|---|---:|---:|"]
            lines += [
                f"| `{name}` | {t['shape']} | {t['sparsity'] * 100:.2f}% | {t['threshold']:.4g} |"
                for name, t in tensors.items()
            ]
        lines += _shrink_lines(step.details)
        lines += _training_lines(step.details)
        lines += _candidate_lines(step.details)
    if packaged is not None:
        gate = packaged.gate
        lines += [
            "",
            "## Bundle",
            "",
            f"`{packaged.bundle.path.name}` sha256 `{packaged.bundle.sha256}`",
            "",
            f"Models: {', '.join(f'`{m.path}`' for m in packaged.bundle.manifest.models)}.",
            f"Acceptance set: {gate.samples} samples; bundle-level gate (the final artifacts' floor): "
            f"min accuracy {gate.min_accuracy}, min top-1 agreement {gate.min_top1_agreement}.",
            "Each artifact carries its own gate; a device serves only one that passes it.",
        ]
        for name, measured in packaged.measured.items():
            own = packaged.gates.get(name)
            kept = " (intermediate)" if name in packaged.intermediates else ""
            bounds = (
                f"; its gate: min accuracy {own.min_accuracy}, min top-1 agreement {own.min_top1_agreement}"
                if own is not None
                else ""
            )
            lines.append(
                f"- `{name}`{kept} on the acceptance set: "
                + ", ".join(f"{k} {v:.4f}" for k, v in measured.items())
                + bounds
            )
        lines += [f"- note: {note}" for note in packaged.notes]
    return "\n".join(lines) + "\n"


def render_chart(result: PipelineResult) -> str:
    """Top-1 accuracy against transfer size and against latency, one labelled point per step.

    Transfer size, not size on disk: pruning leaves the file as large as before but shrinks
    what a device downloads. An SVG document, drawn by :mod:`edgeagent.svgchart`.
    """
    points = [("source", result.baseline)] + [(s.name, s.after) for s in result.steps]
    acc = [(label, (m.accuracy or 0.0) * 100) for label, m in points]
    name = result.source.path.name
    by_size = [(label, m.transfer_bytes / 1024, a) for (label, m), (_, a) in zip(points, acc, strict=True)]
    by_latency = [(label, m.latency_p50_ms, a) for (label, m), (_, a) in zip(points, acc, strict=True)]
    codec = result.baseline.transfer_codec
    charts = [
        xy_chart(f"{name}: accuracy vs transfer size", by_size, x_label=f"transfer KiB ({codec})",
                 y_label="top-1 %", width=CHART_W, height=CHART_H),
        xy_chart(f"{name}: accuracy vs latency", by_latency, x_label="p50 ms on this host",
                 y_label="top-1 %", width=CHART_W, height=CHART_H),
    ]  # fmt: skip
    return side_by_side(charts, CHART_W, CHART_H)


def svg_to_png(svg: Path, png: Path) -> bool:
    """Render ``svg`` to ``png`` with rsvg-convert or cairosvg; False when neither is installed."""
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        if exe := shutil.which("rsvg-convert"):
            done = subprocess.run([exe, "-o", str(tmp), str(svg)], capture_output=True, check=False)
            if done.returncode != 0:
                return False
        elif extras.available("cairosvg"):
            extras.require("cairosvg").svg2png(url=str(svg), write_to=str(tmp))
        else:
            return False
        tmp.replace(png)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def write_report(
    result: PipelineResult, data_source: str, packaged: Packaged | None, out_dir: Path
) -> list[Path]:
    """Write report.json, report.md, report.svg and (when possible) report.png; return their paths."""
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    svg_path, png_path = out_dir / "report.svg", out_dir / "report.png"
    body = report_dict(result, data_source, packaged)
    atomic_write_bytes(json_path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(md_path, render_markdown(result, data_source, packaged).encode())
    written = [json_path, md_path]
    if result.baseline.accuracy is not None:
        atomic_write_bytes(svg_path, render_chart(result).encode())
        written.append(svg_path)
        if svg_to_png(svg_path, png_path):
            written.append(png_path)
    return written
