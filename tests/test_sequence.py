"""Sequence discipline on the device (issue 19, item 3): a bound on seq relative to the
device clock, a signed reset for a seq stuck ahead of it, and per-model desired documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent import errors
from edgeagent.desired import SEQ_FUTURE_ALLOWANCE_MS, DesiredTracker
from edgeagent.protocol import BundleRef, DesiredState, Topics, sign_document
from edgeagent.signing import KeyRing, load_public_key

T = Topics()
NOW_S = 1_767_225_600.0  # the fake device clock
NOW_MS = int(NOW_S * 1000)
A = BundleRef(name="digits", version="1.0.0", sha256="a" * 64, size=10)
B = BundleRef(name="digits", version="1.1.0", sha256="b" * 64, size=10)
C = BundleRef(name="cam", version="2.0.0", sha256="c" * 64, size=10)


class Clock:
    def __init__(self) -> None:
        self.now = NOW_S

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(tmp_path: Path, keypair, clock: Clock) -> DesiredTracker:  # type: ignore[no-untyped-def]
    ring = KeyRing([load_public_key(keypair.public)])
    return DesiredTracker(
        tmp_path / "desired.json", ring, device_id="pi-1", groups=["lab"], topics=T, clock=clock
    )


def _doc(seq: int, models: dict[str, BundleRef], **kw: object) -> DesiredState:
    return DesiredState(seq=seq, target="device:pi-1", models=models, **kw)  # type: ignore[arg-type]


def test_a_seq_far_ahead_of_the_clock_is_refused_with_a_code(tracker, keypair, clock) -> None:  # type: ignore[no-untyped-def]
    key = keypair.load()
    ahead = _doc(NOW_MS + SEQ_FUTURE_ALLOWANCE_MS + 1, {"default": A})
    with pytest.raises(errors.SeqInFuture, match="ahead of this device's clock") as info:
        tracker.offer(T.device_desired("pi-1"), sign_document(ahead, key))
    assert info.value.code == "seq_in_future" and info.value.seq == ahead.seq
    assert tracker.seqs == {}  # nothing stored: later pushes are not locked out
    normal = _doc(NOW_MS, {"default": B})
    assert tracker.offer(T.device_desired("pi-1"), sign_document(normal, key)) == normal
    # Within the allowance (clock skew) is fine.
    skewed = _doc(NOW_MS + SEQ_FUTURE_ALLOWANCE_MS, {"default": A})
    assert tracker.offer(T.device_desired("pi-1"), sign_document(skewed, key)) == skewed


def test_a_device_with_a_stale_clock_accepts_the_document_once_its_clock_is_set(
    tracker, keypair, clock
) -> None:  # type: ignore[no-untyped-def]
    clock.now = NOW_S - 3 * 86400  # booted without an RTC, before NTP
    doc = _doc(NOW_MS, {"default": A})
    with pytest.raises(errors.SeqInFuture):
        tracker.offer(T.device_desired("pi-1"), sign_document(doc, keypair.load()))
    assert tracker.effective() == {}
    clock.now = NOW_S  # NTP
    assert tracker.effective()["default"].bundle == A
    assert tracker.deferred == {}


def test_a_signed_reset_is_the_way_out_of_a_stored_seq_ahead_of_the_clock(tracker, keypair, clock) -> None:  # type: ignore[no-untyped-def]
    key = keypair.load()
    topic = T.device_desired("pi-1")
    # A seq accepted while within the allowance (e.g. before this bound existed, or a host
    # clock a day fast), now far ahead of every edgectl seq.
    stuck = _doc(NOW_MS + SEQ_FUTURE_ALLOWANCE_MS, {"default": A})
    tracker.offer(topic, sign_document(stuck, key))
    with pytest.raises(errors.ReplayedDocument):
        tracker.offer(topic, sign_document(_doc(NOW_MS + 5, {"default": B}), key))
    old = _doc(NOW_MS - 1000, {"default": A})  # an older genuine doc an attacker kept
    reset = _doc(NOW_MS + 10, {"default": B}, reset_seq=True)
    assert tracker.offer(topic, sign_document(reset, key)) == reset
    assert tracker.seqs["device:pi-1"] == NOW_MS + 10
    assert tracker.effective()["default"].bundle == B
    assert tracker.offer(topic, sign_document(reset, key)) is None  # retained again: nothing new
    with pytest.raises(errors.ReplayedDocument):
        tracker.offer(topic, sign_document(old, key))
    # The reset cannot be replayed after later pushes to lower the seq again.
    tracker.offer(topic, sign_document(_doc(NOW_MS + 20, {"default": A}), key))
    with pytest.raises(errors.ReplayedDocument, match="last reset"):
        tracker.offer(topic, sign_document(reset, key))
    # A reset is bounded by the clock like any document.
    with pytest.raises(errors.SeqInFuture):
        far = _doc(NOW_MS + SEQ_FUTURE_ALLOWANCE_MS + 1, {"default": A}, reset_seq=True)
        tracker.offer(topic, sign_document(far, key))


def test_command_seqs_are_bounded_and_can_be_reset(tracker, clock) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.SeqInFuture):
        tracker.accept_command_seq(NOW_MS + SEQ_FUTURE_ALLOWANCE_MS + 1)
    tracker.accept_command_seq(NOW_MS + SEQ_FUTURE_ALLOWANCE_MS)
    with pytest.raises(errors.ReplayedDocument):
        tracker.accept_command_seq(NOW_MS)
    tracker.accept_command_seq(NOW_MS, reset=True)
    with pytest.raises(errors.ReplayedDocument):
        tracker.accept_command_seq(NOW_MS, reset=True)
    tracker.accept_command_seq(NOW_MS + 1)


def test_per_model_documents_merge_with_the_targets_doc_by_seq(tracker, keypair) -> None:  # type: ignore[no-untyped-def]
    key = keypair.load()
    tracker.offer(T.device_desired("pi-1"), sign_document(_doc(100, {"default": A, "camera": C}), key))
    with pytest.raises(errors.ReplayedDocument):  # older than the target's doc
        tracker.offer(T.device_desired_model("pi-1", "default"), sign_document(_doc(50, {"default": B}), key))
    assert tracker.effective()["default"].bundle == A
    tracker.offer(T.device_desired_model("pi-1", "default"), sign_document(_doc(200, {"default": B}), key))
    effective = tracker.effective()
    assert effective["default"].bundle == B and effective["camera"].bundle == C
    # Each model's doc has its own seq: another model's doc with a lower seq is not a replay.
    tracker.offer(T.device_desired_model("pi-1", "camera"), sign_document(_doc(150, {"camera": A}), key))
    assert tracker.effective()["camera"].bundle == A
    # A model's doc carries exactly that model (it cannot be moved to another model's topic).
    with pytest.raises(errors.MalformedMessage, match="exactly that model"):
        tracker.offer(T.device_desired_model("pi-1", "camera"), sign_document(_doc(300, {"default": B}), key))
    group = DesiredState(seq=400, target="group:lab", models={"extra": C})
    tracker.offer(T.group_desired_model("lab", "extra"), sign_document(group, key))
    assert tracker.effective()["extra"].source == "group:lab"
    assert T.device_desired("pi-1") + "/+" in tracker.topic_filters()
    with pytest.raises(errors.MalformedMessage):
        tracker.target_of(T.device_desired("pi-2") + "/default")


def test_a_targets_doc_must_be_newer_than_its_models_docs(tracker, keypair) -> None:  # type: ignore[no-untyped-def]
    key = keypair.load()
    tracker.offer(T.device_desired_model("pi-1", "default"), sign_document(_doc(200, {"default": B}), key))
    # An old signed doc for the whole target (kept by an attacker) is a replay, not news.
    with pytest.raises(errors.ReplayedDocument):
        tracker.offer(T.device_desired("pi-1"), sign_document(_doc(5, {"default": A}), key))
    tracker.offer(T.device_desired("pi-1"), sign_document(_doc(300, {"default": A}), key))
    with pytest.raises(errors.ReplayedDocument):  # and a model's doc older than the target's
        tracker.offer(T.device_desired_model("pi-1", "camera"), sign_document(_doc(250, {"camera": C}), key))
    assert tracker.effective()["default"].bundle == A
