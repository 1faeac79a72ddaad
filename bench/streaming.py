"""The streaming case of ``bench/serving.py``: 100 chunks with the state carried, per stream.

A recurrent cell with state in/out (``tests/state_models.gru_model``: ``x`` (1x4) and ``state``
(1x8) -> ``y`` and ``stateN``), served with the state pair ``stateN -> state``. Per path, a
stream is 100 sequential chunks from the initial state:

* **bare ORT, state carried by hand**: ``InferenceSession.run`` with the previous ``stateN``;
* **in-process session**: ``InferenceServer.predict(x, session=id)``;
* **socket framed / HTTP session**: ``Client.session()`` (the state stays in the server process).

Every stream starts a new session; the last chunk's outputs are checked against the bare run,
so a path that mixed up state would fail the benchmark rather than look fast.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeagent.bundle.manifest import ModelEntry, ModelState, StatePair
from edgeagent.client import Client
from edgeagent.runtimes import LoadOptions, load_model
from edgeagent.serving import InferenceServer, ServedModel
from edgeagent.state import StateCarrier

CHUNKS = 100
PAIRS = {"stateN": "state"}
Stream = Callable[[list[float]], np.ndarray]  # runs one stream, appending each chunk's seconds


def build_stream_model(path: Path) -> Path:
    from tests.state_models import gru_model

    return gru_model(path)


def served_stream(path: Path, options: LoadOptions, name: str = "stream") -> ServedModel:
    """The GRU model as the agent serves it after a bundle declared its state pair."""
    model = load_model(path, "onnxruntime", options)
    entry = ModelEntry(
        path=f"models/{path.name}", format="onnx", precision="fp32", inputs=list(model.inputs),
        outputs=list(model.outputs),
        state=ModelState(pairs=[StatePair(output=o, input=i) for o, i in PAIRS.items()]),
    )  # fmt: skip
    return ServedModel(name, model, name, "1.0.0", state=StateCarrier.for_model(entry, model))


def streaming_rows(
    path: Path, options: LoadOptions, socket_path: str, name: str, streams: int, rounds: int
) -> list[dict[str, object]]:
    """p50/p95 per chunk and p50 per 100-chunk stream for each path, interleaved rounds."""
    xs = np.random.default_rng(7).normal(0, 1, (CHUNKS, 1, 4)).astype(np.float32)
    bare = load_model(path, "onnxruntime", options)
    ort_session = bare.session._session  # type: ignore[attr-defined]  # the ORT session itself
    local = InferenceServer(Path("/nonexistent/unused.sock"))  # not started: the in-process API only
    local.activate(served_stream(path, options, name))
    framed, http = Client(socket_path), Client(socket_path, framed=False)

    def via(predict: Callable[[np.ndarray, str], np.ndarray]) -> Stream:
        def stream(chunk_times: list[float]) -> np.ndarray:
            sid = uuid.uuid4().hex
            y = np.empty(0)
            for x in xs:
                start = time.perf_counter()
                y = predict(x, sid)
                chunk_times.append(time.perf_counter() - start)
            return y

        return stream

    def bare_path(chunk_times: list[float]) -> np.ndarray:
        h = np.zeros((1, 8), np.float32)
        y = h
        for x in xs:
            start = time.perf_counter()
            y, h = ort_session.run(["y", "stateN"], {"x": x, "state": h})
            chunk_times.append(time.perf_counter() - start)
        return np.asarray(y)

    paths: dict[str, Stream] = {
        "bare ORT, state by hand": bare_path,
        "in-process session": via(lambda x, sid: local.predict(x, model=name, session=sid).outputs[0]),
        "socket framed session": via(lambda x, sid: framed.predict(x, model=name, session=sid).outputs["y"]),
        "socket HTTP session": via(lambda x, sid: http.predict(x, model=name, session=sid).outputs["y"]),
    }
    chunks: dict[str, list[float]] = {k: [] for k in paths}
    totals: dict[str, list[float]] = {k: [] for k in paths}
    want = bare_path([])
    for fn in paths.values():  # warm-up, and the correctness check
        got = fn([])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits every path alike
        for key, fn in paths.items():
            for _ in range(streams):
                start = time.perf_counter()
                fn(chunks[key])
                totals[key].append(time.perf_counter() - start)
    framed.close()
    http.close()
    local.close()
    bare.close()
    bare_p50 = float(np.percentile(chunks["bare ORT, state by hand"], 50)) * 1e6
    rows = []
    for key in paths:
        p50, p95 = (float(v) * 1e6 for v in np.percentile(chunks[key], [50, 95]))
        rows.append(
            {
                "path": key,
                "p50": p50,
                "p95": p95,
                "over": p50 - bare_p50,
                "stream_ms": float(np.percentile(totals[key], 50)) * 1e3,
            }
        )
    return rows


def format_streaming(rows: list[dict[str, object]], streams: int, rounds: int) -> str:
    lines = [
        f"Streaming: {CHUNKS} chunks per stream with the state carried, {rounds} rounds x {streams} "
        "streams per path, a new session per stream; the last chunk's outputs equal the bare run's.",
        "",
        "| path | chunk p50 µs | chunk p95 µs | p50 over bare µs | stream of 100 p50 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['over']:+.1f} | {r['stream_ms']:.2f} |"
        )
    return "\n".join(lines)


def write_streaming(table: str, machine: str, ort_version: str, seconds: float, load_start: float) -> None:
    """Append the streaming table to bench/RESULTS.md with the date and the machine."""
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    header = (
        f"\n## Serving: a stateful streaming model (issue 23)\n\nMeasured {date} on a {machine}, Linux, "
        f"Python {platform.python_version()}, onnxruntime {ort_version} (CPU EP, 1 intra-op thread); "
        f"`.venv/bin/python bench/serving.py --streaming-only --write` ({seconds:.0f} s). Model: a "
        f"recurrent cell built with onnx.helper (x 1x4, state 1x8 -> y 1x3, stateN 1x8; "
        f"`stateN -> state` declared), served by an `InferenceServer` in another process. The machine "
        f"is shared with other jobs (1-minute load average {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end).\n\n"
    )
    results = Path(__file__).resolve().parent / "RESULTS.md"
    with results.open("a", encoding="utf-8") as f:
        f.write(header + table + "\n")
