"""The deployment engine in-process, over fakes: every state x every fault, in milliseconds.

Each case deploys v2 over a serving v1 with one fault injected the first time the engine
runs the step of one state, then restarts the "process" when the fault ended it, and
checks the journal, the events and the active model after each phase. Whole-process kill
tests (tests/test_deploy.py) remain as the smoke set.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.deploy import IllegalTransition, JournalFile, State, Supervisor, heal, steps
from edgeagent.errors import EdgeError, HashMismatch
from tests.engine_fakes import V1, V2, MiB, World

WORKING = ["downloading", "verifying", "installing", "validating", "activating"]
STATES = [*WORKING, "committed", "rolling_back"]
FAULTS = ["crash", "enospc", "eio", "hang", "bad_hash"]


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """The journal folder: in memory where the machine has /dev/shm, so a busy disk's fsync
    does not set the pace of a logic test."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="engine-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Crash(BaseException):
    """SIGKILL, in-process: nothing in the engine may catch it."""


HUNG = threading.Event()  # set when a hanging step has been entered


def _fault(kind: str, stop: threading.Event) -> None:
    if kind == "crash":
        raise Crash
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device")
    if kind == "eio":
        raise OSError(errno.EIO, "Input/output error")
    if kind == "bad_hash":
        raise HashMismatch("models/m.onnx: sha256 differs from the manifest")
    HUNG.set()
    stop.wait()  # hang: until the agent is told to stop


def _inject(monkeypatch: pytest.MonkeyPatch, world: World, state: str, kind: str) -> None:
    fired = []

    def wrap(step: Callable[..., Any]) -> Callable[..., Any]:
        def faulty(ctx: steps.Context, journal: Any, **kw: Any) -> Any:
            if not fired:
                fired.append(True)
                _fault(kind, ctx.stop)
                if kind == "hang" and state == "downloading":
                    from edgeagent.errors import TransferPaused

                    raise TransferPaused("transfer stopped", sha256=V2.sha256)
            return step(ctx, journal, **kw)

        return faulty

    if state == "rolling_back":
        world.refuse.add(V2.sha256)  # acceptance fails, so there is a rollback to fault
        monkeypatch.setattr(steps, "roll_back", wrap(steps.roll_back))
    else:
        monkeypatch.setitem(steps.STEPS, State(state), wrap(steps.STEPS[State(state)]))


def _run(world: World, kind: str) -> str:
    """One process lifetime, as the supervisor runs it; how it ended."""
    if kind == "hang":  # the agent is stopped (SIGTERM) while the step hangs
        ended: list[str] = []
        thread = threading.Thread(target=lambda: ended.append(_run_once(world)))
        HUNG.clear()
        thread.start()
        assert HUNG.wait(5), "the step with the hang was never entered"
        world.engine.stop.set()
        thread.join(5)
        assert not thread.is_alive(), "the engine did not stop within 5 s of the stop"
        return ended[0]
    return _run_once(world)


def _run_once(world: World) -> str:
    try:
        world.engine.resume_all()
        world.engine.reconcile(world.want())
    except Crash:
        return "killed"
    except Exception as exc:  # what the supervisor turns into a non-zero exit
        world.engine.save_active(repr(exc))
        return f"exit:{type(exc).__name__}"
    return "ran"


def _journal(world: World) -> dict[str, Any]:
    return json.loads(JournalFile(world.journal_dir, "default").path.read_text())


# (state, fault) -> how the first process ended, the journal state it left, the active model,
# the outcome reported. Unlisted working-state cases follow the defaults below.
ENDS: dict[tuple[str, str], tuple[str, str, str | None, str | None]] = {}
for s in WORKING:
    ENDS[(s, "crash")] = ("killed", s, V2.sha256 if s == "activating" else V1.sha256, None)
    ENDS[(s, "enospc")] = ("ran", "idle", V1.sha256, "insufficient_space")
    ENDS[(s, "eio")] = ("ran", "idle", V1.sha256, "io_error")
    ENDS[(s, "hang")] = ("ran", s, V1.sha256, None)
    ENDS[(s, "bad_hash")] = ("ran", "idle", V1.sha256, "hash_mismatch")
# Activating's own fault lands before it switches: v1 still serves.
ENDS[("activating", "crash")] = ("killed", "activating", V1.sha256, None)
ENDS[("activating", "hang")] = ("ran", "activating", V2.sha256, None)  # slow, not failed: it switched
for f in ("crash", "enospc", "eio", "bad_hash"):
    # Committed: v2 serves already; a failure there has no transition -> the process ends.
    ENDS[("committed", f)] = (
        "killed" if f == "crash" else "exit:IllegalTransition",
        "committed",
        V2.sha256,
        None,
    )
    # Rolling back (after acceptance refused v2): the rollback is resumed by the next process.
    exit_kind = "killed" if f == "crash" else ("exit:HashMismatch" if f == "bad_hash" else "exit:OSError")
    ENDS[("rolling_back", f)] = (exit_kind, "rolling_back", V1.sha256, None)
ENDS[("committed", "hang")] = ("ran", "idle", V2.sha256, "committed")
ENDS[("rolling_back", "hang")] = ("ran", "idle", V1.sha256, "acceptance_failed")


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_in_every_state(state: str, fault: str, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(shm)
    _inject(monkeypatch, world, state, fault)
    ended, journal_state, active, outcome = ENDS[(state, fault)]

    assert _run(world, fault) == ended
    journal = _journal(world)
    assert journal["state"] == journal_state
    assert world.active() == active, "exactly one consistent model serves after the fault"
    assert (world.reporter.outcomes() or [None])[-1] == outcome
    if outcome in ("insufficient_space", "io_error", "hash_mismatch"):
        # Transient: nothing left on disk, a retry planned and counted.
        assert world.store.downloads == {} and V2.sha256 not in world.store.bundles
        assert journal["attempts"] == 1 and journal["retry_at"] > world.clock.now()
        assert journal["failed"] == []

    # The next process (and, for a transient failure, the retry time) finishes the job by itself.
    world.clock.t += 3600
    seen = world.reporter.outcomes()
    world.restart()
    assert _run_once(world) == "ran"
    seen += world.reporter.outcomes()
    final = _journal(world)
    assert final["state"] == "idle"
    if state == "rolling_back":
        assert world.active() == V1.sha256 and world.store.current("default") == V1.sha256
        assert seen[-1] == "acceptance_failed"
        assert [f["code"] for f in final["failed"]] == ["acceptance_failed"]
        assert V2.sha256 not in world.store.bundles, "a rejected bundle is removed"
    else:
        assert world.active() == V2.sha256 and world.store.current("default") == V2.sha256
        assert world.store.previous("default") == V1.sha256
        assert world.store.downloads == {}


def test_illegal_transition_is_not_an_edge_error_and_ends_the_process(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not issubclass(IllegalTransition, EdgeError)
    world = World(shm)
    monkeypatch.setitem(
        steps.STEPS, State.COMMITTED, lambda ctx, j: (_ for _ in ()).throw(OSError(errno.EIO, "EIO"))
    )
    fatal: list[str] = []
    sup = Supervisor(world.engine, world.want, on_fatal=fatal.append, poll_s=0.01)
    sup.main()  # returns once the bug ended it
    assert fatal and fatal[0].startswith("IllegalTransition: no transition from committed on failed")
    journal = _journal(world)
    assert journal["state"] == "committed" and "IllegalTransition" in journal["reason"]


def test_deterministic_failure_is_not_retried_until_refresh(shm: Path) -> None:
    world = World(shm)
    world.refuse.add(V2.sha256)
    world.engine.reconcile(world.want())
    assert world.reporter.outcomes() == ["acceptance_failed"]
    # A restart does not re-run it: the failed set is on disk.
    world.clock.t += 86400
    world.restart()
    world.engine.resume_all()
    world.engine.reconcile(world.want())
    assert world.reporter.outcomes() == [] and world.downloader.fetched == []
    # command refresh asks again on purpose (and a fixed device now passes).
    world.refuse.clear()
    assert world.engine.refresh(world.want()) == ["default"]
    world.engine.reconcile(world.want())
    assert world.reporter.outcomes() == ["committed"] and world.active() == V2.sha256


def test_transient_failures_back_off_and_give_up_at_the_cap(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(shm)

    def corrupt(ctx: steps.Context, journal: Any) -> Any:
        raise HashMismatch("downloaded file has another sha256")

    monkeypatch.setitem(steps.STEPS, State.VERIFYING, corrupt)
    waits = []
    for attempt in range(1, 4):
        world.engine.reconcile(world.want())
        journal = _journal(world)
        assert journal["attempts"] == attempt
        waits.append(journal["retry_at"] - world.clock.now())
        world.engine.reconcile(world.want())  # before the retry time: nothing happens
        assert world.reporter.outcomes().count("hash_mismatch") == attempt
        world.clock.t += 3600
    # base 10 s doubling, capped at 60 s, jitter 0.5 -> 0.75 of the ceiling; the third gave up.
    assert waits[:2] == [7.5, 15.0] and waits[2] <= 0
    assert [f["code"] for f in _journal(world)["failed"]] == ["hash_mismatch"]
    world.engine.reconcile(world.want())
    assert world.reporter.outcomes().count("hash_mismatch") == 3
    assert world.active() == V1.sha256


def test_a_crash_loop_is_broken_after_max_attempts(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(shm)

    def segfault(ctx: steps.Context, journal: Any) -> Any:
        raise Crash

    monkeypatch.setitem(steps.STEPS, State.VALIDATING, segfault)
    for _ in range(3):
        assert _run_once(world) == "killed"
        world.restart()
    assert _run_once(world) == "ran"
    journal = _journal(world)
    assert journal["state"] == "idle" and journal["code"] == "too_many_attempts"
    assert world.reporter.outcomes() == ["too_many_attempts"] and world.active() == V1.sha256


def test_too_little_space_is_refused_before_the_download(shm: Path) -> None:
    world = World(shm)
    world.store.free = 2 * MiB  # v2 needs 1 MiB download + 1 MiB extracted + 1 MiB margin
    world.engine.reconcile(world.want())
    assert world.downloader.fetched == [] and world.reporter.outcomes() == ["insufficient_space"]
    assert world.active() == V1.sha256
    # Space comes back: the retry goes through with nobody touching the device.
    world.store.free = 100 * MiB
    world.clock.t += 3600
    world.engine.reconcile(world.want())
    assert world.active() == V2.sha256


def test_an_oversized_bundle_is_refused_unread(shm: Path) -> None:
    world = World(shm)
    huge = V2.model_copy(update={"size": 3 * 1024**3})
    world.engine.reconcile(world.want(huge))
    assert world.reporter.events == [("refused", "too_large"), ("outcome", "too_large")]
    assert world.downloader.fetched == [] and not (shm / "default.json").read_text().count('"downloading"')


def test_corrupt_active_bundle_falls_back_to_the_previous(shm: Path) -> None:
    world = World(shm)
    world.engine.reconcile(world.want())
    assert world.active() == V2.sha256
    world.store.corrupt.add(V2.sha256)
    assert heal(world.store, world.reporter, ["default"], server=world.server) == ["default"]
    assert world.active() == V1.sha256 and world.store.current("default") == V1.sha256
    assert ("store", "store_corrupt") in world.reporter.events
    assert V2.sha256 not in world.store.bundles
    # The desired state still names v2: the engine fetches it again, intact this time.
    world.store.corrupt.clear()
    world.engine.reconcile(world.want())
    assert world.active() == V2.sha256 and world.downloader.fetched == [V2.sha256, V2.sha256]


def test_corrupt_bundle_without_an_intact_previous_keeps_serving(shm: Path) -> None:
    world = World(shm)
    world.store.corrupt.add(V1.sha256)
    assert heal(world.store, world.reporter, ["default"], server=world.server) == []
    assert world.active() == V1.sha256 and ("store", "store_corrupt") in world.reporter.events


def test_a_newer_document_does_not_wait_for_the_retry_time(shm: Path) -> None:
    world = World(shm)
    world.store.free = 2 * MiB
    world.engine.reconcile(world.want(seq=1))
    assert world.reporter.outcomes() == ["insufficient_space"]
    world.store.free = 100 * MiB
    world.engine.reconcile(world.want(seq=1))  # the same document: waits for its retry time
    assert world.active() == V1.sha256
    world.engine.reconcile(world.want(seq=2))  # the operator pushed again
    assert world.active() == V2.sha256


def test_a_newer_document_gets_fresh_attempts(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(shm)
    monkeypatch.setitem(
        steps.STEPS, State.VERIFYING, lambda ctx, j: (_ for _ in ()).throw(HashMismatch("bad"))
    )
    for _ in range(3):
        world.engine.reconcile(world.want(seq=1))
        world.clock.t += 3600
    assert _journal(world)["attempts"] == 3 and len(_journal(world)["failed"]) == 1
    monkeypatch.undo()
    world.engine.reconcile(world.want(seq=2))
    assert world.active() == V2.sha256 and world.reporter.outcomes()[-1] == "committed"


def test_a_full_disk_under_the_journal_ends_the_process_and_the_next_one_recovers(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(shm)
    real_save = JournalFile.save
    fail = {"n": 2}  # the save before installing, then the one before rolling back

    def save(self: JournalFile, journal: Any) -> None:
        if fail["n"] > 0 and journal.state in (State.INSTALLING, State.ROLLING_BACK):
            fail["n"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, journal)

    monkeypatch.setattr(JournalFile, "save", save)
    assert _run_once(world) == "exit:OSError"  # the supervisor ends the process (exit 70)
    # The supervisor saved the rollback it was about to run (the disk had room again for that).
    assert world.active() == V1.sha256 and _journal(world)["state"] == "rolling_back"
    world.restart()  # systemd: Restart=always
    assert _run_once(world) == "ran"
    assert world.reporter.outcomes() == ["insufficient_space"] and world.active() == V1.sha256
    assert world.store.downloads == {} and V2.sha256 not in world.store.bundles
    world.clock.t += 3600  # the retry, with nobody touching the device
    world.engine.reconcile(world.want())
    assert world.active() == V2.sha256 and _journal(world)["state"] == "idle"


def test_the_supervisor_checks_the_store_on_its_schedule(shm: Path) -> None:
    world = World(shm)
    now = [0.0]
    healed: list[float] = []
    rounds = iter(range(7))

    def wanted() -> Any:
        if next(rounds, None) is None:
            world.engine.stop.set()
        now[0] += 40.0  # each round, 40 s pass
        return {}

    sup = Supervisor(
        world.engine,
        wanted,
        on_fatal=pytest.fail,
        heal=lambda: healed.append(now[0]),
        heal_interval_s=100.0,
        poll_s=0.0,
        clock=lambda: now[0],
    )
    sup.main()
    assert healed == [120.0, 240.0]


def test_refresh_runs_on_the_deployer_thread(shm: Path) -> None:
    world = World(shm)
    world.refuse.add(V2.sha256)
    world.engine.reconcile(world.want())
    world.refuse.clear()
    rounds = iter(range(2))

    def wanted() -> Any:
        if next(rounds, None) is None:
            world.engine.stop.set()
        return world.want()

    sup = Supervisor(world.engine, wanted, on_fatal=pytest.fail, poll_s=0.0)
    sup.request_refresh()
    sup.main()
    assert world.active() == V2.sha256 and world.reporter.outcomes() == ["acceptance_failed", "committed"]
