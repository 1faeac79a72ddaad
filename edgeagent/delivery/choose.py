"""Which files of a bundle a device fetches: every file that is not a model, and the
artifacts of the first candidate of its profile that the bundle serves and whose runtime
imports (the artifact selection would try first); and, when those fail acceptance, the
artifacts of the next such candidate that the partial bundle lacks."""

from __future__ import annotations

from collections.abc import Sequence

from devices.profile import Candidate
from edgeagent.bundle.manifest import Manifest
from edgeagent.runtimes import get_adapter
from edgeagent.selection import find_artifacts, prefer_precisions


def needed_files(
    manifest: Manifest, candidates: Sequence[Candidate], profile: str | None, precisions: Sequence[str]
) -> set[str]:
    """Member names to fetch (labels, golden sets and initial states always; models chosen)."""
    models = {m.path for m in manifest.models}
    needed = {f.path for f in manifest.files if f.path not in models}
    for candidate in prefer_precisions(candidates, precisions or manifest.serve_precision):
        found = find_artifacts(manifest, candidate, profile)
        if isinstance(found, str) or get_adapter(candidate.runtime).unavailable_reason() is not None:
            continue
        return needed | {entry.path for entry in found}
    return needed  # nothing this device runs: selection will say why, with every candidate


def next_files(
    manifest: Manifest,
    candidates: Sequence[Candidate],
    profile: str | None,
    precisions: Sequence[str],
    missing: Sequence[str],
) -> list[str]:
    """The ``missing`` artifacts of the first candidate (in selection's order) that has any: the
    ones selection would try next once every artifact the bundle holds failed. Empty: none left."""
    for candidate in prefer_precisions(candidates, precisions or manifest.serve_precision):
        found = find_artifacts(manifest, candidate, profile)
        if isinstance(found, str) or get_adapter(candidate.runtime).unavailable_reason() is not None:
            continue
        lacking = [entry.path for entry in found if entry.path in missing]
        if lacking:
            return lacking
    return []
