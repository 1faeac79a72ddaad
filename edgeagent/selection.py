"""Pick the runtime, delegate and artifact that serve a bundle on this device.

Candidates are the device profile's ordered (runtime, delegate/provider, precision) list
(:class:`devices.profile.Candidate`), kept when:

1. the bundle has an artifact for it (format, precision, artifact suffix, and the
   artifact's own ``delegates``/``profiles`` restrictions);
2. its runtime imports;
3. it loads, and the delegate/provider it asked for is the one in use (a
   :class:`~edgeagent.runtimes.base.Fallback` rejects the candidate: the profile lists the
   CPU path as a later candidate of its own);
4. with ``autotune``, its golden-set run passes the acceptance gate.

Without ``autotune`` the first candidate that loads wins (profile order is the policy);
with it every candidate is loaded and the one with the lowest p50 latency wins. Either
way the :class:`Decision` records the choice, every rejected candidate with the stage
and reason, and the timings measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from devices.profile import EDGETPU_SUFFIX, Candidate
from edgeagent.acceptance import Verdict, run_acceptance
from edgeagent.bundle.golden import GoldenSet
from edgeagent.bundle.manifest import Manifest, ModelEntry
from edgeagent.errors import ModelLoadError, NoCandidate, RuntimeUnavailable
from edgeagent.runtimes import LoadedModel, LoadOptions, get_adapter, load_model

log = logging.getLogger(__name__)

Stage = Literal["artifact", "runtime", "delegate", "load", "acceptance", "slower"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rejection(_Frozen):
    """A candidate that was not chosen, the stage that ruled it out, and why."""

    candidate: str = Field(description="runtime/delegate/precision as the profile names it.")
    stage: Stage = Field(description="artifact, runtime, delegate, load, acceptance, or slower (autotune).")
    reason: str


class Timing(_Frozen):
    """What a candidate that loaded measured (ms)."""

    candidate: str
    artifact: str = Field(description="Model path inside the bundle.")
    load_ms: float
    p50_ms: float | None = Field(default=None, description="Golden-set p50 (autotune only).")
    p95_ms: float | None = Field(default=None, description="Golden-set p95 (autotune only).")
    accepted: bool | None = Field(default=None, description="Acceptance verdict (autotune only).")


class Chosen(_Frozen):
    candidate: str
    runtime: str
    delegate: str
    precision: str
    artifact: str = Field(description="Model path inside the bundle.")


class Decision(_Frozen):
    """The structured outcome of selection, as the agent reports it."""

    bundle: str
    version: str
    profile: str | None
    mode: Literal["first", "autotune"]
    chosen: Chosen | None
    rejected: list[Rejection]
    untried: list[str] = Field(description="Candidates after the chosen one that were not loaded.")
    timings: list[Timing]


@dataclass
class Selection:
    """The decision and the loaded model (the caller owns it and must close it)."""

    decision: Decision
    model: LoadedModel
    entry: ModelEntry
    verdict: Verdict | None  # the chosen candidate's acceptance verdict (autotune only)


def find_artifact(manifest: Manifest, candidate: Candidate, profile: str | None) -> ModelEntry | str:
    """The bundle's model entry for ``candidate``, or the reason there is none."""
    fmt, precision = candidate.artifact_format, candidate.loads_precision
    same_kind = [m for m in manifest.models if m.format == fmt and m.precision == precision]
    if not same_kind:
        return f"the bundle has no {fmt} {precision} artifact"
    for entry in same_kind:
        if entry.runtimes and candidate.runtime not in entry.runtimes:
            continue
        compiled_for_tpu = entry.path.endswith(EDGETPU_SUFFIX)
        if candidate.artifact_suffix is not None and not entry.path.endswith(candidate.artifact_suffix):
            continue
        if candidate.artifact_suffix is None and compiled_for_tpu:
            continue  # an Edge TPU build runs only on the Edge TPU
        if entry.delegates and candidate.delegate not in entry.delegates:
            continue
        if entry.profiles and profile not in entry.profiles:
            continue
        return entry
    wanted = f" ending in {candidate.artifact_suffix}" if candidate.artifact_suffix else ""
    return (
        f"no {fmt} {precision} artifact{wanted} is meant for runtime {candidate.runtime}, "
        f"delegate {candidate.delegate}, profile {profile}"
    )


def load_candidate(
    bundle_dir: Path, manifest: Manifest, candidate: Candidate, profile: str | None
) -> tuple[LoadedModel, ModelEntry, float] | Rejection:
    """Load ``candidate`` from an extracted bundle: (model, entry, load ms) or the rejection."""
    name = str(candidate)
    found = find_artifact(manifest, candidate, profile)
    if isinstance(found, str):
        return Rejection(candidate=name, stage="artifact", reason=found)
    reason = get_adapter(candidate.runtime).unavailable_reason()
    if reason is not None:
        return Rejection(candidate=name, stage="runtime", reason=reason)
    options = LoadOptions(
        delegate=candidate.delegate, precision=candidate.precision, threads=candidate.threads
    )
    start = time.perf_counter()
    try:
        model = load_model(bundle_dir / found.path, candidate.runtime, options, precision=candidate.precision)
    except (ModelLoadError, RuntimeUnavailable) as exc:
        return Rejection(candidate=name, stage="load", reason=str(exc))
    load_ms = (time.perf_counter() - start) * 1e3
    if model.fallbacks:
        model.close()
        why = "; ".join(f.reason for f in model.fallbacks)
        return Rejection(candidate=name, stage="delegate", reason=f"{candidate.delegate} not usable: {why}")
    return model, found, load_ms


def select_runtime(
    bundle_dir: Path,
    manifest: Manifest,
    candidates: Sequence[Candidate],
    *,
    profile: str | None = None,
    autotune: bool = False,
    golden: GoldenSet | None = None,
) -> Selection:
    """Choose and load the candidate that serves ``manifest`` (extracted in ``bundle_dir``).

    Raises :class:`~edgeagent.errors.NoCandidate` (carrying the decision) when none survives.
    """
    rejected: list[Rejection] = []
    timings: list[Timing] = []
    untried: list[str] = []
    best: tuple[LoadedModel, ModelEntry, Candidate, Verdict | None] | None = None
    for candidate in candidates:
        if best is not None and not autotune:
            found = find_artifact(manifest, candidate, profile)
            if isinstance(found, str):
                rejected.append(Rejection(candidate=str(candidate), stage="artifact", reason=found))
            else:
                untried.append(str(candidate))
            continue
        loaded = load_candidate(bundle_dir, manifest, candidate, profile)
        if isinstance(loaded, Rejection):
            rejected.append(loaded)
            continue
        model, entry, load_ms = loaded
        if not autotune:
            timings.append(Timing(candidate=str(candidate), artifact=entry.path, load_ms=load_ms))
            best = (model, entry, candidate, None)
            continue
        verdict = run_acceptance(model, manifest.acceptance, golden, profile=profile)
        timings.append(
            Timing(
                candidate=str(candidate),
                artifact=entry.path,
                load_ms=load_ms,
                p50_ms=verdict.latency.p50_ms,
                p95_ms=verdict.latency.p95_ms,
                accepted=verdict.passed,
            )
        )
        if not verdict.passed:
            model.close()
            rejected.append(
                Rejection(candidate=str(candidate), stage="acceptance", reason=verdict.reason or "")
            )
        elif best is None or best[3] is None or verdict.latency.p50_ms < best[3].latency.p50_ms:
            if best is not None:
                best[0].close()
                rejected.append(_slower(best, verdict))
            best = (model, entry, candidate, verdict)
        else:
            model.close()
            rejected.append(_slower((model, entry, candidate, verdict), best[3]))
    chosen = None
    if best is not None:
        model, entry, candidate, _ = best
        chosen = Chosen(
            candidate=str(candidate),
            runtime=model.runtime,
            delegate=model.delegate,
            precision=candidate.precision,
            artifact=entry.path,
        )
    decision = Decision(
        bundle=manifest.name,
        version=manifest.version,
        profile=profile,
        mode="autotune" if autotune else "first",
        chosen=chosen,
        rejected=rejected,
        untried=untried,
        timings=timings,
    )
    if best is None:
        summary = "; ".join(f"{r.candidate}: {r.reason}" for r in rejected) or "the profile lists none"
        raise NoCandidate(
            f"no runtime can serve {manifest.name} {manifest.version} here ({summary})", decision=decision
        )
    log.info("selected %s for %s %s", decision.chosen, manifest.name, manifest.version)
    return Selection(decision=decision, model=best[0], entry=best[1], verdict=best[3])


def _slower(
    loser: tuple[LoadedModel, ModelEntry, Candidate, Verdict | None], winner: Verdict | None
) -> Rejection:
    loser_p50 = loser[3].latency.p50_ms if loser[3] else float("nan")
    winner_p50 = winner.latency.p50_ms if winner else float("nan")
    return Rejection(
        candidate=str(loser[2]),
        stage="slower",
        reason=f"p50 {loser_p50:.3f} ms vs {winner_p50:.3f} ms for the chosen candidate",
    )
