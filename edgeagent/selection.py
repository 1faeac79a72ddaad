"""Pick the runtime, delegate and artifact that serve a bundle on this device.

Candidates are the device profile's ordered (runtime, delegate/provider, precision) list
(:class:`devices.profile.Candidate`), kept when:

1. the bundle has an artifact for it (format, precision, artifact suffix, and the
   artifact's own ``delegates``/``profiles`` restrictions);
2. its runtime imports;
3. it loads, and the delegate/provider it asked for is the one in use (a
   :class:`~edgeagent.runtimes.base.Fallback` rejects the candidate: the profile lists the
   CPU path as a later candidate of its own);
4. the artifact passes its OWN acceptance gate on the golden set (a bundle may give each
   artifact its own gate; one that fails is closed and the next artifact or candidate is
   tried), so a weak artifact is never served however highly the profile ranks it.

Without ``autotune`` the first candidate whose artifact loads and passes wins (profile
order is the policy); with it every candidate is loaded and the passing one with the
lowest p50 latency wins. Either way the :class:`Decision` records the choice, every
rejected candidate with the stage and reason, and the timings measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from devices.profile import EDGETPU_SUFFIX, Candidate
from edgeagent.acceptance import load_golden, run_acceptance
from edgeagent.bundle.golden import GoldenSet
from edgeagent.bundle.manifest import AcceptanceGate, Manifest, ModelEntry
from edgeagent.errors import (
    AcceptanceFailed,
    InferenceError,
    InputError,
    ModelLoadError,
    NoCandidate,
    RuntimeUnavailable,
    UsageError,
)
from edgeagent.protocol import Chosen, Decision, Rejection, Timing, Verdict
from edgeagent.runtimes import LoadedModel, LoadOptions, get_adapter, load_model
from edgeagent.state import StateCarrier

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The decision and the loaded model (the caller owns it and must close it)."""

    decision: Decision
    model: LoadedModel
    entry: ModelEntry
    verdict: Verdict  # the chosen artifact's acceptance verdict against its own gate


def find_artifacts(manifest: Manifest, candidate: Candidate, profile: str | None) -> list[ModelEntry] | str:
    """Every model entry of the bundle for ``candidate``, in manifest order, or why there is none."""
    fmt, precision = candidate.artifact_format, candidate.loads_precision
    same_kind = [m for m in manifest.models if m.format == fmt and m.precision == precision]
    if not same_kind:
        return f"the bundle has no {fmt} {precision} artifact"
    found = [entry for entry in same_kind if _suits(entry, candidate, profile)]
    if found:
        return found
    wanted = f" ending in {candidate.artifact_suffix}" if candidate.artifact_suffix else ""
    return (
        f"no {fmt} {precision} artifact{wanted} is meant for runtime {candidate.runtime}, "
        f"delegate {candidate.delegate}, profile {profile}"
    )


def find_artifact(manifest: Manifest, candidate: Candidate, profile: str | None) -> ModelEntry | str:
    """The bundle's first model entry for ``candidate``, or the reason there is none."""
    found = find_artifacts(manifest, candidate, profile)
    return found if isinstance(found, str) else found[0]


def _suits(entry: ModelEntry, candidate: Candidate, profile: str | None) -> bool:
    if entry.runtimes and candidate.runtime not in entry.runtimes:
        return False
    compiled_for_tpu = entry.path.endswith(EDGETPU_SUFFIX)
    if candidate.artifact_suffix is not None and not entry.path.endswith(candidate.artifact_suffix):
        return False
    if candidate.artifact_suffix is None and compiled_for_tpu:
        return False  # an Edge TPU build runs only on the Edge TPU
    if entry.delegates and candidate.delegate not in entry.delegates:
        return False
    return not (entry.profiles and profile not in entry.profiles)


def prefer_precisions(candidates: Sequence[Candidate], precisions: Sequence[str]) -> list[Candidate]:
    """The candidates that load an artifact of one of ``precisions``, in that order of preference.

    The operator's precision override (agent.toml ``precision``/``model_precision``,
    ``--precision``). It matches the precision of the *artifact* a candidate loads (the
    manifest's ``precision``), so ``["fp16"]`` keeps LiteRT's fp32-from-fp16 candidate and
    ``["fp32"]`` keeps TensorRT's fp16 engine built from an fp32 model. Within one precision
    the profile's order stands. Empty ``precisions``: the candidates unchanged. Raises
    :class:`~edgeagent.errors.UsageError` when the override leaves no candidate.
    """
    if not precisions:
        return list(candidates)
    rank = {precision: i for i, precision in enumerate(precisions)}
    kept = sorted((c for c in candidates if c.loads_precision in rank), key=lambda c: rank[c.loads_precision])
    if not kept:
        loads = sorted({c.loads_precision for c in candidates})
        raise UsageError(
            f"precision override {', '.join(precisions)} leaves no candidate of the profile "
            f"(they load {', '.join(loads) or 'nothing'})"
        )
    return kept


def load_candidate(
    bundle_dir: Path,
    manifest: Manifest,
    candidate: Candidate,
    profile: str | None,
    entry: ModelEntry | None = None,
) -> tuple[LoadedModel, ModelEntry, float] | Rejection:
    """Load ``candidate`` with ``entry`` (else its first artifact): (model, entry, load ms) or a rejection."""
    name = str(candidate)
    found = entry if entry is not None else find_artifact(manifest, candidate, profile)
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
        return Rejection(candidate=name, stage="load", reason=str(exc), artifact=found.path)
    load_ms = (time.perf_counter() - start) * 1e3
    if model.fallbacks:
        model.close()
        why = "; ".join(f.reason for f in model.fallbacks)
        return Rejection(
            candidate=name,
            stage="delegate",
            reason=f"{candidate.delegate} not usable: {why}",
            artifact=found.path,
        )
    return model, found, load_ms


class GoldenSets:
    """The golden sets a bundle's gates name, each loaded once (``known``: already loaded ones)."""

    def __init__(self, bundle_dir: Path, known: dict[str, GoldenSet] | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.loaded: dict[str, GoldenSet] = dict(known or {})

    def for_gate(self, gate: AcceptanceGate) -> GoldenSet | None:
        if gate.golden is None:
            return None
        if gate.golden not in self.loaded:
            self.loaded[gate.golden] = load_golden(self.bundle_dir / gate.golden)
        return self.loaded[gate.golden]


_Best = tuple[LoadedModel, ModelEntry, Candidate, Verdict]


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

    Every artifact that loads runs the golden set against its own gate
    (:meth:`~edgeagent.bundle.manifest.Manifest.gate_for`); only one that passes can be
    chosen. ``golden`` is the bundle-level golden set when the caller has loaded it already.

    Raises :class:`~edgeagent.errors.AcceptanceFailed` when artifacts loaded but none passed
    its gate, :class:`~edgeagent.errors.NoCandidate` when none loaded (both carry the decision).
    """
    known = {manifest.acceptance.golden: golden} if golden is not None and manifest.acceptance.golden else {}
    goldens = GoldenSets(bundle_dir, known)
    rejected: list[Rejection] = []
    timings: list[Timing] = []
    untried: list[str] = []
    failed: list[tuple[Candidate, ModelEntry, Verdict]] = []
    best: _Best | None = None
    for candidate in candidates:
        found = find_artifacts(manifest, candidate, profile)
        if isinstance(found, str):
            rejected.append(Rejection(candidate=str(candidate), stage="artifact", reason=found))
            continue
        if best is not None and not autotune:
            untried.append(str(candidate))
            continue
        for entry in found:
            loaded = load_candidate(bundle_dir, manifest, candidate, profile, entry)
            if isinstance(loaded, Rejection):
                rejected.append(loaded)
                if loaded.stage in ("runtime", "delegate"):
                    # A missing runtime or an unusable delegate/provider fails every artifact of
                    # the candidate alike; the profile lists the fallback as its own candidate.
                    break
                continue
            model, entry, load_ms = loaded
            verdict = _judge(model, manifest, entry, goldens, profile)
            if isinstance(verdict, str):  # the golden set did not even run
                rejected.append(_refused(candidate, entry, verdict))
                continue
            timings.append(_timing(candidate, entry, load_ms, verdict))
            if not verdict.passed:
                model.close()
                failed.append((candidate, entry, verdict))
                rejected.append(_refused(candidate, entry, f"its own gate: {verdict.reason}"))
                continue
            best = _keep_faster(best, (model, entry, candidate, verdict), rejected)
            if not autotune:
                break
    decision = Decision(
        bundle=manifest.name,
        version=manifest.version,
        profile=profile,
        mode="autotune" if autotune else "first",
        chosen=_chosen(best),
        rejected=rejected,
        untried=untried,
        timings=timings,
    )
    if best is None:
        _refuse(manifest, decision, failed)
    log.info("selected %s for %s %s", decision.chosen, manifest.name, manifest.version)
    return Selection(decision=decision, model=best[0], entry=best[1], verdict=best[3])


def _judge(
    model: LoadedModel, manifest: Manifest, entry: ModelEntry, goldens: GoldenSets, profile: str | None
) -> Verdict | str:
    """``model``'s verdict against ``entry``'s own gate, or why the golden set could not run on it."""
    gate = manifest.gate_for(entry)
    state = StateCarrier.for_model(entry, model, goldens.bundle_dir)
    try:
        return run_acceptance(model, gate, goldens.for_gate(gate), profile=profile, state=state)
    except (InferenceError, InputError) as exc:
        # An artifact that fails on the golden set is rejected like one that misses its gate.
        model.close()
        return f"the golden set does not run on it: {exc}"


def _refused(candidate: Candidate, entry: ModelEntry, reason: str) -> Rejection:
    return Rejection(candidate=str(candidate), stage="acceptance", reason=reason, artifact=entry.path)


def _timing(candidate: Candidate, entry: ModelEntry, load_ms: float, verdict: Verdict) -> Timing:
    return Timing(
        candidate=str(candidate),
        artifact=entry.path,
        load_ms=load_ms,
        p50_ms=verdict.latency.p50_ms,
        p95_ms=verdict.latency.p95_ms,
        accepted=verdict.passed,
    )


def _keep_faster(best: _Best | None, new: _Best, rejected: list[Rejection]) -> _Best:
    """The faster of ``best`` and ``new`` (both passed their gates); the other is closed and recorded."""
    if best is None:
        return new
    if new[3].latency.p50_ms < best[3].latency.p50_ms:
        best[0].close()
        rejected.append(_slower(best, new[3]))
        return new
    new[0].close()
    rejected.append(_slower(new, best[3]))
    return best


def _chosen(best: _Best | None) -> Chosen | None:
    if best is None:
        return None
    model, entry, candidate, _ = best
    return Chosen(
        candidate=str(candidate),
        runtime=model.runtime,
        delegate=model.delegate,
        precision=candidate.precision,
        artifact=entry.path,
    )


def _refuse(
    manifest: Manifest, decision: Decision, failed: list[tuple[Candidate, ModelEntry, Verdict]]
) -> NoReturn:
    what = f"{manifest.name} {manifest.version}"
    if failed:
        # Artifacts ran but none met its own gate: an acceptance failure, which rolls back.
        reasons = "; ".join(f"{v.reason} ({c}, {e.path})" for c, e, v in failed)
        message = f"{what} failed acceptance: {reasons}"
        raise AcceptanceFailed(message, verdict=failed[0][2], decision=decision)
    summary = "; ".join(f"{r.candidate}: {r.reason}" for r in decision.rejected) or "the profile lists none"
    raise NoCandidate(f"no runtime can serve {what} here ({summary})", decision=decision)


def _slower(loser: _Best, winner: Verdict) -> Rejection:
    return Rejection(
        candidate=str(loser[2]),
        stage="slower",
        reason=f"p50 {loser[3].latency.p50_ms:.3f} ms vs {winner.latency.p50_ms:.3f} ms "
        "for the chosen candidate",
        artifact=loser[1].path,
    )
