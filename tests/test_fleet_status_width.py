"""`edgectl fleet status` fits 100 columns by default; --wide shows every column."""

from __future__ import annotations

import io

from rich.console import Console

from fleet.status import WIDE, StatusRow, render_status

NOW = 1_767_225_600.0


def _rows() -> list[StatusRow]:
    # Long but real values: a Jetson's TensorRT label with its power mode, a throttled Pi.
    common = dict(online=True, last_seen=NOW - 12, rps=118.4, p50_ms=3.21, p95_ms=12.75, p99_ms=48.02)
    return [
        StatusRow(
            device="jetson-orin-warehouse-07", model="detector", bundle="yolo-tiny-int8", version="2.10.3",
            runtime="onnxruntime", delegate="TensorrtExecutionProvider", power_mode="15W", rss_mb=1843.0,
            cpu_percent=112.5, temperature_c=71.5, acceptance_passed=True, acceptance_accuracy=0.953,
            online_accuracy=0.941, last_deployment="failed acceptance_failed 2.11.0",
            last_deployment_ok=False,
            **common,  # type: ignore[arg-type]
        ),
        StatusRow(
            device="rpi4-kitchen-01", model="default", bundle="digits", version="1.1.0", runtime="litert",
            delegate="xnnpack", rss_mb=88.0, cpu_percent=35.0, temperature_c=81.2, throttled=True,
            acceptance_passed=False, acceptance_accuracy=0.81, last_deployment="committed 1.1.0",
            **common,  # type: ignore[arg-type]
        ),
    ]  # fmt: skip


def _printed(wide: bool) -> list[str]:
    out = io.StringIO()
    # As wide as it likes: the table's natural width is what a terminal has to hold.
    Console(file=out, width=400, color_system=None).print(render_status(_rows(), now=NOW, wide=wide))
    return out.getvalue().splitlines()


def test_default_view_fits_100_columns() -> None:
    lines = _printed(wide=False)
    assert max(len(line) for line in lines) <= 100, "\n".join(lines)
    assert lines[0].split() == [
        "device",
        "model",
        "online",
        "bundle",
        "runtime",
        "p95",
        "ms",
        "RSS",
        "°C",
        "acceptance",
    ]
    assert "…" not in lines[0]  # headers whole
    assert "rpi4-kitchen-01" in "\n".join(lines) and "81.2!" in "\n".join(lines)


def test_wide_view_has_every_column() -> None:
    lines = _printed(wide=True)
    text = "\n".join(lines)
    assert all(name.split()[0] in lines[0] for name in WIDE)
    assert "onnxruntime/TensorrtExecutionProvider @15W" in text  # nothing cut
    assert "failed acceptance_failed 2.11.0" in text
