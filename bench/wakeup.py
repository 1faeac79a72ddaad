"""Why the HTTP path costs more than its CPU: the price of a client pausing between requests.

    .venv/bin/python bench/wakeup.py [--quick] [--write]

``bench/serving.py`` found the HTTP client ~40-50 µs slower per round trip than the framed
one, although the server does the same work for both (its system calls are identical: one
``recvfrom`` and one ``sendto`` per request) and the HTTP client spends only ~8-10 µs more CPU.
This script separates the two effects, in one run against one agent server process
(the tiny digits MLP, ONNX Runtime, 1 thread):

1. **client CPU per request** (``time.thread_time``) of ``Client.predict`` framed and HTTP,
   against the real server;
2. **round trip vs the client's pause**: the same pre-encoded predict frame sent over a raw
   socket, back to back, with the client busy for G µs between a reply and the next request
   (G = 0, 5, 10, 20, 40, 80, 160). No client-library code runs inside the timed part, so
   any change with G is the machine's: how fast a sleeping server thread (and its CPU) is
   woken, which depends on how long it has been idle.

``--write`` appends the tables to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import machine, timed  # noqa: E402  (bench/serving.py: this folder is on sys.path)

from edgeagent.client import Client  # noqa: E402
from edgeagent.runtimes import LoadOptions, load_model  # noqa: E402
from edgeagent.serving import InferenceServer, ServedModel, frames  # noqa: E402

OPTIONS = LoadOptions(delegate="CPUExecutionProvider", threads=1)
TINY = ROOT / "tests" / "fixtures" / "models" / "mlp.onnx"
GAPS_US = (0, 5, 10, 20, 40, 80, 160)


def serve(socket_path: str) -> None:
    """The server process: the tiny model until stdin closes."""
    server = InferenceServer(Path(socket_path))
    server.activate(ServedModel("tiny", load_model(TINY, "onnxruntime", OPTIONS), "tiny", "1.0.0"))
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.close()


def busy(seconds: float) -> None:
    # Spin rather than sleep: the client stays on its CPU, as an application computing would.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def round_trips(sock: socket.socket, frame: bytes, gap_s: float, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        busy(gap_s)
        start = time.perf_counter()
        sock.sendall(frame)
        reply = sock.recv(65536)
        out[i] = time.perf_counter() - start
        if len(reply) < 8:
            raise RuntimeError("short reply")
    return out * 1e6


def client_cpu_us(client: Client, x: np.ndarray, n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        client.predict(x, model="tiny")
    return (time.thread_time() - start) / n * 1e6


def client_p50_us(client: Client, x: np.ndarray, n: int) -> float:
    return float(np.percentile(timed(lambda: client.predict(x, model="tiny"), n), 50))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    n, rounds = (300, 2) if args.quick else (2000, 5)
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sock_path = str(Path(tmp) / "agent.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", sock_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            cpu: dict[str, list[float]] = {"framed": [], "HTTP": []}
            p50: dict[str, list[float]] = {"framed": [], "HTTP": []}
            trips: dict[int, list[np.ndarray]] = {g: [] for g in GAPS_US}
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(sock_path)
            raw.sendall(frames.PREFACE)
            frame = frames.encode_predict("tiny", [""], [x], False)
            with Client(sock_path) as framed, Client(sock_path, framed=False) as http:
                clients = {"framed": framed, "HTTP": http}
                for c in clients.values():
                    client_p50_us(c, x, 100)  # warm-up
                round_trips(raw, frame, 0, 100)
                for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
                    for wire, c in clients.items():
                        cpu[wire].append(client_cpu_us(c, x, n))
                        p50[wire].append(client_p50_us(c, x, n))
                    for gap in GAPS_US:
                        trips[gap].append(round_trips(raw, frame, gap / 1e6, n))
            raw.close()
        finally:
            if server.stdin:
                server.stdin.close()
            server.wait(timeout=30)
    table = format_tables(cpu, p50, trips)
    print(table)
    if args.write:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
        header = (
            f"\n## Serving: the client's pause and the server's wake-up (issue 4)\n\n"
            f"Measured {date} on a {machine()}, Linux, Python {platform.python_version()}; "
            f"`.venv/bin/python bench/wakeup.py --write` ({time.time() - started:.0f} s); {rounds} "
            f"interleaved rounds of {n} requests per row; tiny digits MLP, ONNX Runtime CPU, 1 thread.\n\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(header + table + "\n")


def format_tables(
    cpu: dict[str, list[float]], p50: dict[str, list[float]], trips: dict[int, list[np.ndarray]]
) -> str:
    lines = [
        "| client | client CPU µs / request | round trip p50 µs |",
        "|---|---:|---:|",
    ]
    for wire in cpu:
        lines.append(f"| {wire} | {np.median(cpu[wire]):.1f} | {np.median(p50[wire]):.1f} |")
    lines += [
        "",
        "| client busy between requests µs | raw framed round trip p50 µs | over back-to-back µs |",
        "|---:|---:|---:|",
    ]
    base = float(np.percentile(np.concatenate(trips[0]), 50))
    for gap, parts in trips.items():
        value = float(np.percentile(np.concatenate(parts), 50))
        lines.append(f"| {gap} | {value:.1f} | {value - base:+.1f} |")
    extra_cpu = np.median(cpu["HTTP"]) - np.median(cpu["framed"])
    extra_p50 = np.median(p50["HTTP"]) - np.median(p50["framed"])
    lines += [
        "",
        f"The HTTP client spends {extra_cpu:.1f} µs more CPU per request than the framed one and its "
        f"round trip is {extra_p50:.1f} µs longer. Where the second table's round trip grows with the "
        "pause although nothing in it changed, the difference is the machine waking a thread (and a CPU) "
        "that had gone idle: a client that does its own work between predictions (every real application) pays "
        "it whichever wire it speaks, and the back-to-back figures of bench/serving.py are the "
        "best case.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
