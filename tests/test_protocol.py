"""Protocol v1: topics, signed envelopes, block replies, desired-state acceptance, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent import errors
from edgeagent.deploy import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    Journal,
    JournalFile,
    State,
    next_state,
)
from edgeagent.desired import DesiredTracker, Wanted, check_not_downgrade, semver_key
from edgeagent.protocol import (
    BlockReply,
    BlockStatus,
    BundleRef,
    Command,
    DesiredState,
    Reported,
    Telemetry,
    Topics,
    open_envelope,
    parse,
    sign_document,
    unsigned_document,
)
from edgeagent.signing import KeyRing, load_public_key

REF = BundleRef(name="digits", version="1.2.0", sha256="a" * 64, size=1234)


def test_topics() -> None:
    t = Topics()
    assert t.device_desired("pi-1") == "edge/v1/device/pi-1/desired"
    assert t.group_desired("lab") == "edge/v1/group/lab/desired"
    assert t.registry_shared() == "$share/registry/edge/v1/registry/get/+"
    assert t.registry_get("pi-1") == "edge/v1/registry/get/pi-1"
    assert t.requester_of("edge/v1/registry/get/pi-1") == "pi-1"
    for not_a_request in ("edge/v1/registry/get", "edge/v1/registry/get/a/b", "x/v1/registry/get/pi-1"):
        assert t.requester_of(not_a_request) is None
    assert t.trust == "edge/v1/trust"
    assert t.device_of("edge/v1/device/pi-1/telemetry") == "pi-1"
    assert t.device_of("other/v1/device/pi-1/telemetry") is None
    for bad in ("a/b", "+", "#", "", "x" * 65, "$sys"):
        with pytest.raises(ValueError):
            t.reported(bad)
    with pytest.raises(ValueError):
        Topics("a/#")


def test_reports_from_a_newer_agent_keep_parsing_but_instructions_stay_strict() -> None:
    telemetry = {
        "v": 1, "device": "dev-1", "seq": 7, "at": 1000.0, "interval_s": 10.0,
        "process": {"rss_mb": 50.0, "peak_rss_mb": 60.0, "cpu_percent": 1.0, "threads": 4},
        "system": {
            "mem_total_mb": 1000.0, "mem_available_mb": 500.0, "cpu_percent": 3.0, "cpu_count": 4,
            "load1": 0.1, "load5": 0.1, "load15": 0.1, "disk_free_mb": 1.0, "disk_total_mb": 2.0,
            "npu_milliwatts": 812,  # a figure some later agent adds, nested
        },
        "spool": {"queued": 0, "dropped": 0, "dropped_total": 0},
        "battery_percent": 80,  # and one at the top
    }  # fmt: skip
    parsed = parse(Telemetry, json.dumps(telemetry).encode(), "telemetry")
    assert (parsed.seq, parsed.system.cpu_count) == (7, 4)
    assert "battery_percent" not in parsed.model_dump()
    reported = {"v": 1, "device": "dev-1", "online": True, "uptime_s": 12}
    assert parse(Reported, json.dumps(reported).encode(), "reported").online is True
    # What the host tells a device is refused when a field is not understood.
    desired = {"v": 1, "seq": 1, "target": "device:dev-1", "models": {}, "reboot_after": True}
    with pytest.raises(errors.MalformedMessage, match="reboot_after"):
        parse(DesiredState, json.dumps(desired).encode(), "desired")
    with pytest.raises(errors.MalformedMessage, match="force"):
        command = {"v": 1, "seq": 1, "id": "c1", "target": "device:dev-1", "name": "refresh", "force": 1}
        parse(Command, json.dumps(command).encode(), "cmd")


def test_block_reply_round_trip_and_corruption() -> None:
    reply = BlockReply(BlockStatus.OK, "b" * 64, 7, 65536, 10_000_000, b"payload")
    data = reply.pack()
    back = BlockReply.unpack(data)
    assert back == reply
    flipped = bytearray(data)
    flipped[-1] ^= 1
    assert BlockReply.unpack(bytes(flipped)).crc_ok is False
    for bad in (b"", b"EBLK", b"XXXX" + data[4:]):
        with pytest.raises(errors.MalformedMessage):
            BlockReply.unpack(bad)


def test_signed_envelope(keypair, other_keypair) -> None:  # type: ignore[no-untyped-def]
    ring = KeyRing([load_public_key(keypair.public)])
    doc = DesiredState(seq=3, target="device:pi-1", models={"default": REF})
    opened = open_envelope(sign_document(doc, keypair.load()), ring)
    assert DesiredState.model_validate(opened.payload) == doc
    assert opened.key_id == keypair.key_id
    with pytest.raises(errors.UnknownKey):
        open_envelope(sign_document(doc, other_keypair.load()), ring)
    with pytest.raises(errors.MissingSignature):
        open_envelope(unsigned_document(doc), ring)
    assert open_envelope(unsigned_document(doc), ring, insecure=True).key_id is None
    envelope = json.loads(sign_document(doc, keypair.load()))
    envelope["payload"] = envelope["payload"].replace('"seq":3', '"seq":4')
    with pytest.raises(errors.BadSignature):
        open_envelope(json.dumps(envelope).encode(), ring)
    for junk in (b"", b"[]", b"{}", b'{"v": 2, "payload": "{}"}', b"\xff"):
        with pytest.raises(errors.MalformedMessage):
            open_envelope(junk, ring)


@pytest.fixture
def tracker(tmp_path: Path, keypair) -> DesiredTracker:  # type: ignore[no-untyped-def]
    return DesiredTracker(
        tmp_path / "desired.json",
        KeyRing([load_public_key(keypair.public)]),
        device_id="pi-1",
        groups=["all", "lab"],
        topics=Topics(),
    )


def test_desired_replay_and_merge(tracker: DesiredTracker, keypair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = keypair.load()
    t = Topics()
    dev = DesiredState(seq=5, target="device:pi-1", models={"default": REF})
    assert tracker.offer(t.device_desired("pi-1"), sign_document(dev, key)) == dev
    assert tracker.offer(t.device_desired("pi-1"), sign_document(dev, key)) is None  # retained again
    older = DesiredState(seq=4, target="device:pi-1", models={"default": REF})
    with pytest.raises(errors.ReplayedDocument):
        tracker.offer(t.device_desired("pi-1"), sign_document(older, key))
    same_seq_other = DesiredState(seq=5, target="device:pi-1", models={})
    with pytest.raises(errors.ReplayedDocument):
        tracker.offer(t.device_desired("pi-1"), sign_document(same_seq_other, key))
    wrong_target = DesiredState(seq=9, target="device:pi-2", models={})
    with pytest.raises(errors.MalformedMessage):
        tracker.offer(t.device_desired("pi-1"), sign_document(wrong_target, key))

    other = REF.model_copy(update={"version": "2.0.0", "sha256": "c" * 64})
    cam = REF.model_copy(update={"name": "cam", "sha256": "d" * 64})
    tracker.offer(
        t.group_desired("all"),
        sign_document(DesiredState(seq=1, target="group:all", models={"default": other, "camera": cam}), key),
    )
    effective = tracker.effective()
    assert effective["default"].bundle == REF and effective["default"].source == "device:pi-1"
    assert effective["camera"].bundle == cam and effective["camera"].source == "group:all"

    # Sequence numbers survive a restart: the replay stays refused.
    again = DesiredTracker(
        tmp_path / "desired.json", tracker.trusted, device_id="pi-1", groups=["all", "lab"], topics=t
    )
    with pytest.raises(errors.ReplayedDocument):
        again.offer(t.device_desired("pi-1"), sign_document(older, key))
    assert again.effective() == effective


def test_downgrade_needs_a_rollback() -> None:
    old = REF.model_copy(update={"version": "1.1.9"})
    with pytest.raises(errors.DowngradeRefused, match="--rollback"):
        check_not_downgrade(Wanted(old, False, "device:x", 1), "1.2.0")
    check_not_downgrade(Wanted(old, True, "device:x", 1), "1.2.0")
    check_not_downgrade(Wanted(REF, False, "device:x", 1), None)
    assert semver_key("1.0.0-rc.1") < semver_key("1.0.0") < semver_key("1.0.1") < semver_key("1.10.0")
    assert semver_key("1.0.0-alpha") < semver_key("1.0.0-alpha.1") < semver_key("1.0.0-beta")


def test_transition_table() -> None:
    happy = [
        Event.DEPLOY,
        Event.DOWNLOADED,
        Event.VERIFIED,
        Event.INSTALLED,
        Event.ACCEPTED,
        Event.ACTIVATED,
        Event.DONE,
    ]
    state = State.IDLE
    seen = [state]
    for event in happy:
        state = next_state(state, event)
        seen.append(state)
    assert [s.value for s in seen] == [
        "idle",
        "downloading",
        "verifying",
        "installing",
        "validating",
        "activating",
        "committed",
        "idle",
    ]
    for working in (State.DOWNLOADING, State.VERIFYING, State.INSTALLING, State.VALIDATING, State.ACTIVATING):
        assert next_state(working, Event.FAILED) is State.ROLLING_BACK
    assert next_state(State.ROLLING_BACK, Event.ROLLED_BACK) is State.IDLE
    with pytest.raises(IllegalTransition, match="no transition from idle on activated"):
        next_state(State.IDLE, Event.ACTIVATED)
    assert len(TRANSITIONS) == 13


def test_journal_round_trip(tmp_path: Path) -> None:
    jf = JournalFile(tmp_path, "default")
    assert jf.load().state is State.IDLE
    jf.save(Journal("default", State.VALIDATING, REF, previous="b" * 64, attempts=2))
    loaded = jf.load()
    assert (loaded.state, loaded.target, loaded.previous, loaded.attempts) == (
        State.VALIDATING,
        REF,
        "b" * 64,
        2,
    )
    jf.path.write_text("{garbage")
    assert jf.load().state is State.IDLE
