"""From an extracted, verified bundle to a model ready to serve: select, accept, describe.

This is the validating step of a deployment: the deployment flow and ``edgeagent serve``
call :func:`prepare_served_model`, then hand the result to
:meth:`~edgeagent.serving.server.InferenceServer.activate`. Selection runs acceptance on
every artifact it loads, against that artifact's own gate, and keeps only one that passes;
when none does, the error carries the first verdict (every number and its bound) and the
decision (every candidate tried and why it was rejected).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from devices.profile import Candidate
from edgeagent.acceptance import load_golden
from edgeagent.bundle.manifest import AcceptanceGate, Manifest
from edgeagent.protocol import Decision
from edgeagent.selection import prefer_precisions, select_runtime
from edgeagent.serving.slots import ServedModel
from edgeagent.state import StateCarrier

log = logging.getLogger(__name__)


def prepare_served_model(
    bundle_dir: Path,
    manifest: Manifest,
    candidates: Sequence[Candidate],
    *,
    profile: str | None,
    name: str | None = None,
    bundle_sha256: str | None = None,
    autotune: bool = False,
    precisions: Sequence[str] = (),
) -> ServedModel:
    """Select a runtime and an artifact that passes its own gate on the golden set, and wrap it.

    ``precisions`` is the device's precision override (:func:`prefer_precisions`); when it
    is empty the bundle author's ``serve_precision`` applies, and when that is empty too
    the profile's order. Raises NoCandidate (no runtime loads), UsageError (the override
    leaves no candidate) or AcceptanceFailed (no loaded artifact met its own gate).
    """
    gate = manifest.acceptance
    golden = load_golden(bundle_dir / gate.golden) if gate.golden else None
    candidates = prefer_precisions(candidates, precisions or manifest.serve_precision)
    selection = select_runtime(
        bundle_dir, manifest, candidates, profile=profile, autotune=autotune, golden=golden
    )
    verdict = selection.verdict
    log.info(
        "%s %s (%s) accepted on %s/%s: %s",
        manifest.name,
        manifest.version,
        selection.entry.path,
        verdict.runtime,
        verdict.delegate,
        ", ".join(f"{c.name}={c.value:.4g}" for c in verdict.checks if c.value is not None)
        or "no bounds set",
    )
    return ServedModel(
        name=name or manifest.name,
        model=selection.model,
        bundle=manifest.name,
        version=manifest.version,
        bundle_sha256=bundle_sha256,
        decision=selection.decision,
        verdict=verdict,
        state=StateCarrier.for_model(selection.entry, selection.model, bundle_dir),
    )


def served_gate(manifest: Manifest, decision: Decision | None) -> AcceptanceGate:
    """The gate of the artifact a served model's ``decision`` chose (re-runs judge it by its own gate)."""
    chosen = decision.chosen if decision is not None else None
    entry = next((m for m in manifest.models if chosen is not None and m.path == chosen.artifact), None)
    return manifest.gate_for(entry) if entry is not None else manifest.acceptance
