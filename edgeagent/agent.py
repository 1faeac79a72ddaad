"""The deploying agent: reconcile desired state over MQTT, deploy through the state machine,
serve the active models, report what happens.

Threads: the MQTT session's network and handler threads (desired docs arrive there and only
wake the deployer), one deployer thread that runs deployments one at a time, and the
inference server's threads. The main thread runs :class:`edgeagent.service.AgentService`
(watchdog, status); :meth:`Agent.start` and :meth:`Agent.close` bracket it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devices.detect import Detection
from devices.profile import Candidate
from edgeagent import __version__
from edgeagent.acceptance import load_golden, run_acceptance
from edgeagent.bundle.manifest import MANIFEST_NAME, parse_manifest
from edgeagent.bundle.reader import verify_bundle
from edgeagent.config import AgentConfig
from edgeagent.delivery.fetch import ContentFetcher  # delivery by content
from edgeagent.deployment import Event, Journal, JournalFile, State, crash_point, next_state, resume_state
from edgeagent.desired import DesiredTracker, Wanted, check_not_downgrade
from edgeagent.errors import (
    DocumentRefused,
    EdgeError,
    MalformedMessage,
    SignatureError,
    TransferError,
    UsageError,
)
from edgeagent.mqtt import BrokerConfig, Message, MqttSession, TLSConfig
from edgeagent.protocol import (
    BundleRef,
    Command,
    CommandReply,
    DeploymentOutcome,
    ModelStatus,
    Reported,
    Topics,
    open_envelope,
    parse,
)
from edgeagent.protocol import Event as EventMsg
from edgeagent.serving.loader import prepare_served_model, served_gate
from edgeagent.serving.server import InferenceServer, ServerLimits
from edgeagent.signing import KeyRing
from edgeagent.storage import atomic_write_bytes
from edgeagent.store import Store
from edgeagent.telemetry import TelemetryReporter, reporter_for
from edgeagent.transfer import BlockDownloader, TransferConfig, block_size_for

log = logging.getLogger(__name__)

MAX_DESIRED_BYTES = 64 * 1024
RETRY_TRANSIENT_S = 5.0


class DeploymentFailed(EdgeError):
    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        detection: Detection,
        *,
        server: InferenceServer | None = None,
        trusted: KeyRing | None = None,
    ) -> None:
        self.config = config
        self.detection = detection
        self.candidates: Sequence[Candidate] = list(detection.candidates)
        self.store = Store(config.state_dir)
        self.topics = Topics(config.topic_prefix)
        # Without a broker nothing new arrives to verify: a serve-only agent needs no keys.
        needs_keys = config.broker_url is not None and not config.insecure
        self.trusted = trusted if trusted is not None else _load_trusted(config.trusted_keys, not needs_keys)
        self.server = server or InferenceServer(
            config.socket_path,
            limits=ServerLimits(max_sessions=config.max_sessions, session_idle_s=config.session_idle_s),
        )
        self.tracker = DesiredTracker(
            config.state_dir / "desired.json",
            self.trusted,
            device_id=config.device_id,
            groups=list(config.groups),
            topics=self.topics,
            insecure=config.insecure,
        )
        self.refs_file = config.state_dir / "refs.json"
        self.refs: dict[str, BundleRef] = self._load_refs()
        self.states: dict[str, State] = {}
        self.verdicts: dict[str, dict[str, Any]] = {}
        self.last_outcome: DeploymentOutcome | None = None
        self.failed: set[tuple[str, str, str, int]] = set()  # (model, sha, source, seq) not to retry
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deployer: threading.Thread | None = None
        self.session: MqttSession | None = None
        self.downloader: BlockDownloader | None = None
        self.fetcher: ContentFetcher | None = None  # delivery by content
        self.telemetry: TelemetryReporter | None = None
        if config.insecure:
            log.warning(
                "INSECURE MODE: unsigned desired docs and bundles are accepted. Never use this in production."
            )

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Agent:
        self.server.start()
        self._serve_installed()
        if self.config.broker_url:
            self.session = self._make_session()
            self.downloader = BlockDownloader(
                self.session,
                self.config.device_id,
                self.store.downloads,
                topics=self.topics,
                config=TransferConfig(
                    block_size=block_size_for(
                        self.config.broker_profile, self.config.transfer_block_kib * 1024
                    ),
                    window=self.config.transfer_window,
                ),
            )
            # --- delivery by content (edgeagent/delivery) ---
            self.fetcher = ContentFetcher(
                self.config.state_dir,
                self.trusted,
                downloader=self.downloader,
                candidates=self.candidates,
                profile=self.detection.profile,
                allow_unsigned=self.config.insecure,
                mqtt_block_cap=self.downloader.config.block_size,
            )
            # --- end delivery by content ---
            self.session.subscribe(
                self.topics.device_desired(self.config.device_id),
                self._on_desired,
                max_bytes=MAX_DESIRED_BYTES,
            )
            self.session.subscribe(
                self.topics.cmd(self.config.device_id), self._on_command, max_bytes=MAX_DESIRED_BYTES
            )
            for group in self.config.groups:
                self.session.subscribe(
                    self.topics.group_desired(group), self._on_desired, max_bytes=MAX_DESIRED_BYTES
                )
            self.session.start()
            if self.config.telemetry_interval_s > 0:
                self.telemetry = reporter_for(
                    self.config,
                    session=self.session,
                    server=self.server,
                    topic=self.topics.telemetry(self.config.device_id),
                    profile=self.detection.profile,
                ).start()
        self._deployer = threading.Thread(target=self._deploy_loop, name="deployer", daemon=True)
        self._deployer.start()
        self._wake.set()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._deployer is not None:
            self._deployer.join(timeout=30)
        if self.telemetry is not None:
            self.telemetry.close()  # before the session: unacknowledged messages go to the spool
        if self.session is not None:
            offline = self._reported(online=False).model_dump_json().encode()
            self.session.close(publish_last=(self.topics.reported(self.config.device_id), offline, True))
        self.server.close()

    def _make_session(self) -> MqttSession:
        assert self.config.broker_url is not None
        tls = None
        if self.config.tls_ca_file or self.config.tls_cert_file:
            tls = TLSConfig(
                ca_file=str(self.config.tls_ca_file) if self.config.tls_ca_file else None,
                cert_file=str(self.config.tls_cert_file) if self.config.tls_cert_file else None,
                key_file=str(self.config.tls_key_file) if self.config.tls_key_file else None,
            )
        broker = BrokerConfig.from_url(self.config.broker_url, protocol=self.config.mqtt_protocol, tls=tls)
        will = (
            self.topics.reported(self.config.device_id),
            Reported(device=self.config.device_id, online=False).model_dump_json().encode(),
        )
        return MqttSession(
            broker, f"edgeagent-{self.config.device_id}", will=will, on_connect=self.publish_reported
        )

    # --- reporting ---------------------------------------------------------------------

    def _reported(self, *, online: bool) -> Reported:
        models: dict[str, ModelStatus] = {}
        served = self.server.served()
        for name in sorted(set(self.store.model_names()) | set(served) | set(self.states)):
            current = self.store.current(name)
            previous = self.store.previous(name)
            active = served.get(name)
            models[name] = ModelStatus(
                bundle=self.refs.get(current) if current else None,
                previous=self.refs.get(previous) if previous else None,
                runtime=active.model.runtime if active else None,
                delegate=active.model.delegate if active else None,
                state=self.states.get(name, State.IDLE).value,
                acceptance=self.verdicts.get(name),
            )
        return Reported(
            device=self.config.device_id,
            online=online,
            agent_version=__version__,
            groups=list(self.config.groups),
            profile=self.detection.profile,
            hardware=self.detection.model_dump(mode="json", exclude={"candidates"}),
            models=models,
            last_deployment=self.last_outcome,
            desired_seq=dict(self.tracker.seqs),
        )

    def publish_reported(self) -> None:
        if self.session is not None:
            payload = self._reported(online=True).model_dump_json()
            self.session.publish(self.topics.reported(self.config.device_id), payload, qos=1, retain=True)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.session is None:
            return
        msg = EventMsg(device=self.config.device_id, kind=kind, **fields)
        self.session.publish(self.topics.events(self.config.device_id), msg.model_dump_json(), qos=1)

    # --- desired state -----------------------------------------------------------------

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained doc: nothing to do
        try:
            doc = self.tracker.offer(message.topic, message.payload)
        except (MalformedMessage, SignatureError, DocumentRefused) as exc:
            code = exc.code
            log.warning("refused a desired document on %s: %s", message.topic, exc)
            self._event("refused", code=code, reason=str(exc), detail={"topic": message.topic})
            return
        if doc is not None:
            log.info("accepted desired document %s seq %d", doc.target, doc.seq)
            self.publish_reported()
            self._wake.set()

    # --- commands ----------------------------------------------------------------------

    def _on_command(self, message: Message) -> None:
        try:
            opened = open_envelope(message.payload, self.trusted, insecure=self.config.insecure)
            command = parse(Command, opened.payload, "command")
            if command.target != f"device:{self.config.device_id}":
                raise MalformedMessage(f"command for {command.target!r} arrived on this device's topic")
            self.tracker.accept_command_seq(command.seq)
        except (MalformedMessage, SignatureError, DocumentRefused) as exc:
            log.warning("refused a command: %s", exc)
            self._event("refused", code=exc.code, reason=str(exc), detail={"topic": message.topic})
            command_id = _command_id(message.payload)
            if command_id:
                self._reply(CommandReply(id=command_id, ok=False, code=exc.code, detail=str(exc)))
            return
        # Off the MQTT handler thread: a bench runs the golden set on every served model.
        threading.Thread(
            target=self._run_command, args=(command,), name=f"cmd-{command.id}", daemon=True
        ).start()

    def _run_command(self, command: Command) -> None:
        try:
            if command.name == "refresh":
                self.publish_reported()
                self._wake.set()
                reply = CommandReply(id=command.id, ok=True, detail="reported state republished; reconciling")
            else:
                results = self._bench(command.model)
                ok = bool(results) and all(r["passed"] for r in results.values())
                detail = "acceptance re-run on " + (", ".join(results) or "no served model")
                reply = CommandReply(
                    id=command.id,
                    ok=ok,
                    code="ok" if ok else "acceptance_failed",
                    detail=detail,
                    result=results,
                )
        except EdgeError as exc:
            reply = CommandReply(id=command.id, ok=False, code=exc.code, detail=str(exc))
        self._reply(reply)

    def _bench(self, only: str | None) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, served in self.server.served().items():
            if (only is not None and name != only) or served.bundle_sha256 is None:
                continue
            folder = self.store.bundle_dir(served.bundle_sha256)
            gate = served_gate(parse_manifest((folder / MANIFEST_NAME).read_bytes()), served.decision)
            golden = load_golden(folder / gate.golden) if gate.golden else None
            # served.state: a stateful model replays on acceptance's own state, never a session's
            verdict = run_acceptance(
                served.model, gate, golden, profile=self.detection.profile, state=served.state
            )
            results[name] = verdict.model_dump(mode="json")
        return results

    def _reply(self, reply: CommandReply) -> None:
        if self.session is not None:
            self.session.publish(self.topics.cmd_reply(self.config.device_id), reply.model_dump_json(), qos=1)

    # --- deployments -------------------------------------------------------------------

    def _deploy_loop(self) -> None:
        self._resume_journals()
        while not self._stop.is_set():
            self._wake.wait(timeout=RETRY_TRANSIENT_S)
            self._wake.clear()
            for name, wanted in self.tracker.effective().items():
                if self._stop.is_set():
                    return
                if wanted.bundle.sha256 == self.store.current(name):
                    continue
                key = (name, wanted.bundle.sha256, wanted.source, wanted.seq)
                if key in self.failed:
                    continue
                self._deploy(name, wanted)

    def _resume_journals(self) -> None:
        for journal_path in sorted(self.store.journal_dir.glob("*.json")):
            name = journal_path.stem
            journal = JournalFile(self.store.journal_dir, name).load()
            state = resume_state(journal)
            if state is State.IDLE or journal.target is None:
                continue
            log.warning("resuming the deployment of %s %s from %s", name, journal.target.version, state.value)
            wanted = next((w for n, w in self.tracker.effective().items() if n == name), None)
            rollback_ok = wanted.rollback if wanted and wanted.bundle == journal.target else True
            self._run_deployment(name, journal, state, Wanted(journal.target, rollback_ok, "journal", 0))

    def _current_version(self, name: str) -> str | None:
        current = self.store.current(name)
        if current is None:
            return None
        try:
            return parse_manifest((self.store.bundle_dir(current) / MANIFEST_NAME).read_bytes()).version
        except (OSError, EdgeError):
            return None

    def _deploy(self, name: str, wanted: Wanted) -> None:
        try:
            check_not_downgrade(wanted, self._current_version(name))
        except DocumentRefused as exc:
            self.failed.add((name, wanted.bundle.sha256, wanted.source, wanted.seq))
            self._event("refused", model=name, bundle=wanted.bundle, code=exc.code, reason=str(exc))
            self._outcome(name, wanted.bundle, ok=False, code=exc.code, reason=str(exc))
            return
        journal = Journal(name, State.IDLE, wanted.bundle, previous=self.store.current(name))
        self._run_deployment(name, journal, next_state(State.IDLE, Event.DEPLOY), wanted)

    def _enter(self, jf: JournalFile, journal: Journal, state: State) -> None:
        journal.state = state
        jf.save(journal)  # before the step acts on the device
        self.states[journal.model] = state
        self._event("state", model=journal.model, bundle=journal.target, state=state.value)
        crash_point(state)

    def _run_deployment(self, name: str, journal: Journal, state: State, wanted: Wanted) -> None:
        assert journal.target is not None
        ref = journal.target
        jf = JournalFile(self.store.journal_dir, name)
        served = None
        try:
            while state not in (State.IDLE, State.ROLLING_BACK):
                self._enter(jf, journal, state)
                event, served = self._step(journal, state, served)
                state = next_state(state, event)
        except TransferError as exc:
            if "will resume" in str(exc) or self._stop.is_set():
                log.warning("download of %s paused: %s", ref.version, exc)
                return  # journal stays in downloading; resumed when the broker is back
            state = self._fail(jf, journal, state, "transfer_failed", str(exc))
        except DeploymentFailed as exc:
            state = self._fail(jf, journal, state, exc.code, str(exc))
        except EdgeError as exc:
            state = self._fail(jf, journal, state, exc.code, str(exc))
        if state is State.ROLLING_BACK:
            self._enter(jf, journal, State.ROLLING_BACK)
            self._rollback(name, journal)
            self.failed.add((name, ref.sha256, wanted.source, wanted.seq))
            state = next_state(State.ROLLING_BACK, Event.ROLLED_BACK)
            self._outcome(name, ref, ok=False, code=journal.code, reason=journal.reason)
        journal.state = State.IDLE
        jf.save(journal)
        self.states[name] = State.IDLE
        self.publish_reported()

    def _fail(self, jf: JournalFile, journal: Journal, state: State, code: str, reason: str) -> State:
        log.error("deployment of %s failed in %s: %s", journal.model, state.value, reason)
        journal.code, journal.reason = code, reason
        jf.save(journal)
        return next_state(state, Event.FAILED)

    def _step(self, journal: Journal, state: State, served: Any) -> tuple[Event, Any]:
        name, ref = journal.model, journal.target
        assert ref is not None  # a journal in a working state always has its target
        if state is State.DOWNLOADING:
            # --- delivery by content: installs bundles/<sha256>/ itself (the next steps skip) ---
            if ref.index is not None and not self.store.has_bundle(ref.sha256) and self.fetcher is not None:
                self.fetcher.fetch(
                    ref,
                    progress=lambda got, total: self._event(
                        "progress", model=name, bundle=ref, received=got, total=total
                    ),
                    precisions=self.config.precision_for(name),
                )
                self._event(
                    "progress", model=name, bundle=ref, detail={"served_by": self.fetcher.report.served_by}
                )
            elif ref.source.startswith(("http://", "https://")) and self.fetcher is not None:
                self.fetcher.fetch_bundle_url(ref)  # the whole bundle over HTTP(S); else the registry
            # --- end delivery by content ---
            if not self.store.has_bundle(ref.sha256):
                if self.downloader is None:
                    raise DeploymentFailed("no broker configured to download from", code="no_broker")
                self.downloader.fetch(
                    ref,
                    progress=lambda got, total: self._event(
                        "progress", model=name, bundle=ref, received=got, total=total
                    ),
                )
            return Event.DOWNLOADED, served
        if state is State.VERIFYING:
            if not self.store.has_bundle(ref.sha256):
                verified = verify_bundle(
                    self._download_path(ref), self.trusted, allow_unsigned=self.config.insecure
                )
                if verified.sha256 != ref.sha256:
                    raise DeploymentFailed(
                        "downloaded bundle does not have the expected sha256", code="hash_mismatch"
                    )
                if (verified.manifest.name, verified.manifest.version) != (ref.name, ref.version):
                    raise DeploymentFailed(
                        f"bundle is {verified.manifest.name} {verified.manifest.version}, "
                        f"the desired doc says {ref.name} {ref.version}",
                        code="wrong_bundle",
                    )
            return Event.VERIFIED, served
        if state is State.INSTALLING:
            if not self.store.has_bundle(ref.sha256):
                self.store.install(
                    self._download_path(ref), ref.sha256, self.trusted, allow_unsigned=self.config.insecure
                )
            self._remember_ref(ref)
            return Event.INSTALLED, served
        if state is State.VALIDATING:
            served = self._prepare(name, ref.sha256)
            self.verdicts[name] = served.verdict or {}
            return Event.ACCEPTED, served
        if state is State.ACTIVATING:
            if served is None:  # resumed after a crash: validate again (acceptance is cheap)
                served = self._prepare(name, ref.sha256)
            if journal.previous and journal.previous != ref.sha256:
                self.store.set_link(name, "previous", journal.previous)
            self.store.set_link(name, "current", ref.sha256)
            self.server.activate(served, default=name == "default")
            return Event.ACTIVATED, served
        if state is State.COMMITTED:
            self._outcome(name, ref, ok=True, code="committed", reason="")
            self.store.prune(self.config.keep_bundles)  # also drops the finished download
            return Event.DONE, served
        raise DeploymentFailed(f"no step for state {state.value}", code="bug")

    def _download_path(self, ref: BundleRef) -> Path:
        return self.store.downloads / f"{ref.sha256}.bundle"

    def _prepare(self, name: str, sha: str) -> Any:
        folder = self.store.bundle_dir(sha)
        manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes())
        return prepare_served_model(
            folder,
            manifest,
            self.candidates,
            profile=self.detection.profile,
            name=name,
            bundle_sha256=sha,
            precisions=self.config.precision_for(name),
        )

    def _rollback(self, name: str, journal: Journal) -> None:
        previous = journal.previous
        current = self.store.current(name)
        if current == previous:
            return  # nothing was switched yet: the previous model never stopped serving
        if previous is None:
            self.store.set_link(name, "current", None)
            self.server.deactivate(name)
            return
        self.store.set_link(name, "current", previous)
        try:
            self.server.activate(self._prepare(name, previous), default=name == "default")
        except EdgeError as exc:
            log.error("could not serve %s's previous bundle again: %s", name, exc)

    def _outcome(self, name: str, ref: BundleRef, *, ok: bool, code: str, reason: str) -> None:
        self.last_outcome = DeploymentOutcome(model=name, bundle=ref, ok=ok, code=code, reason=reason)
        self._event(
            "outcome",
            model=name,
            bundle=ref,
            ok=ok,
            code=code,
            reason=reason,
            detail={"acceptance": self.verdicts.get(name)} if ok else {},
        )
        self.publish_reported()

    # --- installed models --------------------------------------------------------------

    def _serve_installed(self) -> None:
        for name in self.store.model_names():
            sha = self.store.current(name)
            if sha is None:
                continue
            try:
                served = self._prepare(name, sha)
            except EdgeError as exc:
                log.error("cannot serve installed model %s (%s): %s", name, sha[:12], exc)
                continue
            self.server.activate(served, default=name == "default")
            self.verdicts[name] = served.verdict or {}

    def _load_refs(self) -> dict[str, BundleRef]:
        try:
            body = json.loads(self.refs_file.read_bytes())
            return {k: BundleRef.model_validate(v) for k, v in body.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError) as exc:
            log.error("%s is unreadable (%s)", self.refs_file, exc)
            return {}

    def _remember_ref(self, ref: BundleRef) -> None:
        self.refs[ref.sha256] = ref
        atomic_write_bytes(
            self.refs_file, json.dumps({k: v.model_dump() for k, v in self.refs.items()}, indent=2).encode()
        )


def _command_id(payload: bytes) -> str | None:
    """The id of a refused command, if it can be read at all, so the sender gets a reply."""
    try:
        body = json.loads(json.loads(payload)["payload"])
        value = body.get("id")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def _load_trusted(folder: Path, insecure: bool) -> KeyRing:
    """Trusted keys; a missing folder is only fatal when something must be verified."""
    if not folder.is_dir():
        if insecure:
            return KeyRing()
        raise UsageError(f"trusted key folder {folder} does not exist (set trusted_keys in agent.toml)")
    return KeyRing.from_paths([folder])
