"""The test broker fixture is a real Mosquitto: a message goes through it and back."""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
import pytest

pytestmark = pytest.mark.mosquitto


def test_publish_subscribe_roundtrip(mosquitto) -> None:  # type: ignore[no-untyped-def]
    received: queue.Queue[bytes] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fixture-check")
    client.on_message = lambda _c, _u, msg: received.put(msg.payload)
    client.on_subscribe = lambda *_args: subscribed.put(True)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        client.subscribe("edge/v1/test/echo", qos=1)
        subscribed.get(timeout=5)
        client.publish("edge/v1/test/echo", b"\x00binary\xff", qos=1).wait_for_publish(timeout=5)
        assert received.get(timeout=5) == b"\x00binary\xff"
    finally:
        client.loop_stop()
        client.disconnect()
