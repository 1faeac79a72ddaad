"""Serving overhead: bare runtime call vs the in-process API vs the agent's Unix socket.

    .venv/bin/python bench/serving.py [--quick] [--write]

One run, same machine, same models, same ONNX Runtime options (1 intra-op thread):

* **bare**: ``onnxruntime.InferenceSession.run`` on a ready input dict;
* **in-process**: ``InferenceServer.predict`` (validation, quantized I/O, stats, prediction id);
* **socket framed**: ``edgeagent.client.Client.predict`` (its default: binary frames) to an
  ``InferenceServer`` in another process, over a keep-alive Unix socket connection;
* **socket HTTP**: the same with ``Client(framed=False)``: HTTP/1.1 with ``.npy`` bodies, as curl
  or another language would send (and JSON bodies for the tiny model too);
* **raw socket floor**: the least any socket path costs on this machine: length-prefixed raw
  float32 bytes (one ``recv`` per side when the message fits) to a bare
  ``InferenceSession.run`` in the same server process.

Two models: the tiny digits MLP fixture (``mlp.onnx``, ~10 µs) and a small image CNN built
here with ``onnx.helper`` whose bare p50 is over 1 ms. Then requests/s through the socket (framed
and HTTP) with 1, 2 and 8 concurrent client processes. ``--write`` appends the table to
``bench/RESULTS.md``.

``--large``: 0.1-20 MB image-sized tensors instead (raw socket floor, frames, shared memory;
see ``bench/serving_large.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import serving_large  # noqa: E402
from bench.streaming import (  # noqa: E402
    build_stream_model,
    format_streaming,
    served_stream,
    streaming_rows,
    write_streaming,
)
from edgeagent.client import Client  # noqa: E402
from edgeagent.runtimes import LoadOptions, load_model  # noqa: E402
from edgeagent.serving import InferenceServer, ServedModel  # noqa: E402

OPTIONS = LoadOptions(delegate="CPUExecutionProvider", threads=1)
TINY = ROOT / "tests" / "fixtures" / "models" / "mlp.onnx"
SHAPES = {"tiny": (64,), "large": (3, 32, 32)}  # one sample's input shape
LARGE_SHAPE = SHAPES["large"]


def build_large_cnn(path: Path, channels: int = 64, seed: int = 0) -> Path:
    """A small image CNN (onnx.helper, random weights): 3x32x32 -> 3 conv3x3 (ReLU) -> GAP -> 10.

    Compute-bound (~80 M multiply-adds per image, weights in cache), so its latency is stable
    and the request body is a realistic 12 KiB image.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, c_in = "input", 3
    for i in range(3):
        w = (rng.standard_normal((channels, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(channels, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, c_in = f"r{i}", channels
    fc = (rng.standard_normal((channels, 10)) / np.sqrt(channels)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "large_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *LARGE_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def serve(socket_path: str, tiny: str, large: str) -> None:
    """The server process: both models, until stdin closes; plus the raw-socket floor."""
    server = InferenceServer(Path(socket_path))
    server.activate(ServedModel("tiny", load_model(Path(tiny), "onnxruntime", OPTIONS), "tiny", "1.0.0"))
    server.activate(ServedModel("large", load_model(Path(large), "onnxruntime", OPTIONS), "large", "1.0.0"))
    server.activate(served_stream(Path(large).with_name("stream.onnx"), OPTIONS))
    server.start()
    floor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    floor.bind(socket_path + ".floor")
    floor.listen(8)
    threading.Thread(target=_floor_accept, args=(floor, tiny, large), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    server.close()


def _floor_accept(listener: socket.socket, tiny: str, large: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_floor_serve, args=(conn, tiny, large), daemon=True).start()


def _floor_serve(conn: socket.socket, tiny: str, large: str) -> None:
    """The least a socket path can cost: length-prefixed raw float32 in, bare ORT run, raw bytes out."""
    sessions = {}
    for index, path in enumerate((tiny, large)):
        sessions[index] = load_model(Path(path), "onnxruntime", OPTIONS).session._session  # type: ignore[attr-defined]
    with conn:
        while True:
            message = _recv_message(conn, 8)
            if not message:
                return
            index = struct.unpack_from("<I", message, 4)[0]
            shape = SHAPES["tiny" if index == 0 else "large"]
            x = np.frombuffer(message, np.float32, offset=8).reshape(-1, *shape)
            out = sessions[index].run(None, {"input": x})[0].tobytes()
            conn.sendall(struct.pack("<I", len(out)) + out)


def _recv_message(conn: socket.socket, head: int) -> bytes:
    """One message: ``head`` bytes starting with a u32 size of what follows; one recv when it fits."""
    data = conn.recv(65536)
    if not data:
        return b""
    while len(data) < 4:
        data += conn.recv(65536)
    total = head + struct.unpack_from("<I", data)[0]
    while len(data) < total:
        chunk = conn.recv(total - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


class FloorClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def predict(self, x: np.ndarray) -> np.ndarray:
        index = 0 if x.shape[1:] == SHAPES["tiny"] else 1
        self.sock.sendall(struct.pack("<II", x.nbytes, index) + x.tobytes())
        return np.frombuffer(_recv_message(self.sock, 4), np.float32, offset=4)


def timed(fn, n: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1e6  # µs


def latency_rows(
    name: str,
    path: Path,
    x: np.ndarray,
    clients: tuple[Client, Client],
    floor: FloorClient,
    n: int,
    rounds: int,
) -> list[dict[str, object]]:
    model = load_model(path, "onnxruntime", OPTIONS)
    bare_session = model.session._session  # type: ignore[attr-defined]  # the ORT session itself
    feed = {"input": x}
    local = InferenceServer(Path("/nonexistent/unused.sock"))  # not started: the in-process API only
    local.activate(ServedModel(name, load_model(path, "onnxruntime", OPTIONS), name, "1.0.0"))
    framed, http = clients
    paths = {
        "bare ORT run": lambda: bare_session.run(None, feed),
        "in-process API": lambda: local.predict(x),
        "raw socket floor": lambda: floor.predict(x),
        "socket framed": lambda: framed.predict(x, model=name),
        "socket HTTP (.npy)": lambda: http.predict(x, model=name),
    }
    if name == "tiny":
        paths["socket HTTP (JSON)"] = lambda: http.predict(x, model=name, binary=False)
    samples: dict[str, list[np.ndarray]] = {k: [] for k in paths}
    for fn in paths.values():
        timed(fn, max(50, n // 10))  # warm-up
    for _ in range(rounds):  # interleaved rounds, so drift on a shared machine hits every path alike
        for key, fn in paths.items():
            samples[key].append(timed(fn, n))
    bare_p50 = float(np.percentile(np.concatenate(samples["bare ORT run"]), 50))
    rows = []
    for key, parts in samples.items():
        values = np.concatenate(parts)
        p50, p95 = (float(v) for v in np.percentile(values, [50, 95]))
        rows.append(
            {
                "model": name,
                "path": key,
                "p50": p50,
                "p95": p95,
                "over": p50 - bare_p50,
                "ratio": p50 / bare_p50,
            }
        )
    local.close()
    model.close()
    return rows


def _client_worker(args: tuple[str, str, int, float, float, bool]) -> int:
    socket_path, model, batch, start_at, duration, framed = args
    x = np.random.default_rng(0).random((batch, *SHAPES[model]), dtype=np.float32)
    count = 0
    with Client(socket_path, framed=framed) as client:
        client.predict(x, model=model)
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + duration
        while time.time() < end:
            client.predict(x, model=model)
            count += 1
    return count


def throughput(
    socket_path: str, model: str, batch: int, clients: int, duration: float, framed: bool
) -> float:
    start_at = time.time() + 1.5  # every client process connected and warm before the clock starts
    jobs = [(socket_path, model, batch, start_at, duration, framed)] * clients
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        counts = pool.map(_client_worker, jobs)
    return sum(counts) / duration


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = multiprocessing.cpu_count()
    return f"{cores}-core {platform.machine()} VM, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument(
        "--streaming-only", action="store_true", help="only the streaming case (100 chunks, state carried)"
    )
    parser.add_argument("--large", action="store_true", help="0.1-20 MB tensors: socket vs shared memory")
    parser.add_argument("--serve", nargs=3, metavar=("SOCKET", "TINY", "LARGE"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-large", nargs=2, metavar=("SOCKET", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    if args.serve_large:
        server = serving_large.serve(*args.serve_large, OPTIONS)
        print("ready", flush=True)
        sys.stdin.read()
        server.close()
        return
    if args.large:
        main_large(args.quick, args.write)
        return
    import onnxruntime

    started = time.time()
    load_start = os.getloadavg()[0]
    n_tiny, n_large, rounds, duration = (300, 40, 2, 1.0) if args.quick else (2000, 200, 3, 4.0)
    with tempfile.TemporaryDirectory() as tmp:
        large = build_large_cnn(Path(tmp) / "large_cnn.onnx")
        stream = build_stream_model(Path(tmp) / "stream.onnx")
        streams = (5, 2) if args.quick else (20, 3)
        sock = str(Path(tmp) / "agent.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", sock, str(TINY), str(large)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            rng = np.random.default_rng(0)
            x_tiny = rng.random((1, 64), dtype=np.float32)
            x_large = rng.random((1, *LARGE_SHAPE), dtype=np.float32)
            stream_rows = streaming_rows(stream, OPTIONS, sock, "stream", *streams)
            if args.streaming_only:
                rows, rps = [], {}
                raise _Done
            floor = FloorClient(sock + ".floor")
            with Client(sock) as framed, Client(sock, framed=False) as http:
                rows = latency_rows("tiny", TINY, x_tiny, (framed, http), floor, n_tiny, rounds)
                rows += latency_rows("large", large, x_large, (framed, http), floor, n_large, rounds)
            floor.sock.close()
            rps = {
                (model, wire, c): throughput(sock, model, 1, c, duration, wire == "framed")
                for model in ("tiny", "large")
                for wire in ("framed", "HTTP")
                for c in (1, 2, 8)
            }
        except _Done:
            pass
        finally:
            if server.stdin:
                server.stdin.close()
            server.wait(timeout=30)
    streaming = format_streaming(stream_rows, *streams)
    table = streaming if args.streaming_only else format_tables(rows, rps) + "\n\n" + assessment(rows)
    if not args.streaming_only:
        table += "\n\n" + streaming
    if args.streaming_only:
        print(table)
        if args.write:
            write_streaming(table, machine(), onnxruntime.__version__, time.time() - started, load_start)
        return
    print(table)
    if args.write:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
        header = (
            f"\n## Serving (issue 4)\n\nMeasured {date} on a {machine()}, Linux, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__} (CPU EP, 1 intra-op thread); "
            f"`.venv/bin/python bench/serving.py --write` ({time.time() - started:.0f} s). Models: `tiny` = "
            f"the digits MLP fixture (64→32→10); `large` = a 3×32×32 image CNN built with onnx.helper "
            f"(3 conv 3×3 ×64 + ReLU, global pooling, dense 10; 12 KiB request); batch 1 for both. Bare = `InferenceSession.run`; in-process = "
            f"`InferenceServer.predict`; socket = `edgeagent.client.Client` → server in another process "
            f"(keep-alive Unix socket; framed = the client's default binary frames, HTTP = `framed=False`). Latency: {rounds} interleaved rounds of {n_tiny} (tiny) / "
            f"{n_large} (large) sequential calls after warm-up; overhead = p50 − bare p50. Throughput: "
            f"client processes each sending back-to-back requests for {duration:.0f} s. The machine is "
            f"shared with other jobs (1-minute load average {load_start:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end), so these numbers move by tens of µs from run to run; "
            f"the floor row measures the machine's own share.\n\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(header + table + "\n")


class _Done(Exception):
    """--streaming-only: the streaming rows are in, skip the rest (the server still closes)."""


def main_large(quick: bool, write: bool) -> None:
    import onnxruntime

    started, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = serving_large.build_scale_model(Path(tmp) / "scale.onnx")
        sock = str(Path(tmp) / "agent.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-large", sock, str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            rows = serving_large.measure(sock, model, OPTIONS, quick, timed)
        finally:
            if server.stdin:
                server.stdin.close()
            server.wait(timeout=30)
    text = serving_large.table(rows) + "\n\n" + serving_large.assessment(rows)
    print(text)
    if write:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
        header = (
            f"\n## Serving large tensors (issue 15)\n\nMeasured {date} on a {machine()}, Linux, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__} (CPU EP, 1 intra-op thread); "
            f"`.venv/bin/python bench/serving.py --large --write` ({time.time() - started:.0f} s); "
            f"1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.\n\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(header + text + "\n")


def assessment(rows: list[dict[str, object]]) -> str:
    """The issue's targets against this run, and how much of the overhead the socket itself costs."""
    p50 = {(str(r["model"]), str(r["path"])): float(r["p50"]) for r in rows}  # type: ignore[arg-type]
    bare_t, bare_l = p50[("tiny", "bare ORT run")], p50[("large", "bare ORT run")]
    floor_t = p50[("tiny", "raw socket floor")] - bare_t
    floor_l = p50[("large", "raw socket floor")] - bare_l

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = []
    for wire in ("socket framed", "socket HTTP (.npy)"):
        over_t = p50[("tiny", wire)] - bare_t
        ratio_l = p50[("large", wire)] / bare_l
        lines.append(
            f"{wire}: ≤ 100 µs over the bare call at p50 — {over_t:.0f} µs, {met(over_t <= 100)}; "
            f"ratio ≤ 1.10 for a model whose bare p50 ≥ 1 ms — {ratio_l:.3f} at {bare_l / 1e3:.2f} ms, "
            f"{met(ratio_l <= 1.10 and bare_l >= 1000)}; the agent's layer over the raw socket floor: "
            f"{p50[('tiny', wire)] - p50[('tiny', 'raw socket floor')]:.0f} µs (tiny), "
            f"{p50[('large', wire)] - p50[('large', 'raw socket floor')]:.0f} µs (large)."
        )
    lines.append(
        f"The raw socket floor (length-prefixed bytes to a bare run in the same server process, no "
        f"validation) costs {floor_t:.0f} µs (tiny) and {floor_l:.0f} µs (large) over the bare call on this "
        f"machine. The in-process API adds {p50[('tiny', 'in-process API')] - bare_t:.1f} µs (tiny)."
    )
    return "Targets, " + "\n\n".join(lines)


def format_tables(rows: list[dict[str, object]], rps: dict[tuple[str, str, int], float]) -> str:
    lines = [
        "| model | path | p50 µs | p95 µs | p50 over bare µs | p50 ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['over']:+.1f} | {r['ratio']:.3f} |"
        )
    lines += [
        "",
        "| model | wire | 1 client req/s | 2 clients req/s | 8 clients req/s |",
        "|---|---|---:|---:|---:|",
    ]
    for model in ("tiny", "large"):
        for wire in ("framed", "HTTP"):
            lines.append(
                f"| {model} | {wire} | "
                + " | ".join(f"{rps[(model, wire, c)]:,.0f}" for c in (1, 2, 8))
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
