"""The served models as the deployment engine sees them: load and prove, switch, bench."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from devices.profile import Candidate
from edgeagent.acceptance import load_golden, run_acceptance
from edgeagent.bundle.manifest import MANIFEST_NAME, parse_manifest
from edgeagent.errors import EdgeError
from edgeagent.protocol import Verdict
from edgeagent.serving.loader import prepare_served_model, served_gate
from edgeagent.serving.server import InferenceServer
from edgeagent.serving.slots import ServedModel
from edgeagent.store import Store

log = logging.getLogger(__name__)


class ServedModels:
    """Implements the engine's ServerPort over the inference server and the store."""

    def __init__(
        self,
        server: InferenceServer,
        store: Store,
        candidates: Sequence[Candidate],
        *,
        profile: str | None,
        precisions: Callable[[str], Sequence[str]],
    ) -> None:
        self.server = server
        self.store = store
        self.candidates = list(candidates)
        self.profile = profile
        self.precisions = precisions

    def prepare(self, name: str, sha256: str) -> ServedModel:
        folder = self.store.bundle_dir(sha256)
        manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes())
        return prepare_served_model(
            folder,
            manifest,
            self.candidates,
            profile=self.profile,
            name=name,
            bundle_sha256=sha256,
            precisions=self.precisions(name),
        )

    def activate(self, name: str, prepared: object) -> None:
        if not isinstance(prepared, ServedModel):
            raise TypeError(f"cannot activate {type(prepared).__name__}")  # a wiring bug
        self.server.activate(prepared, default=name == "default")

    def deactivate(self, name: str) -> None:
        self.server.deactivate(name)

    def serve_installed(self) -> None:
        """Serve every model's current bundle (on start); one that fails is logged and left out."""
        for name in self.store.model_names():
            sha = self.store.current(name)
            if sha is None:
                continue
            try:
                self.activate(name, self.prepare(name, sha))
            except EdgeError as exc:
                log.error("cannot serve installed model %s (%s): %s", name, sha[:12], exc)

    def bench(self, only: str | None) -> dict[str, Verdict]:
        """Re-run acceptance on the served models (``command bench``)."""
        results: dict[str, Verdict] = {}
        for name, served in self.server.served().items():
            if (only is not None and name != only) or served.bundle_sha256 is None:
                continue
            folder = self.store.bundle_dir(served.bundle_sha256)
            gate = served_gate(parse_manifest((folder / MANIFEST_NAME).read_bytes()), served.decision)
            golden = load_golden(folder / gate.golden) if gate.golden else None
            # served.state: a stateful model replays on acceptance's own state, never a session's
            results[name] = run_acceptance(
                served.model, gate, golden, profile=self.profile, state=served.state
            )
        return results
