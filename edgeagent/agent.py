"""The deploying agent: wires the MQTT session, the deployment engine, the served models,
reporting and commands together.

Threads: the MQTT session's network and handler threads (desired docs arrive there and only
wake the deployer), the deployer thread (:class:`edgeagent.deploy.Supervisor`, deployments
one at a time), and the inference server's threads. The main thread runs
:class:`edgeagent.service.AgentService`; :meth:`Agent.start` and :meth:`Agent.close` bracket it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from devices.detect import Detection
from edgeagent.commands import Commands
from edgeagent.config import AgentConfig
from edgeagent.connect import agent_session, load_trusted
from edgeagent.delivery.downloader import DeliveryDownloader, device_downloader
from edgeagent.deploy import Backoff, DeviceStore, Engine, Ports, Settings, State, Supervisor, heal
from edgeagent.deploy.ports import SystemClock
from edgeagent.desired import DesiredTracker, refusal_detail
from edgeagent.errors import DocumentRefused, MalformedMessage, SignatureError
from edgeagent.mqtt import Message, MqttSession
from edgeagent.protocol import BundleRef, CommandReply, Topics
from edgeagent.ratelimit import RefusalReporter
from edgeagent.reporting import Reporter
from edgeagent.served import ServedModels
from edgeagent.serving.server import InferenceServer, ServerLimits
from edgeagent.signing import KeyRing
from edgeagent.store import Store
from edgeagent.telemetry import TelemetryReporter, reporter_for
from edgeagent.trust import MAX_KEYSET_BYTES, TrustStore, device_trust

log = logging.getLogger(__name__)

MAX_DESIRED_BYTES = 64 * 1024
MiB = 1024 * 1024
STOP_TIMEOUT_S = 4.0  # the deployer's share of the 5 s a SIGTERM may take


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        detection: Detection,
        *,
        server: InferenceServer | None = None,
        trusted: KeyRing | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.detection = detection
        self.topics = Topics(config.topic_prefix)
        # Without a broker nothing new arrives to verify: a serve-only agent needs no keys.
        needs_keys = config.broker_url is not None and not config.insecure
        # With a trust root the folder is optional: key sets from edge/v1/trust replace it.
        folder_optional = not needs_keys or config.trust_root is not None
        self.trusted = trusted if trusted is not None else load_trusted(config.trusted_keys, folder_optional)
        self.trust: TrustStore | None = device_trust(config.trust_root, config.state_dir, self.trusted)
        self.server = server or InferenceServer(
            config.socket_path,
            limits=ServerLimits(max_sessions=config.max_sessions, session_idle_s=config.session_idle_s),
        )
        self.store = DeviceStore(
            Store(config.state_dir),
            self.trusted,
            allow_unsigned=config.insecure,
            keep_bundles=config.keep_bundles,
        )
        self.tracker = DesiredTracker(
            config.state_dir / "desired.json",
            self.trusted,
            device_id=config.device_id,
            groups=list(config.groups),
            topics=self.topics,
            insecure=config.insecure,
        )
        self.served = ServedModels(
            self.server,
            self.store.store,
            detection.candidates,
            profile=detection.profile,
            precisions=config.precision_for,
        )
        self.on_fatal = on_fatal or (lambda reason: None)
        self.states: dict[str, State] = {}
        self.reporter = Reporter(
            config.device_id,
            self.topics,
            self.store,
            self.server,
            detection,
            groups=list(config.groups),
            states=self.states,
            desired_seqs=lambda: dict(self.tracker.seqs),
            keyset_version=lambda: self.trust.version if self.trust else None,
        )
        # Refusals are logged and published at a bounded rate: a flood costs one summary per interval.
        self.refusals = RefusalReporter(self.reporter.event)
        self.engine = self._make_engine()
        self.supervisor = Supervisor(
            self.engine,
            self.tracker.effective,
            on_fatal=lambda reason: self.on_fatal(reason),
            heal=lambda: self._heal(serve=True),
            heal_interval_s=config.store_check_interval_s or float("inf"),
        )
        self.commands = Commands(
            config.device_id,
            self.trusted,
            self.tracker,
            self.served,
            insecure=config.insecure,
            refresh=self._refresh,
            reply=self._reply,
            refused=self.refusals.refused,
        )
        self.session: MqttSession | None = None
        self.downloader: DeliveryDownloader | None = None
        self.telemetry: TelemetryReporter | None = None
        if config.insecure:
            log.warning(
                "INSECURE MODE: unsigned desired docs and bundles are accepted. Never use this in production."
            )

    def _make_engine(self) -> Engine:
        c = self.config
        settings = Settings(
            backoff=Backoff(
                base_s=c.retry_base_s,
                cap_s=max(c.retry_cap_s, c.retry_base_s),
                max_attempts=c.deploy_max_attempts,
            ),
            max_bundle_bytes=int(c.max_bundle_mb * MiB),
            margin_bytes=int(c.free_space_margin_mb * MiB),
        )
        ports = Ports(self.store, None, self.served, self.reporter, SystemClock())
        return Engine(ports, self.store.store.journal_dir, settings, threading.Event(), states=self.states)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Agent:
        self._heal(serve=False)  # before anything is served: never load a corrupt bundle
        self.served.serve_installed()
        self.server.start()  # listening only once the installed models are loaded: no 503 window
        if self.config.broker_url:
            self.session = agent_session(
                config=self.config, topics=self.topics, on_connect=self.reporter.publish_reported
            )
            self.reporter.session = self.session
            self.downloader = device_downloader(
                self.config,
                self.session,
                topics=self.topics,
                trusted=self.trusted,
                detection=self.detection,
                precisions_for=lambda ref: self.config.precision_for(self._model_of(ref)),
                served_by=lambda ref, by: self.reporter.event(
                    "progress", model=self._model_of(ref), bundle=ref, detail={"served_by": by}
                ),
                installed=self.store.has_bundle,
                fetching_next=lambda ref, detail: self.reporter.event(
                    "progress", model=self._model_of(ref), bundle=ref, code="next_candidate", detail=detail
                ),
            )
            self.engine.ports.downloader = self.downloader
            self._subscribe(self.session)
            self.session.start()
            if self.config.telemetry_interval_s > 0:
                self.telemetry = reporter_for(
                    self.config,
                    session=self.session,
                    server=self.server,
                    topic=self.topics.telemetry(self.config.device_id),
                    profile=self.detection.profile,
                ).start()
        self.supervisor.start()
        return self

    def close(self) -> None:
        self.supervisor.close(STOP_TIMEOUT_S)
        self.refusals.close()  # the pending summary goes out before the session closes
        if self.telemetry is not None:
            self.telemetry.close()  # before the session: unacknowledged messages go to the spool
        if self.session is not None:
            offline = self.reporter.reported(online=False).model_dump_json().encode()
            self.session.close(publish_last=(self.topics.reported(self.config.device_id), offline, True))
        self.server.close()

    def _subscribe(self, session: MqttSession) -> None:
        device = self.config.device_id
        if self.trust is not None:  # first: a retained key set must apply to the retained docs
            session.subscribe(self.topics.trust, self._on_trust, max_bytes=MAX_KEYSET_BYTES)
        session.subscribe(self.topics.cmd(device), self.commands.on_message, max_bytes=MAX_DESIRED_BYTES)
        # the device's and its groups' desired docs, and their models' own docs
        for topic_filter in self.tracker.topic_filters():
            session.subscribe(topic_filter, self._on_desired, max_bytes=MAX_DESIRED_BYTES)

    # --- desired state, commands, healing -----------------------------------------------

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained doc: nothing to do
        try:
            doc = self.tracker.offer(message.topic, message.payload)
        except (MalformedMessage, SignatureError, DocumentRefused) as exc:
            detail = refusal_detail(message.topic, message.payload, exc)
            self.refusals.refused("a desired document", exc.code, str(exc), detail)
            return
        if doc is not None:
            log.info("accepted desired document %s seq %d", doc.target, doc.seq)
            self.reporter.publish_reported()
            self.supervisor.wake.set()

    def _on_trust(self, message: Message) -> None:
        if self.trust is None:
            return
        try:
            accepted = self.trust.offer(message.payload)
        except (MalformedMessage, SignatureError, DocumentRefused) as exc:
            detail = refusal_detail(message.topic, message.payload, exc)
            self.refusals.refused("a key set", exc.code, str(exc), detail)
            return
        if accepted is not None:
            self.reporter.publish_reported()

    def _refresh(self) -> str:
        self.reporter.publish_reported()
        self.supervisor.request_refresh()
        return "reported state republished; failed desired bundles cleared; reconciling"

    def _reply(self, reply: CommandReply) -> None:
        if self.session is not None:
            self.session.publish(self.topics.cmd_reply(self.config.device_id), reply.model_dump_json(), qos=1)

    def _model_of(self, ref: BundleRef) -> str:
        """The model name the desired state gives ``ref`` (its bundle name when none does)."""
        names = [n for n, w in self.tracker.effective().items() if w.bundle.sha256 == ref.sha256]
        return names[0] if names else ref.name

    def _heal(self, *, serve: bool) -> None:
        heal(self.store, self.reporter, self.store.store.model_names(), server=self.served if serve else None)
