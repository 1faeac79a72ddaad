"""The deployment state machine of one model name: one transition table, one resume map.

::

    idle -> downloading -> verifying -> installing -> validating -> activating -> committed -> idle
                 \\______________\\____________\\____________\\____________\\--> rolling_back -> idle

An event with no transition is a bug: :class:`IllegalTransition` is deliberately *not* an
:class:`~edgeagent.errors.EdgeError`, so no handler of deployment failures can turn it into
a rollback; the supervisor saves the journal and ends the process (systemd restarts it).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

# Not EDGEAGENT_*: those are configuration settings, and the config refuses unknown ones.
CRASH_ENV = "EDGE_TEST_CRASH_AT"


class State(str, enum.Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"


class Event(str, enum.Enum):
    DEPLOY = "deploy"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    ACCEPTED = "accepted"
    ACTIVATED = "activated"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


_S, _E = State, Event
WORKING = (_S.DOWNLOADING, _S.VERIFYING, _S.INSTALLING, _S.VALIDATING, _S.ACTIVATING)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (_S.IDLE, _E.DEPLOY): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.DOWNLOADED): _S.VERIFYING,
    (_S.VERIFYING, _E.VERIFIED): _S.INSTALLING,
    (_S.INSTALLING, _E.INSTALLED): _S.VALIDATING,
    (_S.VALIDATING, _E.ACCEPTED): _S.ACTIVATING,
    (_S.ACTIVATING, _E.ACTIVATED): _S.COMMITTED,
    (_S.COMMITTED, _E.DONE): _S.IDLE,
    **{(state, _E.FAILED): _S.ROLLING_BACK for state in WORKING},
    (_S.ROLLING_BACK, _E.ROLLED_BACK): _S.IDLE,
}

# Where a deployment saved in each state picks up after a crash. Every step skips work
# that is already done (a finished download, an installed bundle), so the early states go
# back to downloading: a download removed by a crash or a clean-up is fetched again instead
# of failing verification. A loaded model does not survive a restart, so activating goes
# back to validating to load (and prove) it again before it is switched in.
RESUME: dict[State, State] = {
    _S.IDLE: _S.IDLE,
    _S.DOWNLOADING: _S.DOWNLOADING,
    _S.VERIFYING: _S.DOWNLOADING,
    _S.INSTALLING: _S.DOWNLOADING,
    _S.VALIDATING: _S.VALIDATING,
    _S.ACTIVATING: _S.VALIDATING,
    _S.COMMITTED: _S.COMMITTED,
    _S.ROLLING_BACK: _S.ROLLING_BACK,
}


class IllegalTransition(Exception):
    """An event that the table has no transition for: a bug, so the agent exits."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def resume_state(state: State) -> State:
    return RESUME[state]


def crash_point(state: State) -> None:
    """Test hook: ``EDGE_TEST_CRASH_AT=<state>`` kills the process (SIGKILL) on entering it.

    Used by the whole-process crash tests; never set in production. A ``state:N`` value
    crashes on the N-th entry only (so the restarted agent gets through).
    """
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != state.value:
        return
    counter = Path(os.environ.get("EDGE_TEST_CRASH_COUNTER", "/nonexistent"))
    if nth:
        try:
            seen = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(seen))
        except OSError:
            seen = 1
        if seen != int(nth):
            return
    log.warning("crash point %s reached: SIGKILL", state.value)
    os.kill(os.getpid(), signal.SIGKILL)
