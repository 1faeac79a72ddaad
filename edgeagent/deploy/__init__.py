"""The deployment engine (Mender's client is the model).

- :mod:`.machine`: states, events, the one transition table and the resume map;
- :mod:`.journal`: the typed journal (save before act, attempts, the persisted failed set);
- :mod:`.retry`: transient vs deterministic failures, backoff with jitter;
- :mod:`.ports`: the Protocols the steps run over (store, downloader, server, reporter, clock);
- :mod:`.steps`: one function per state;
- :mod:`.engine`: what to deploy, running the steps, classifying failures;
- :mod:`.supervisor`: the deployer thread, which ends the process on a bug;
- :mod:`.heal`: the store check that falls back from a corrupt bundle;
- :mod:`.device`: the real store port.
"""

from edgeagent.deploy.device import DeviceStore
from edgeagent.deploy.engine import Engine, Settings, failure_code
from edgeagent.deploy.heal import heal
from edgeagent.deploy.journal import DocKey, Failed, Journal, JournalFile
from edgeagent.deploy.machine import (
    RESUME,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    crash_point,
    next_state,
    resume_state,
)
from edgeagent.deploy.retry import Backoff, Kind, kind_of
from edgeagent.deploy.steps import Context, Ports
from edgeagent.deploy.supervisor import Supervisor

__all__ = [
    "RESUME",
    "TRANSITIONS",
    "Backoff",
    "Context",
    "DeviceStore",
    "DocKey",
    "Engine",
    "Event",
    "Failed",
    "IllegalTransition",
    "Journal",
    "JournalFile",
    "Kind",
    "Ports",
    "Settings",
    "State",
    "Supervisor",
    "crash_point",
    "failure_code",
    "heal",
    "kind_of",
    "next_state",
    "resume_state",
]
