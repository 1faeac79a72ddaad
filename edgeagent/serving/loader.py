"""From an extracted, verified bundle to a model ready to serve: select, accept, describe.

This is the validating step of a deployment: the deployment flow and ``edgeagent serve``
call :func:`prepare_served_model`, then hand the result to
:meth:`~edgeagent.serving.server.InferenceServer.activate`. A candidate that fails
acceptance is closed and the error carries the verdict (every number and its bound).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from devices.profile import Candidate
from edgeagent.acceptance import load_golden, run_acceptance
from edgeagent.bundle.manifest import Manifest
from edgeagent.errors import AcceptanceFailed
from edgeagent.selection import prefer_precisions, select_runtime
from edgeagent.serving.slots import ServedModel

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
    """Select a runtime for the bundle in ``bundle_dir``, prove it on the golden set, and wrap it.

    ``precisions`` is the device's precision override (:func:`prefer_precisions`); when it
    is empty the bundle author's ``serve_precision`` applies, and when that is empty too
    the profile's order. Raises NoCandidate (no runtime loads), UsageError (the override
    leaves no candidate) or AcceptanceFailed (the gate was missed).
    """
    gate = manifest.acceptance
    golden = load_golden(bundle_dir / gate.golden) if gate.golden else None
    candidates = prefer_precisions(candidates, precisions or manifest.serve_precision)
    selection = select_runtime(
        bundle_dir, manifest, candidates, profile=profile, autotune=autotune, golden=golden
    )
    verdict = selection.verdict or run_acceptance(selection.model, gate, golden, profile=profile)
    if not verdict.passed:
        selection.model.close()
        raise AcceptanceFailed(
            f"{manifest.name} {manifest.version} on {verdict.runtime}/{verdict.delegate} failed acceptance: "
            f"{verdict.reason}",
            verdict=verdict,
        )
    log.info(
        "%s %s accepted on %s/%s: %s",
        manifest.name,
        manifest.version,
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
        decision=selection.decision.model_dump(mode="json"),
        verdict=verdict.model_dump(mode="json"),
    )
