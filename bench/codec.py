"""Wire encoding for delivery objects: xz (stdlib lzma) vs zstd, decompression speed and memory.

    python bench/codec.py [--json]            # this machine
    # arm64 under emulation, with the cache scripts/arm64-smoke builds (docs/arm64.md):
    C=.cache/arm64; PY="$C/qemu/usr/bin/qemu-aarch64 -L $C/rootfs $C/rootfs/usr/bin/python3.11"
    QEMU_CPU=cortex-a72 PYTHONPATH=$PWD:$C/deps EDGE_BENCH_CHILD="$PY" $PY bench/codec.py

For each payload (the fixture models, a golden set, and a 90 %-pruned fp32 weight file that
stands for a pruned model), prints the wire size, the decode throughput (best of 5, MB/s of
plain output) and the peak memory a decoding child process adds (KiB: traced allocations for the device's streaming xz
decoder, RSS growth for the one-shot decoders). zstd is measured only
where the ``zstandard`` package imports; a device never has it (Python has no zstd before 3.14).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "models"


def payloads() -> dict[str, bytes]:
    import numpy as np  # not in the decoding child: its import would hide the decoder's peak

    rng = np.random.default_rng(0)
    weights = rng.standard_normal(1 << 20).astype(np.float32)  # 4 MiB of fp32 weights
    weights[rng.random(weights.size) < 0.9] = 0.0  # 90 % pruned
    found = {
        p.name: p.read_bytes() for p in sorted(FIXTURES.glob("*")) if p.suffix in (".onnx", ".tflite", ".npz")
    }
    return {**found, "pruned90_fp32.bin": weights.tobytes()}


def encoders() -> dict[str, tuple]:  # type: ignore[type-arg]
    sys.path.insert(0, str(ROOT))
    from edgeagent.delivery.codec import encode

    found = {"xz-6": (lambda d: encode(d)[1] if encode(d)[0] == "xz" else lzma.compress(d), lzma.decompress)}
    try:
        import zstandard  # type: ignore[import-not-found]

        found["zstd-19"] = (
            lambda d: zstandard.ZstdCompressor(level=19).compress(d),
            lambda w: zstandard.ZstdDecompressor().decompress(w),
        )
    except ImportError:
        pass
    return found


def child(codec: str, path: str) -> None:
    """Decode one file in a fresh process; print the peak RSS it added (KiB)."""
    if codec == "xz-stream":  # what the device runs: 1 MiB chunks, output to a file
        import hashlib

        sys.path.insert(0, str(ROOT))
        from edgeagent.delivery.codec import decode_file

        plain = lzma.decompress(Path(path).read_bytes())
        size, sha = len(plain), hashlib.sha256(plain).hexdigest()
        del plain
        import tracemalloc

        tracemalloc.start()  # liblzma allocates through PyMem_RawMalloc: traced
        target = Path(path + ".out")
        with target.open("wb") as out:
            decode_file(Path(path), out, "xz", size=size, sha256=sha, name=path)
        target.unlink()
        print(tracemalloc.get_traced_memory()[1] // 1024)
        return
    else:
        wire = Path(path).read_bytes()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        encoders()[codec][1](wire)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)  # zstd: malloc, not traced


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    tmp = Path("/tmp/edge-codec-bench")
    tmp.mkdir(exist_ok=True)
    for name, data in payloads().items():
        for codec, (enc, dec) in encoders().items():
            wire = enc(data)
            best = min(_timed(dec, wire) for _ in range(5))
            path = tmp / f"{name}.{codec}"
            path.write_bytes(wire)
            rss = _child_rss(codec, path)
            if codec == "xz-6":
                rows.append(
                    {
                        "payload": name,
                        "codec": "xz-stream",
                        "plain": len(data),
                        "wire": len(wire),
                        "decode_mb_s": None,
                        "peak_rss_kib": _child_rss("xz-stream", path),
                    }
                )
            rows.append(
                {
                    "payload": name,
                    "codec": codec,
                    "plain": len(data),
                    "wire": len(wire),
                    "decode_mb_s": round(len(data) / best / 1e6, 1),
                    "peak_rss_kib": rss,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"# {platform.machine()} {platform.python_version()} {platform.processor() or ''}")
    print(f"{'payload':22} {'codec':8} {'plain':>9} {'wire':>9} {'ratio':>6} {'MB/s':>7} {'+RSS KiB':>9}")
    for r in rows:
        print(
            f"{r['payload']:22} {r['codec']:8} {r['plain']:9} {r['wire']:9} {r['plain'] / r['wire']:6.2f} "
            f"{r['decode_mb_s'] or '-':>7} {r['peak_rss_kib']:9}"
        )


def _child_rss(codec: str, path: Path) -> int:
    # Under emulation the child must be started through qemu too: EDGE_BENCH_CHILD="qemu … python"
    python = os.environ.get("EDGE_BENCH_CHILD", sys.executable).split()
    run = subprocess.run([*python, __file__, "--child", codec, str(path)], capture_output=True, text=True)
    return int(run.stdout) if run.returncode == 0 else -1


def _timed(fn, arg) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
