"""The gates: pure functions from evidence (counts, merged histograms, sums) to a verdict.

Nothing here reads a database or a clock, so every criterion is tested with plain values;
:mod:`fleet.rollout.evidence` gathers the numbers from the fleet database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgeagent.histogram import Histogram
from fleet.rollout.model import Gates

ACCEPTANCE_CODES = frozenset({"acceptance_failed"})
ACCURACY_Z = 2.0  # one-sided, about 2% of healthy rollouts judged on the edge of the bound


@dataclass(frozen=True)
class Side:
    """What one version showed on the rollout's updated devices: latency per device profile,
    online accuracy (labelled, correct), mean RSS (MB) and how many devices throttled."""

    latency: dict[str, Histogram] = field(default_factory=dict)  # profile -> merged, seconds
    labelled: int = 0
    correct: int = 0
    rss_mb: float | None = None
    throttled: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()  # devices with telemetry on this side

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(frozen=True)
class Evidence:
    finished: int  # devices with an outcome (committed or failed)
    failed: dict[str, str]  # device -> failure code
    baseline: Side
    new: Side


@dataclass(frozen=True)
class Verdict:
    """``reason`` is None when every gate passes; ``figures`` feed the progress line."""

    reason: str | None
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def abort(self) -> bool:
        return self.reason is not None


def p99_ratios(baseline: Side, new: Side, min_requests: int) -> dict[str, float]:
    """New p99 / baseline p99 per device profile where both sides have ``min_requests``."""
    ratios: dict[str, float] = {}
    for profile, hist in new.latency.items():
        base = baseline.latency.get(profile)
        if base is None or base.count < min_requests or hist.count < min_requests:
            continue
        base_p99 = base.quantile(0.99)
        if base_p99 > 0:
            ratios[profile] = hist.quantile(0.99) / base_p99
    return ratios


def overall_p99_ratio(baseline: Side, new: Side, min_requests: int) -> float | None:
    base, now = _merged(baseline), _merged(new)
    if base is None or now is None or base.count < min_requests or now.count < min_requests:
        return None
    return now.quantile(0.99) / base.quantile(0.99) if base.quantile(0.99) > 0 else None


def _merged(side: Side) -> Histogram | None:
    merged: Histogram | None = None
    for hist in side.latency.values():
        if merged is None:
            merged = hist.copy()
        else:
            merged.merge(hist)
    return merged


def judge(evidence: Evidence, gates: Gates) -> Verdict:
    """The first gate that fails, in the order an operator would want to hear them."""
    figures: dict[str, float] = {"finished": evidence.finished, "failed": len(evidence.failed)}
    overall = overall_p99_ratio(evidence.baseline, evidence.new, gates.min_requests)
    if overall is not None:
        figures["p99_ratio"] = overall
    reasons = [
        _acceptance(evidence, gates),
        _failures(evidence, gates),
        _p99(evidence, gates, figures),
        _accuracy(evidence, gates, figures),
        _rss(evidence, gates, figures),
        _throttling(evidence, gates, figures),
    ]
    return Verdict(next((r for r in reasons if r is not None), None), figures)


def _acceptance(evidence: Evidence, gates: Gates) -> str | None:
    failing = sorted(d for d, code in evidence.failed.items() if code in ACCEPTANCE_CODES)
    if gates.max_acceptance_failures is None or len(failing) <= gates.max_acceptance_failures:
        return None
    shown = ", ".join(failing[:5]) + (" ..." if len(failing) > 5 else "")
    return (
        f"{len(failing)} device(s) failed on-device acceptance ({shown}); "
        f"the gate allows {gates.max_acceptance_failures}"
    )


def _failures(evidence: Evidence, gates: Gates) -> str | None:
    if evidence.finished < gates.min_finished_for_ratio or not evidence.finished:
        return None
    ratio = len(evidence.failed) / evidence.finished
    if ratio <= gates.max_failure_ratio:
        return None
    codes = sorted({c for c in evidence.failed.values()})
    return (
        f"{len(evidence.failed)}/{evidence.finished} devices failed ({ratio:.0%} > "
        f"{gates.max_failure_ratio:.0%}; {', '.join(codes)})"
    )


def _p99(evidence: Evidence, gates: Gates, figures: dict[str, float]) -> str | None:
    ratios = p99_ratios(evidence.baseline, evidence.new, gates.min_requests)
    if not ratios:
        return None
    worst = max(ratios, key=lambda p: ratios[p])
    figures["worst_p99_ratio"] = ratios[worst]
    if gates.max_p99_ratio is None or ratios[worst] <= gates.max_p99_ratio:
        return None
    return (
        f"p99 latency {ratios[worst]:.2f}x the replaced version on {worst} (gate {gates.max_p99_ratio:.2f}x)"
    )


def _accuracy(evidence: Evidence, gates: Gates, figures: dict[str, float]) -> str | None:
    """The drop must exceed the bound by two standard errors of the difference of the two
    accuracies: with a few hundred labels, a 0.95 accuracy moves by 0.02-0.03 between samples,
    and a bound of 0.02 judged on the raw difference aborted healthy rollouts."""
    base, new = evidence.baseline, evidence.new
    if base.labelled < gates.min_labels or new.labelled < gates.min_labels:
        return None
    pb, pn = base.accuracy or 0.0, new.accuracy or 0.0
    drop = pb - pn
    se = math.sqrt(pb * (1 - pb) / base.labelled + pn * (1 - pn) / new.labelled)
    figures["accuracy_drop"] = drop
    if gates.max_accuracy_drop is None or drop - gates.max_accuracy_drop <= ACCURACY_Z * se:
        return None
    return (
        f"online accuracy {pn:.3f} vs {pb:.3f} for the replaced version (drop {drop:.3f} > "
        f"{gates.max_accuracy_drop:.3f} + {ACCURACY_Z:.0f} standard errors, {new.labelled} labels)"
    )


def _rss(evidence: Evidence, gates: Gates, figures: dict[str, float]) -> str | None:
    base, new = evidence.baseline.rss_mb, evidence.new.rss_mb
    if base is None or new is None or base <= 0:
        return None
    growth = new / base - 1
    figures["rss_growth"] = growth
    if gates.max_rss_growth is None or growth <= gates.max_rss_growth:
        return None
    return f"agent RSS {new:.0f} MB vs {base:.0f} MB before (+{growth:.0%} > +{gates.max_rss_growth:.0%})"


def _throttling(evidence: Evidence, gates: Gates, figures: dict[str, float]) -> str | None:
    updated = evidence.new.devices
    if not updated:
        return None
    newly = updated & evidence.new.throttled - evidence.baseline.throttled
    ratio = len(newly) / len(updated)
    figures["throttled_ratio"] = ratio
    if gates.max_throttled_ratio is None or ratio <= gates.max_throttled_ratio:
        return None
    return (
        f"{len(newly)}/{len(updated)} updated devices started throttling "
        f"({ratio:.0%} > {gates.max_throttled_ratio:.0%})"
    )
