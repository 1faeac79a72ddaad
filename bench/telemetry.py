"""Telemetry at the fleet's scale, through a local Mosquitto started by this script (issue 6).

    .venv/bin/python bench/telemetry.py [--devices 1000] [--publishers 2] [--seconds 10]
                                        [--rates 1000,2500,5000,7500,10000] [--quick] [--write]

Collector ingest: ``--devices`` simulated devices, spread over ``--publishers`` processes,
publish Telemetry messages (QoS 1, ~1.6 KB each: one model with its latency histogram,
thermal zones, the process/system figures) at a paced total rate for ``--seconds``. The
collector is a real ``edgectl fleet collect`` process; its database rows are counted
against what the publishers had acknowledged. The baseline, in the same run and through
the same broker: the same publishers into a bare paho subscriber (QoS 1, persistent
session, its own process) that only counts. Then an unpaced burst: everything as fast as
the publishers go, the collector draining it.

A rate is *sustained* when every acknowledged message is stored (zero loss) and the
collector has caught up within 2 s of the last publish. The broker runs with
``max_queued_messages 100000`` (Mosquitto's default 1000 drops a QoS 1 backlog past
1000 messages per client; docs/fleet.md). Target: >= 5,000 msg/s sustained.
``--write`` appends the tables to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.transfer import start_broker  # noqa: E402
from edgeagent.histogram import Histogram  # noqa: E402
from edgeagent.protocol import (  # noqa: E402
    ModelTelemetry,
    ProcessTelemetry,
    SpoolTelemetry,
    SystemTelemetry,
    Telemetry,
    Throttling,
    Topics,
)

SEQ_MARK, AT_MARK = 987654321, 1234567890.25  # replaced per message in the payload bytes
SUSTAINED_LAG_S = 2.0


def template(device: str, index: int) -> bytes:
    """One device's telemetry message with the seq and time left as markers."""
    rng = np.random.default_rng(index)
    hist = Histogram()
    for v in rng.lognormal(np.log(0.002), 0.3, 200):
        hist.record(float(v))
    p50, p90, p99, p999 = hist.quantiles((0.5, 0.9, 0.99, 0.999))
    throttling = Throttling(source="raspberrypi", throttled_now=False, flags=0) if index % 3 == 0 else None
    message = Telemetry(
        device=device, seq=SEQ_MARK, at=AT_MARK, interval_s=10.0, groups=[f"site-{index % 20}"], profile="rpi4",
        models=[ModelTelemetry(
            model="default", version="1.1.0", runtime="litert", delegate="xnnpack", count=200, throughput_rps=20.0,
            p50_ms=p50 * 1e3, p90_ms=p90 * 1e3, p99_ms=p99 * 1e3, p999_ms=p999 * 1e3, max_ms=hist.max * 1e3,
            latency_hist=hist.to_dict(), labelled=5, correct=5, online_accuracy=0.97,
            predicted={str(c): int(n) for c, n in enumerate(rng.multinomial(200, [0.1] * 10))}, drift=0.02,
        )],
        acceptance={"default": {"version": "1.1.0", "passed": True, "accuracy": 0.97}},
        process=ProcessTelemetry(rss_mb=61.0, peak_rss_mb=64.0, cpu_percent=3.0, threads=9),
        system=SystemTelemetry(
            mem_total_mb=3800.0, mem_available_mb=2900.0, cpu_percent=21.0, cpu_count=4, load1=0.4, load5=0.3,
            load15=0.2, temperatures_c={"cpu-thermal": 55.0 + index % 10, "gpu-thermal": 51.0},
            throttling=throttling, disk_free_mb=12000.0, disk_total_mb=30000.0,
        ),
        spool=SpoolTelemetry(queued=0, dropped=0, dropped_total=0),
        mqtt={"connects": 1, "disconnects": 0},
    )  # fmt: skip
    return message.model_dump_json().encode()


def publisher(
    port: int, prefix: str, devices: list[str], first: int, rate: float, seconds: float, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    """Publish round-robin over ``devices`` at ``rate`` msg/s for ``seconds`` (``rate`` 0: as fast as
    possible, one message per device per round, ``seconds`` rounds); report (sent, acked, first and
    last publish as Unix times)."""
    topics = Topics(prefix)
    parts = [
        (topics.telemetry(d), template(d, first + i).split(str(SEQ_MARK).encode()))
        for i, d in enumerate(devices)
    ]
    acked = [0]
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{prefix}-{first}-{os.getpid()}")
    client.on_publish = lambda *_a: acked.__setitem__(0, acked[0] + 1)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    total = int(rate * seconds) if rate else int(seconds) * len(devices)
    began = time.time()
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = total if not rate else min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            topic, (head, tail) = parts[sent % len(parts)]
            seq = 1 + sent // len(parts)
            at = str(time.time()).encode()
            client.publish(
                topic, head + str(seq).encode() + tail.replace(str(AT_MARK).encode(), at, 1), qos=1
            )
            sent += 1
        if rate:
            time.sleep(0.002)
    ended = time.time()
    deadline = time.monotonic() + 60
    while acked[0] < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    client.loop_stop()
    client.disconnect()
    out.put((sent, acked[0], began, ended))


def bare_subscriber(port: int, prefix: str, count: Synchronized, ready: mp.Event) -> None:  # type: ignore[type-arg]
    def on_message(_c: object, _u: object, _m: object) -> None:
        count.value += 1  # one writer (this process's network thread): no lock needed

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{prefix}", clean_session=False)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: ready.set()
    client.connect("127.0.0.1", port)
    client.subscribe(Topics(prefix).all_devices("telemetry"), qos=1)
    client.loop_forever()


@dataclass
class Step:
    rate: float  # offered msg/s; 0 = unpaced burst
    published: int = 0  # acknowledged by the broker
    publish_s: float = 0.0  # first to last publish
    received: int = 0
    receive_s: float = 0.0  # first publish to the last message counted
    lag_s: float = 0.0  # last publish to the last message counted
    cpu: float = 0.0  # receiver CPU seconds / receive_s (fraction of one core)

    @property
    def lost(self) -> int:
        return self.published - self.received

    @property
    def sustained(self) -> bool:
        return self.lost == 0 and self.lag_s <= SUSTAINED_LAG_S

    @property
    def throughput(self) -> float:
        return self.received / self.receive_s if self.receive_s else 0.0


Receivers = psutil.Process | list[psutil.Process] | Callable[[], list[psutil.Process]]


def tree_cpu(receivers: Receivers) -> float:
    """CPU seconds (user + system) of the receiving processes and their children (a collector's
    receiver); a callable gives the processes of the moment (a collector that was restarted)."""
    if callable(receivers) and not isinstance(receivers, psutil.Process):
        receivers = receivers()
    total = 0.0
    for proc in receivers if isinstance(receivers, list) else [receivers]:
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += sum(p.cpu_times()[:2])
    return total


def tree_rss_mb(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def run_step(port: int, prefix: str, devices: list[str], publishers: int, rate: float, seconds: float,
             counted: Callable[[], int], receiver: Receivers) -> Step:  # fmt: skip
    """Publish; watch ``counted()`` until it reaches what was acknowledged or stops moving for 5 s."""
    step = Step(rate)
    before = counted()
    cpu0 = tree_cpu(receiver)
    results: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    chunks = [devices[i::publishers] for i in range(publishers)]
    procs = [mp.Process(target=publisher, args=(port, prefix, chunk, i * len(chunk), rate / publishers, seconds,
                                                results)) for i, chunk in enumerate(chunks)]  # fmt: skip
    for p in procs:
        p.start()
    outcomes: list[tuple[int, int, float, float]] = []
    last, last_change, cpu_at_change = 0, time.time(), cpu0
    while len(outcomes) < len(procs) or (
        last < sum(o[1] for o in outcomes) and time.time() - last_change < 5
    ):
        with contextlib.suppress(queue.Empty):
            outcomes.append(results.get(timeout=0.02))
        now = counted() - before
        if now != last:
            last, last_change, cpu_at_change = now, time.time(), tree_cpu(receiver)
    for p in procs:
        p.join()
    began, ended = min(o[2] for o in outcomes), max(o[3] for o in outcomes)
    step.published = sum(o[1] for o in outcomes)
    step.publish_s = ended - began
    step.received = last
    step.receive_s = max(last_change - began, 1e-9)
    step.lag_s = max(0.0, last_change - ended)
    step.cpu = (cpu_at_change - cpu0) / step.receive_s
    return step


def ingest_section(args: argparse.Namespace, workdir: Path) -> str:
    devices = [f"dev-{i:05d}" for i in range(args.devices)]
    broker, port = start_broker(workdir, "max_queued_messages 100000\n")
    try:
        # Baseline: the bare subscriber, alone on the broker.
        count = mp.Value("q", 0, lock=False)
        ready = mp.Event()
        bare = mp.Process(target=bare_subscriber, args=(port, "raw", count, ready), daemon=True)
        bare.start()
        ready.wait(10)
        bare_steps = [run_step(port, "raw", devices, args.publishers, r, args.seconds, lambda: count.value,
                               psutil.Process(bare.pid)) for r in args.rates]  # fmt: skip
        bare_burst = run_step(port, "raw", devices, args.publishers, 0, args.burst_rounds, lambda: count.value,
                              psutil.Process(bare.pid))  # fmt: skip
        bare.terminate()
        bare.join()
        # The collector, alone on the broker.
        db = workdir / "fleet.db"
        collector = subprocess.Popen(
            [str(Path(sys.executable).parent / "edgectl"), "fleet", "collect", "--broker", f"mqtt://127.0.0.1:{port}",
             "--db", str(db), "--prefix", "bench", "--client-id", "bench-collector", "--stats-every", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert collector.stdout is not None
            collector.stdout.readline()
            while not db.exists():
                time.sleep(0.05)
            reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)

            def rows() -> int:
                return int(reader.execute("SELECT count(*) FROM telemetry").fetchone()[0])

            # Let the subscription settle: a first round must arrive before anything is timed.
            run_step(port, "bench", devices[:10], 1, 100, 0.5, rows, psutil.Process(collector.pid))
            proc = psutil.Process(collector.pid)
            steps = []
            for r in args.rates:
                # Fresh seqs for every step: the collector would rightly drop repeats as duplicates.
                steps.append(run_step(port, "bench", [f"{d}-r{int(r)}" for d in devices], args.publishers, r,
                                      args.seconds, rows, proc))  # fmt: skip
            burst = run_step(port, "bench", [f"{d}-burst" for d in devices], args.publishers, 0, args.burst_rounds,
                             rows, proc)  # fmt: skip
            rss_mb = tree_rss_mb(proc)
        finally:
            collector.send_signal(signal.SIGTERM)
            final = collector.communicate(timeout=60)[0].strip().splitlines()
        db_mb = sum(f.stat().st_size for f in workdir.glob("fleet.db*")) / 1e6
        stored_rows = rows()
    finally:
        broker.terminate()
        broker.wait()
    return format_ingest(args, steps, bare_steps, burst, bare_burst, rss_mb, db_mb, stored_rows, final[-1])


def format_ingest(args: argparse.Namespace, steps: list[Step], bare: list[Step], burst: Step, bare_burst: Step,
                  rss_mb: float, db_mb: float, stored_rows: int, final: str) -> str:  # fmt: skip
    lines = [
        "| offered msg/s | published | bare: received | bare: lost | bare: lag s | bare: CPU | collector: stored | "
        "collector: lost | collector: lag s | collector: CPU | sustained |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for b, c in zip(bare, steps, strict=True):
        lines.append(
            f"| {c.rate:,.0f} | {c.published:,} | {b.received:,} | {b.lost:,} | {b.lag_s:.2f} | {b.cpu:.0%} | "
            f"{c.received:,} | {c.lost:,} | {c.lag_s:.2f} | {c.cpu:.0%} | {'yes' if c.sustained else '**no**'} |"
        )
    lines.append(
        f"| unpaced burst | {burst.published:,} | {bare_burst.received:,} in {bare_burst.receive_s:.1f} s = "
        f"**{bare_burst.throughput:,.0f}/s** | {bare_burst.lost:,} | {bare_burst.lag_s:.2f} | {bare_burst.cpu:.0%} | "
        f"{burst.received:,} in {burst.receive_s:.1f} s = **{burst.throughput:,.0f}/s** | {burst.lost:,} | "
        f"{burst.lag_s:.2f} | {burst.cpu:.0%} | |"
    )
    best = max((c.rate for c in steps if c.sustained), default=0.0)
    verdict = "met" if best >= 5000 else "**not met**"
    lines.append(
        "\nCPU: of one core (100% = one core busy), the receiving process(es) only, from the first publish "
        "to the last message counted; the collector's is its two processes together."
    )
    return "\n".join(lines) + (
        f"\n\nSustained with zero loss: **{best:,.0f} msg/s** offered (target >= 5,000 msg/s: {verdict}); "
        f"{len(args.rates)} rates x {args.seconds:.0f} s, {args.devices:,} device ids over {args.publishers} "
        f"publisher processes on the same machine. The collector's RSS at the end (both processes): "
        f"{rss_mb:.0f} MB; database "
        f"{db_mb:.0f} MB for {stored_rows:,} telemetry rows (about {db_mb * 1e6 / max(stored_rows, 1):,.0f} bytes "
        f"a message with its model row and indexes). Its last line: `{final}`"
    )


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")  # fmt: skip
    return f"{os.cpu_count()}-core {platform.machine()} VM ({cpu}), Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000, help="simulated device ids (default 1000)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per offered rate (default 10)")
    parser.add_argument("--rates", default="1000,2500,5000,7500,10000", help="offered msg/s, comma-separated")
    parser.add_argument(
        "--burst-rounds", type=int, default=20, help="messages per device in the burst (default 20)"
    )
    parser.add_argument("--quick", action="store_true", help="one rate (5,000/s) for 3 s: a smoke run")
    parser.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument(
        "--scaleout",
        action="store_true",
        help="also SQLite vs PostgreSQL, 1/2/4 collectors and kill -9 (bench/telemetry_scaleout.py)",
    )
    parser.add_argument(
        "--scaleout-rates", default="1000,2000,3000,4000", help="offered msg/s for --scaleout"
    )
    parser.add_argument("--scaleout-seconds", type=float, default=4.0, help="seconds per rate for --scaleout")
    parser.add_argument("--skip-ingest", action="store_true", help="only the --scaleout section")
    args = parser.parse_args()
    args.scaleout_rates = [float(r) for r in args.scaleout_rates.split(",")]
    args.rates = [5000.0] if args.quick else [float(r) for r in args.rates.split(",")]
    if args.quick:
        args.seconds, args.burst_rounds = 3.0, 5
    started, load = time.time(), os.getloadavg()[0]
    sections: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"collector ingest: {args.devices} devices, rates {args.rates} msg/s, {args.seconds:.0f} s each ...",
              flush=True)  # fmt: skip
        if not args.skip_ingest:
            sections.append(("Collector ingest", ingest_section(args, Path(tmp))))
    if args.scaleout:
        from bench.telemetry_scaleout import scaleout_section

        # Not under /tmp's root-only folders: the PostgreSQL server runs as nobody.
        with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
            Path(tmp).chmod(0o755)
            sections.append(("Collectors that scale out (issue 21)", scaleout_section(args, Path(tmp))))
    # Further sections (the agent's own CPU and memory cost of telemetry) append
    # (title, markdown) to `sections` here; printing and --write handle them all.
    body = "\n\n".join(f"### {title}\n\n{text}" for title, text in sections)
    print(body)
    if args.write:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
        header = (
            f"\n## Telemetry collector{' scale-out (issue 21)' if args.skip_ingest else ' (issue 6)'}\n\n"
            f"Measured {date} on a {machine()}; `.venv/bin/python bench/telemetry.py {' '.join(sys.argv[1:])}` "
            f"({time.time() - started:.0f} s). Publishers, broker (Mosquitto) and "
            f"receiver share this machine, which other jobs share too (1-minute load average {load:.2f} at the "
            f"start, {os.getloadavg()[0]:.2f} at the end). Messages ~1.6 KB (one model with its latency "
            f"histogram). Lag: from the last acknowledged publish to the last message counted.\n\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write(header + body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
