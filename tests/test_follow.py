"""Which refusal is a push's own (pure logic, a fake connection): a forged message on the
push's topic that copies its seq must not make `edgectl push` report a refusal."""

from __future__ import annotations

from typing import Any

from edgeagent.desired import payload_digest
from edgeagent.protocol import BundleRef, DesiredState, Event, Topics, sign_document, unsigned_document
from edgeagent.signing import SigningKey
from fleet.follow import Follower
from fleet.push import Published

T = Topics()
REF = BundleRef(name="digits", version="1.0.0", sha256="a" * 64, size=10)


class FakeConnection:
    topics = T

    class session:  # noqa: N801 - stands in for the attribute
        @staticmethod
        def subscribe(*_args: Any, **_kwargs: Any) -> None:
            return None


def test_a_refusal_is_ours_only_when_it_names_our_exact_message(keypair) -> None:  # type: ignore[no-untyped-def]
    key: SigningKey = keypair.load()
    doc = DesiredState(seq=1_000, target="device:pi-1", models={"default": REF})
    topic = T.device_desired_model("pi-1", "default")
    ours = sign_document(doc, key)
    follower = Follower(FakeConnection(), ["pi-1"], "default", REF, lambda _line: None)  # type: ignore[arg-type]
    follower.published = Published(topic, ours, doc)

    def refused(payload: bytes) -> Event:
        detail = {"topic": topic, "seq": doc.seq, "digest": payload_digest(payload)}
        return Event(device="pi-1", kind="refused", code="missing_signature", detail=detail)

    assert follower._is_ours(refused(ours))
    assert not follower._is_ours(refused(unsigned_document(doc)))  # forged: same topic and seq
    older_agent = Event(
        device="pi-1", kind="refused", code="replayed", detail={"topic": topic, "seq": doc.seq}
    )
    assert follower._is_ours(older_agent)
    other = Event(device="pi-1", kind="refused", code="replayed", detail={"topic": topic, "seq": doc.seq + 1})
    assert not follower._is_ours(other)
