"""``bench``: run every candidate of the device profile on a bundle and print one row each.

Each candidate runs in a fresh process (so its peak RSS is its own, not the sum of the
runtimes loaded before it): load, golden set one sample at a time, acceptance verdict.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.cli.bundle_cmd import add_trust_args
from edgeagent.cli.serve_cmd import add_profile_arg, candidates_for, extracted

if TYPE_CHECKING:  # pydantic models: imported by the handlers, not at --help time
    from devices.profile import Candidate
    from edgeagent.bundle.manifest import Manifest

EPILOG = """\
examples:
  edgeagent bench digits-1.0.0.bundle --trusted /etc/edgeagent/keys/
  edgeagent bench digits-1.0.0.bundle --trusted keys/release.pub --profile rpi4 --json
"""


@dataclass(frozen=True)
class BenchRow:
    candidate: str
    runtime: str
    delegate: str  # the delegate really used (the requested one when it never loaded)
    precision: str
    artifact: str
    load_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    peak_rss_mib: float | None
    verdict: str  # pass, fail: <reason>, or <stage>: <reason> for a candidate that did not load


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark every runtime/delegate candidate on a bundle and print a table",
        description=(
            "Verify the bundle, then for every candidate of the device profile: load it, run the golden "
            "set one sample at a time, and report load time, p50/p95/p99 latency, peak RSS and the "
            "acceptance verdict. Candidates that cannot run say why."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE")
    add_trust_args(parser)
    add_profile_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every candidate in this process (faster; peak RSS is then cumulative)",
    )
    parser.set_defaults(handler=_bench)


def bench_candidate(folder: str, manifest: Manifest, candidate: Candidate, profile: str | None) -> BenchRow:
    """Load ``candidate`` from the extracted bundle in ``folder``, run the golden set, judge it."""
    from edgeagent.acceptance import load_golden, run_acceptance
    from edgeagent.selection import Rejection, load_candidate

    bundle_dir = Path(folder)
    loaded = load_candidate(bundle_dir, manifest, candidate, profile)
    if isinstance(loaded, Rejection):
        return BenchRow(
            str(candidate), candidate.runtime, candidate.delegate, candidate.precision, "-",
            None, None, None, None, None, f"{loaded.stage}: {loaded.reason}",
        )  # fmt: skip
    model, entry, load_ms = loaded
    gate = manifest.acceptance
    try:
        golden = load_golden(bundle_dir / gate.golden) if gate.golden else None
        verdict = run_acceptance(model, gate, golden, profile=profile)
    finally:
        model.close()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return BenchRow(
        candidate=str(candidate),
        runtime=verdict.runtime,
        delegate=verdict.delegate,
        precision=candidate.precision,
        artifact=entry.path,
        load_ms=load_ms,
        p50_ms=verdict.latency.p50_ms,
        p95_ms=verdict.latency.p95_ms,
        p99_ms=verdict.latency.p99_ms,
        peak_rss_mib=peak_mib,
        verdict="pass" if verdict.passed else f"fail: {verdict.reason}",
    )


def _job(args: tuple[str, Manifest, Candidate, str | None]) -> BenchRow:
    return bench_candidate(*args)


def _bench(args: argparse.Namespace) -> int:
    profile, candidates = candidates_for(args.profile)
    with extracted(args.bundle, args) as (verified, folder):
        jobs = [(str(folder), verified.manifest, c, profile) for c in candidates]
        if args.in_process:
            rows = [_job(job) for job in jobs]
        else:
            # A fresh process per candidate: its peak RSS is its own.
            with multiprocessing.get_context("spawn").Pool(processes=1, maxtasksperchild=1) as pool:
                rows = pool.map(_job, jobs, chunksize=1)
    if args.json:
        print(json.dumps({"bundle": verified.manifest.name, "version": verified.manifest.version,
                          "profile": profile, "rows": [asdict(r) for r in rows]}, indent=2))  # fmt: skip
    else:
        print(f"{verified.manifest.name} {verified.manifest.version} on profile {profile}")
        print(format_table(rows))
    return 0


def format_table(rows: list[BenchRow]) -> str:
    """A plain-text table, one row per candidate."""
    header = (
        "runtime",
        "delegate",
        "precision",
        "load ms",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "peak RSS MiB",
        "acceptance",
    )

    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    body = [
        (r.runtime, r.delegate, r.precision, num(r.load_ms, 1),
         num(r.p50_ms), num(r.p95_ms), num(r.p99_ms), num(r.peak_rss_mib, 0), r.verdict)
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        pairs = enumerate(zip(line, widths, strict=False))  # the last column is not padded
        cells = [str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join([*cells, str(line[-1])]))
    return "\n".join(lines)
