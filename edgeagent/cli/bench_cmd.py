"""``bench``: run every candidate of the device profile on a bundle and print one row each.

Each candidate runs in a fresh process (so its peak RSS is its own, not the sum of the
runtimes loaded before it): load, golden set one sample at a time, acceptance verdict
against the artifact's own gate, as a device judges it. A candidate with several artifacts
of its kind gets one row per artifact. Whatever goes wrong there (an error, a crash, a run
past ``--timeout``) is that row's verdict (:mod:`edgeagent.cli.isolated`); the exit status
is 1 when none ran.
"""

from __future__ import annotations

import argparse
import json
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.cli.bundle_cmd import add_trust_args
from edgeagent.cli.isolated import one_line, run_isolated
from edgeagent.cli.profile_args import add_profile_args, candidates_for
from edgeagent.cli.serve_cmd import extracted
from edgeagent.errors import EdgeError

# Per candidate: load + golden set. A TensorRT engine build on a Jetson Nano takes minutes
# for a mid-sized model, so the default leaves room for that and still ends a hang.
DEFAULT_TIMEOUT_S = 600.0

if TYPE_CHECKING:  # pydantic models: imported by the handlers, not at --help time
    from devices.profile import Candidate
    from edgeagent.bundle.manifest import Manifest

EPILOG = """\
examples:
  edgeagent bench digits-1.0.0.bundle --trusted /etc/edgeagent/keys/
  edgeagent bench digits-1.0.0.bundle --trusted keys/release.pub --profile rpi4 --json
  edgeagent bench face-1.0.0.bundle --trusted keys/ --profile-file ./myboard.toml --precision fp16,fp32
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
    # pass, fail: <reason>, <stage>: <reason> for a candidate that did not load, or
    # error: <reason> for one whose run raised, crashed or timed out
    verdict: str


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark every runtime/delegate candidate on a bundle and print a table",
        description=(
            "Verify the bundle, then for every candidate of the device profile: load it, run the golden "
            "set one sample at a time, and report load time, p50/p95/p99 latency, peak RSS and the "
            "acceptance verdict. Candidates that cannot run say why; exit status 1 when none ran."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE")
    add_trust_args(parser)
    add_profile_args(parser)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every candidate in this process (faster; peak RSS is then cumulative; no --timeout)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up on a candidate after this long and kill its process (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.set_defaults(handler=_bench)


def bench_candidate(
    folder: str, manifest: Manifest, candidate: Candidate, profile: str | None, artifact: str | None = None
) -> BenchRow:
    """Load ``candidate`` (with ``artifact``, else its first) from ``folder``; judge it on the golden set."""
    from edgeagent.acceptance import load_golden, run_acceptance
    from edgeagent.protocol import Rejection
    from edgeagent.selection import load_candidate
    from edgeagent.state import StateCarrier

    bundle_dir = Path(folder)
    entry = next((m for m in manifest.models if m.path == artifact), None)
    loaded = load_candidate(bundle_dir, manifest, candidate, profile, entry)
    if isinstance(loaded, Rejection):
        return BenchRow(
            str(candidate), candidate.runtime, candidate.delegate, candidate.precision,
            loaded.artifact or "-", None, None, None, None, None, f"{loaded.stage}: {loaded.reason}",
        )  # fmt: skip
    model, entry, load_ms = loaded
    gate = manifest.gate_for(entry)  # the artifact's own gate, as selection applies it
    try:
        golden = load_golden(bundle_dir / gate.golden) if gate.golden else None
        state = StateCarrier.for_model(entry, model, bundle_dir)
        verdict = run_acceptance(model, gate, golden, profile=profile, state=state)
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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


_Job = tuple[str, "Manifest", "Candidate", str | None, str | None]  # quoted: imported for typing only


def _job(*job: Any) -> dict[str, Any]:
    # Plain data crosses the process boundary: nothing here depends on unpickling our classes.
    return asdict(bench_candidate(*job))


def _error_row(candidate: Candidate, artifact: str | None, reason: str) -> BenchRow:
    return BenchRow(
        str(candidate), candidate.runtime, candidate.delegate, candidate.precision, artifact or "-",
        None, None, None, None, None, f"error: {reason}",
    )  # fmt: skip


def run_candidates(jobs: list[_Job], *, in_process: bool, timeout_s: float) -> list[BenchRow]:
    """One row per job, in order; a job that raises, crashes or hangs is an error row."""
    rows = []
    for job in jobs:
        candidate, artifact = job[2], job[4]
        if in_process:
            try:
                rows.append(BenchRow(**_job(*job)))
            except EdgeError as exc:
                rows.append(_error_row(candidate, artifact, one_line(exc)))
            continue
        # A fresh process per job: its peak RSS is its own, and a hang or crash is its own.
        outcome = run_isolated(_job, job, timeout_s=timeout_s)
        if outcome.error is not None:
            rows.append(_error_row(candidate, artifact, outcome.error))
        else:
            rows.append(BenchRow(**outcome.result))
    return rows


def _jobs(folder: str, manifest: Manifest, candidates: list[Candidate], profile: str | None) -> list[_Job]:
    """One job per (candidate, artifact it could load); one per candidate without an artifact."""
    from edgeagent.selection import find_artifacts

    jobs: list[_Job] = []
    for candidate in candidates:
        found = find_artifacts(manifest, candidate, profile)
        paths: list[str | None] = [None] if isinstance(found, str) else [m.path for m in found]
        jobs += [(folder, manifest, candidate, profile, path) for path in paths]
    return jobs


def _bench(args: argparse.Namespace) -> int:
    from edgeagent.selection import prefer_precisions

    profile, candidates = candidates_for(args)
    # Only --precision: bench shows every candidate, whatever the bundle's serve_precision says.
    candidates = prefer_precisions(candidates, args.precision)
    with extracted(args.bundle, args) as (verified, folder):
        jobs = _jobs(str(folder), verified.manifest, list(candidates), profile)
        rows = run_candidates(jobs, in_process=args.in_process, timeout_s=args.timeout)
    if args.json:
        print(json.dumps({"bundle": verified.manifest.name, "version": verified.manifest.version,
                          "profile": profile, "rows": [asdict(r) for r in rows]}, indent=2))  # fmt: skip
    else:
        print(f"{verified.manifest.name} {verified.manifest.version} on profile {profile}")
        print(format_table(rows))
    if not any(r.p50_ms is not None for r in rows):
        # After the table, which says why each one did not; the CLI boundary prints this line.
        raise EdgeError(f"no candidate of profile {profile} ran the bundle (see the table)")
    return 0


def format_table(rows: list[BenchRow]) -> str:
    """A plain-text table, one row per candidate."""
    header = (
        "runtime",
        "delegate",
        "precision",
        "artifact",
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
        (r.runtime, r.delegate, r.precision, r.artifact.rsplit("/", 1)[-1], num(r.load_ms, 1),
         num(r.p50_ms), num(r.p95_ms), num(r.p99_ms), num(r.peak_rss_mib, 0), r.verdict)
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        pairs = enumerate(zip(line, widths, strict=False))  # the last column is not padded
        cells = [str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join([*cells, str(line[-1])]))
    return "\n".join(lines)
