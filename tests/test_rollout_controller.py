"""The rollout controller over a real fleet database (SQLite, and a real PostgreSQL server,
written through the collector's own ``write_batch``), with a fake clock and fake devices that
answer pushes with events and telemetry: waves, soak, pacing, pause/resume, every abort
criterion, rollback, the lease and a restart."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet_support import FakeDevice, ServedModel

from edgeagent.protocol import BundleRef, DeploymentOutcome, Event, ModelStatus, Reported
from fleet import fleetdb
from fleet.rollout import create as creating
from fleet.rollout.controller import Controller, LeaseHeld, progress_line
from fleet.rollout.model import DeviceState, Gates, Pacing, RolloutSpec, RolloutState, Target
from fleet.rollout.store import RolloutStore, open_db

pytest_plugins = ["postgres_support"]  # the postgres and pg_dsn fixtures

OLD = BundleRef(name="digits", version="1.0.0", sha256="a" * 64, size=1000)
NEW = BundleRef(name="digits", version="1.1.0", sha256="b" * 64, size=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """Devices that answer a push after ``delay_s`` with the outcome their behaviour says."""

    path: str | Path  # a SQLite file or a postgresql:// DSN
    clock: Clock
    behaviour: dict[str, str] = field(default_factory=dict)  # device -> ok | acceptance | silent | slow
    pushes: list[tuple[str, BundleRef, bool]] = field(default_factory=list)
    due: list[tuple[float, str, BundleRef]] = field(default_factory=list)
    delay_s: float = 2.0
    seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.writer = fleetdb.open_for_writing(self.path)

    def add(
        self, device: str, profile: str = "rpi4", behaviour: str = "ok", groups: tuple[str, ...] = ("cams",)
    ) -> None:
        self.behaviour[device] = behaviour
        self.report(device, OLD, profile, list(groups))

    def report(
        self, device: str, active: BundleRef, profile: str = "rpi4", groups: list[str] | None = None
    ) -> None:
        reported = Reported(
            device=device, online=True, groups=groups or ["cams"], profile=profile,
            models={"default": ModelStatus(bundle=active, state="idle")},
            last_deployment=DeploymentOutcome(model="default", bundle=active, ok=True, code="committed"),
            at=self.clock.now,
        )  # fmt: skip
        fleetdb.write_batch(self.writer, fleetdb.Batch(reported=[(device, reported, self.clock.now, False)]))

    def publish(self, device: str, ref: BundleRef, *, rollback: bool = False) -> int:
        self.pushes.append((device, ref, rollback))
        if not rollback and self.behaviour[device] != "silent":
            self.due.append((self.clock.now + self.delay_s, device, ref))
        return next(self.seq)

    def telemetry(self, device: str, version: str, median_ms: float, profile: str = "rpi4") -> None:
        fake = FakeDevice(device, profile, ["cams"],
                          [ServedModel("default", "digits", version, "onnxruntime", "cpu", (median_ms, 0.1))],
                          seed=hash(device) % 1000)  # fmt: skip
        t = fake.telemetry(next(self.seq), self.clock.now, requests=200)
        fleetdb.write_batch(self.writer, fleetdb.Batch(telemetry=[(t, self.clock.now)]))

    def step(self) -> None:
        now = self.clock.now
        for item in [d for d in self.due if d[0] <= now]:
            self.due.remove(item)
            _, device, ref = item
            ok = self.behaviour[device] != "acceptance"
            event = Event(device=device, kind="outcome", model="default", bundle=ref, ok=ok,
                          code="committed" if ok else "acceptance_failed", at=now)  # fmt: skip
            fleetdb.write_batch(
                self.writer, fleetdb.Batch(events=[(event, event.model_dump_json().encode(), now)])
            )
            if ok:
                self.report(device, ref)


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The same world on each backend: one code path, the same SQL."""
    target: str | Path = tmp_path / "fleet.db"
    if request.param == "postgresql":
        target = request.getfixturevalue("pg_dsn")  # skipped, with the reason, where it cannot start
    w = World(target, Clock())
    yield w
    w.writer.close()


def make(world: World, *, waves: list[str], soak_s: float = 10.0, gates: Gates | None = None,
         pacing: Pacing | None = None) -> tuple[RolloutStore, str]:  # fmt: skip
    db = open_db(world.path)
    spec = RolloutSpec(bundle=NEW, target=Target(group="cams"), waves=waves, soak_s=soak_s,
                       gates=gates or Gates(), pacing=pacing or Pacing())  # fmt: skip
    return RolloutStore(db), creating.create(db, spec, world.clock.now, "r1")


def drive(world: World, controller: Controller, seconds: int) -> RolloutState:
    state = controller.tick()
    for _ in range(seconds):
        if state.final:
            break
        world.clock.now += 1
        world.step()
        state = controller.tick()
    return state


def states(store: RolloutStore) -> dict[str, DeviceState]:
    return {d.device: d.state for d in store.devices("r1")}


def test_waves_soak_and_completion(world: World) -> None:
    for i in range(10):
        world.add(f"d{i}")
    store, rid = make(world, waves=["1", "50%", "100%"], soak_s=10)
    ctl = Controller(store, rid, world, world.clock, owner="c1")
    drive(world, ctl, 5)
    # Wave 1 (one device) committed after 2 s and soaks 10 s: nobody else has been pushed.
    assert [p[0] for p in world.pushes] == ["d0"]
    assert store.get(rid).soak_until is not None
    assert drive(world, ctl, 120) is RolloutState.COMPLETED
    assert set(states(store).values()) == {DeviceState.COMMITTED}
    order = [p[0] for p in world.pushes]
    assert order[0] == "d0" and set(order[1:5]) == {"d1", "d2", "d3", "d4"} and len(order) == 10
    assert "10/10 committed, 0 failed, wave 3 of 3" in progress_line(store, rid)
    assert len(store.history(0)) == 10


def test_acceptance_failure_aborts_rolls_back_and_stops_the_waves(world: World) -> None:
    for i in range(8):
        world.add(f"d{i}", behaviour="acceptance" if i == 2 else "ok")
    store, rid = make(world, waves=["1", "50%", "100%"], soak_s=3)
    ctl = Controller(store, rid, world, world.clock, owner="c1")
    assert drive(world, ctl, 60) is RolloutState.ABORTED
    row = store.get(rid)
    assert row.reason is not None and "failed on-device acceptance (d2)" in row.reason
    found = states(store)
    assert {found[f"d{i}"] for i in range(4)} == {DeviceState.ROLLED_BACK}
    assert {found[f"d{i}"] for i in range(4, 8)} == {DeviceState.PENDING}  # wave 3 never started
    rollbacks = [(d, ref) for d, ref, rb in world.pushes if rb]
    assert sorted(d for d, _ in rollbacks) == ["d0", "d1", "d2", "d3"]
    assert {ref for _, ref in rollbacks} == {OLD}


def test_pacing_limits_devices_in_flight_and_the_start_rate(world: World) -> None:
    for i in range(12):
        world.add(f"d{i}", behaviour="silent")
    pacing = Pacing(max_in_flight=5, max_start_per_s=2, device_timeout_s=1000)
    store, rid = make(world, waves=["100%"], pacing=pacing)
    ctl = Controller(store, rid, world, world.clock, owner="c1")
    ctl.tick()
    assert len(world.pushes) == 1  # the bucket starts with one token
    world.clock.now += 1
    ctl.tick()
    assert len(world.pushes) == 3
    drive(world, ctl, 10)
    assert len(world.pushes) == 5  # nobody finishes: in flight stays at 5


def test_pause_and_resume(world: World) -> None:
    for i in range(6):
        world.add(f"d{i}")
    store, rid = make(world, waves=["100%"], pacing=Pacing(max_in_flight=2))
    ctl = Controller(store, rid, world, world.clock, owner="c1")
    ctl.tick()
    world.clock.now += 1
    ctl.tick()
    assert len(world.pushes) == 2
    assert store.set_state(rid, {RolloutState.RUNNING}, RolloutState.PAUSED, world.clock.now)
    drive(world, ctl, 20)
    assert len(world.pushes) == 2 and store.get(rid).state is RolloutState.PAUSED
    assert list(states(store).values()).count(DeviceState.COMMITTED) == 2  # in flight ones finished
    assert store.set_state(rid, {RolloutState.PAUSED}, RolloutState.RUNNING, world.clock.now)
    assert drive(world, ctl, 60) is RolloutState.COMPLETED


def test_a_second_controller_waits_for_the_lease_then_continues(world: World) -> None:
    for i in range(4):
        world.add(f"d{i}", behaviour="silent" if i == 0 else "ok")
    store, rid = make(world, waves=["100%"], pacing=Pacing(device_timeout_s=1000))
    first = Controller(store, rid, world, world.clock, owner="c1", lease_s=30)
    drive(world, first, 5)  # then "killed": it never ticks again nor releases its lease
    second = Controller(store, rid, world, world.clock, owner="c2", lease_s=30)
    with pytest.raises(LeaseHeld, match="driven by c1"):
        second.tick()
    world.clock.now += 31
    before = len(world.pushes)
    second.tick()
    # The device still marked pushed gets its document again: its agent takes it as nothing new.
    assert [p[0] for p in world.pushes[before:]] == ["d0"]
    world.behaviour["d0"] = "ok"
    world.due.append((world.clock.now, "d0", NEW))
    assert drive(world, second, 30) is RolloutState.COMPLETED
    with pytest.raises(LeaseHeld):
        first.tick()


def test_slow_profile_trips_the_p99_gate_within_one_tick(world: World) -> None:
    for i in range(6):
        world.add(f"d{i}", profile="rpi3" if i % 2 else "rpi4")
        world.telemetry(f"d{i}", "1.0.0", 10.0, "rpi3" if i % 2 else "rpi4")
    store, rid = make(world, waves=["2", "100%"], soak_s=60, gates=Gates(max_p99_ratio=1.15))
    ctl = Controller(store, rid, world, world.clock, owner="c1")
    drive(world, ctl, 5)  # wave 1 (d0 rpi4, d1 rpi3) committed, soaking
    world.telemetry("d0", "1.1.0", 10.0, "rpi4")
    assert ctl.tick() is RolloutState.RUNNING
    world.clock.now += 1
    world.telemetry("d1", "1.1.0", 13.0, "rpi3")  # 30% slower on this class
    assert ctl.tick() is RolloutState.ABORTED
    assert "on rpi3" in (store.get(rid).reason or "")


def test_rss_gate_from_telemetry(world: World) -> None:
    world.add("d0")
    world.telemetry("d0", "1.0.0", 10.0)
    world.clock.now += 1
    store, rid = make(world, waves=["100%"], soak_s=60, gates=Gates(max_rss_growth=0.01, max_p99_ratio=None))
    ctl = Controller(store, rid, world, world.clock, owner="c1")
    drive(world, ctl, 4)
    world.clock.now += 1
    # FakeDevice's RSS grows with its telemetry seq: the new version's rows are far higher.
    for _ in range(30):
        world.telemetry("d0", "1.1.0", 10.0)
    assert ctl.tick() is RolloutState.ABORTED
    assert "agent RSS" in (store.get(rid).reason or "")


def test_target_resolution_and_tags(world: World) -> None:
    world.add("a", groups=("cams",))
    world.add("b", groups=("yard",))
    store = RolloutStore(open_db(world.path))
    store.set_tags(["b"], ["canary"])
    known = creating.known_devices(store.db, "default")
    assert creating.resolve(Target(tag="canary"), known) == ["b"]
    assert creating.resolve(Target(tag="cams,!canary"), known) == ["a"]
    assert creating.resolve(Target(group="canary"), known) == ["b"]
    with pytest.raises(Exception, match="never heard of zz"):
        creating.resolve(Target(devices=["a", "zz"]), known)


def test_fleet_views_tags_inventory_and_history(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.edgectl import main

    world.add("a", groups=("cams",))
    world.add("b", groups=("yard",))
    store, rid = make(world, waves=["100%"], soak_s=0)
    drive(world, Controller(store, rid, world, world.clock, owner="c1"), 10)

    def edgectl(*argv: str) -> str:
        with pytest.raises(SystemExit) as done:
            main([*argv, "--db", str(world.path)])
        assert done.value.code == 0
        return capsys.readouterr().out

    edgectl("fleet", "tag", "add", "b", "--tag", "canary")
    assert json.loads(edgectl("fleet", "tag", "ls", "--json")) == {"b": ["canary"]}
    rows = json.loads(edgectl("fleet", "status", "--tag", "canary", "--json"))["rows"]
    assert {r["device"] for r in rows} == {"b"}
    inv = {r["device"]: r for r in json.loads(edgectl("fleet", "inventory", "--json"))}
    assert inv["b"]["tags"] == ["canary"] and inv["a"]["profile"] == "rpi4"
    assert inv["a"]["models"]["default"]["version"] == "1.1.0"
    history = json.loads(edgectl("fleet", "history", "--since", "3000w", "--json"))
    assert [(h["device"], h["version"], h["state"]) for h in history] == [("a", "1.1.0", "committed")]
    assert "1/1 committed" in edgectl("rollout", "status")


def test_the_report_marks_rollouts_on_the_latency_plots(world: World) -> None:
    from fleet.report import build_report

    world.add("a")
    world.telemetry("a", "1.0.0", 10.0)
    store, rid = make(world, waves=["100%"], soak_s=0)
    drive(world, Controller(store, rid, world, world.clock, owner="c1"), 10)
    world.clock.now += 5
    world.telemetry("a", "1.1.0", 10.0)
    page = build_report(world.path, since_s=3600, now=world.clock.now + 10).html
    assert "▶ digits 1.1.0" in page and "■ digits 1.1.0 completed" in page


def test_racing_controllers_never_both_hold_the_lease(world: World) -> None:
    """Controllers on their own connections race for one lease at the same instant, again and
    again as it expires: each round exactly one wins (PostgreSQL re-checks the UPDATE's WHERE on
    the row another transaction just changed; SQLite has one writer)."""
    import threading

    world.add("d0")
    store, rid = make(world, waves=["100%"])
    racers = [RolloutStore(open_db(world.path)) for _ in range(6)]
    start = threading.Barrier(len(racers))
    for round_ in range(15):
        now = world.clock.now + round_ * 100.0  # the previous round's lease (30 s) has expired
        won: list[str] = []

        def race(i: int, racer: RolloutStore, now: float = now, won: list[str] = won) -> None:
            start.wait()
            if racer.acquire(rid, f"c{i}", now, 30.0):
                won.append(f"c{i}")

        threads = [threading.Thread(target=race, args=(i, r)) for i, r in enumerate(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, won
        assert store.get(rid).lease_owner == won[0]
    for racer in racers:
        racer.db.close()
