"""In-memory ports for the deployment engine's in-process tests (pure logic: no broker, no runtime).

The store keeps what a disk would (downloads, bundles, links) across a simulated restart;
the server is rebuilt on restart from the links, as the agent's start does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgeagent.deploy import Backoff, Engine, Ports, Settings
from edgeagent.desired import Wanted
from edgeagent.errors import DeploymentError
from edgeagent.protocol import BundleRef

MiB = 1024 * 1024


def ref(version: str, fill: str, size: int = MiB) -> BundleRef:
    return BundleRef(name="digits", version=version, sha256=fill * 64, size=size)


V1, V2 = ref("1.0.0", "a"), ref("1.1.0", "b")


@dataclass
class FakeStore:
    free: int = 100 * MiB
    downloads: dict[str, str] = field(default_factory=dict)  # sha -> "part" | "done"
    bundles: dict[str, str] = field(default_factory=dict)  # sha -> version
    links: dict[tuple[str, str], str] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)

    def has_bundle(self, sha256: str) -> bool:
        return sha256 in self.bundles

    def current(self, name: str) -> str | None:
        return self.links.get((name, "current"))

    def previous(self, name: str) -> str | None:
        return self.links.get((name, "previous"))

    def set_link(self, name: str, which: str, sha256: str | None) -> None:
        if sha256 is None:
            self.links.pop((name, which), None)
        elif sha256 not in self.bundles:
            raise FileNotFoundError(sha256)
        else:
            self.links[(name, which)] = sha256

    def version_of(self, sha256: str) -> str | None:
        return self.bundles.get(sha256)

    def download_bytes(self, sha256: str) -> int:
        return 0

    def free_bytes(self) -> int:
        return self.free

    def verify_download(self, ref: BundleRef) -> int:
        if self.downloads.get(ref.sha256) != "done":
            raise DeploymentError("no finished download", code="missing_download")
        return ref.size

    def install(self, ref: BundleRef) -> None:
        self.verify_download(ref)
        self.bundles[ref.sha256] = ref.version
        del self.downloads[ref.sha256]

    def remember(self, ref: BundleRef) -> None:
        pass

    def discard(self, sha256: str, *, keep_partial: bool) -> None:
        if not (keep_partial and self.downloads.get(sha256) == "part"):
            self.downloads.pop(sha256, None)
        if sha256 not in self.links.values():
            self.bundles.pop(sha256, None)

    def collect_garbage(self, keep: set[str]) -> None:
        for sha in [s for s in self.downloads if s not in keep]:
            del self.downloads[sha]

    def check_bundle(self, sha256: str) -> str | None:
        return "models/m.onnx does not match its sha256" if sha256 in self.corrupt else None


class FakeDownloader:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.fetched: list[str] = []

    def fetch(self, ref: BundleRef, *, progress=None, stop: threading.Event | None = None) -> Path:  # type: ignore[no-untyped-def]
        self.fetched.append(ref.sha256)
        self.store.downloads[ref.sha256] = "done"
        if progress is not None:
            progress(ref.size, ref.size)
        return Path("/nonexistent") / ref.sha256


@dataclass
class FakeServer:
    store: FakeStore
    active: dict[str, str] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)  # bundles whose acceptance fails

    def prepare(self, name: str, sha256: str) -> object:
        if sha256 not in self.store.bundles:
            raise DeploymentError(f"{sha256[:4]} is not installed", code="missing_bundle")
        if sha256 in self.refuse:
            raise DeploymentError("accuracy 0.5 < bound 0.9", code="acceptance_failed")
        return ("prepared", sha256)

    def activate(self, name: str, prepared: object) -> None:
        assert isinstance(prepared, tuple)
        self.active[name] = prepared[1]

    def deactivate(self, name: str) -> None:
        self.active.pop(name, None)


@dataclass
class FakeReporter:
    events: list[tuple[str, ...]] = field(default_factory=list)

    def state(self, name: str, ref: BundleRef | None, state: str) -> None:
        self.events.append(("state", state))

    def progress(self, name: str, ref: BundleRef, received: int, total: int) -> None:
        pass

    def outcome(
        self, name: str, ref: BundleRef, *, ok: bool, code: str, reason: str, detail: dict[str, object]
    ) -> None:
        self.events.append(("outcome", code))

    def refused(self, name: str, ref: BundleRef, *, code: str, reason: str) -> None:
        self.events.append(("refused", code))

    def store_event(self, name: str, *, code: str, reason: str, detail: dict[str, object]) -> None:
        self.events.append(("store", code))

    def outcomes(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "outcome"]


@dataclass
class FakeClock:
    t: float = 1_000_000.0

    def now(self) -> float:
        return self.t

    def random(self) -> float:
        return 0.5


class World:
    """A device: a persistent store and journal folder, and a process that can be restarted."""

    def __init__(self, journal_dir: Path, settings: Settings | None = None) -> None:
        self.journal_dir = journal_dir
        self.settings = settings or Settings(
            backoff=Backoff(base_s=10, cap_s=60, max_attempts=3), margin_bytes=MiB
        )
        self.store = FakeStore()
        self.store.bundles[V1.sha256] = V1.version
        self.store.links[("default", "current")] = V1.sha256
        self.clock = FakeClock()
        self.refuse: set[str] = set()
        self.restart()

    def restart(self) -> Engine:
        """A new process: memory lost, the disk kept; it serves what the links say."""
        self.server = FakeServer(self.store, refuse=self.refuse)
        for (name, which), sha in self.store.links.items():
            if which == "current":
                self.server.active[name] = sha
        self.reporter = FakeReporter()
        self.downloader = FakeDownloader(self.store)
        ports = Ports(self.store, self.downloader, self.server, self.reporter, self.clock)
        self.engine = Engine(ports, self.journal_dir, self.settings, threading.Event())
        return self.engine

    def want(self, bundle: BundleRef = V2, seq: int = 1) -> dict[str, Wanted]:
        return {"default": Wanted(bundle, False, "device:pi", seq)}

    def active(self) -> str | None:
        return self.server.active.get("default")
