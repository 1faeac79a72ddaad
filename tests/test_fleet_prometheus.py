"""The collector's Prometheus endpoint, scraped over HTTP, against what the fake devices sent
(the shipped Grafana dashboard: test_fleet_dashboard.py)."""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import free_port
from fleet_support import (
    Publisher,
    publish_history,
    start_collector,
    subscribed,
    three_devices,
    wait_received,
)

from edgeagent.protocol import Topics
from fleet import exporter

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

MiB = 1024 * 1024


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    found = [v for lbl, v in samples.get(name, []) if all(lbl.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {samples.get(name)}"
    return found[0]


@pytest.mark.mosquitto
def test_scrape_names_labels_and_values_follow_what_was_published(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    topics = Topics(f"p{uuid.uuid4().hex[:8]}")
    collector = start_collector(mosquitto, tmp_path / "fleet.db", topics)
    port = free_port()
    server = exporter.serve(collector, f"127.0.0.1:{port}")
    pi, jetson, x86 = devices = three_devices()
    try:
        with Publisher(mosquitto.host, mosquitto.port, topics) as pub:
            subscribed(collector, pub, topics)
            base = sum(collector.stats.received.values())
            publish_history(pub, devices, intervals=3, end=time.time())
            pub.publish(topics.telemetry("pi-kitchen"), b"{broken")
            wait_received(collector, base + 3 + 9 + 1)
            s = scrape(port)

            pi_l = {"device": "pi-kitchen"}
            # One series per group (not a comma-joined label): join on device to select a group.
            groups = {(lbl["device"], lbl["group"]) for lbl, _ in s["edge_device_group_info"]}
            assert groups >= {("pi-kitchen", "canary"), ("pi-kitchen", "kitchen"), ("jetson-yard", "yard")}
            assert not [lbl for rows in s.values() for lbl, _ in rows if "," in lbl.get("group", "")]
            assert value(s, "edge_device_online", **pi_l) == 1
            assert value(s, "edge_device_info", **pi_l, profile="rpi4", agent_version="0.1.0") == 1
            assert time.time() - value(s, "edge_device_last_seen_timestamp_seconds", **pi_l) < 30
            assert value(s, "edge_process_resident_memory_bytes", **pi_l) == (pi.rss_mb + 1.5) * MiB
            assert value(s, "edge_process_cpu_ratio", **pi_l) == pytest.approx(0.35)
            assert value(s, "edge_system_memory_available_bytes", **pi_l) == 2100 * MiB
            assert value(s, "edge_temperature_celsius", **pi_l, zone="cpu-thermal") == 71.5
            assert value(s, "edge_throttled", **pi_l) == 1
            assert value(s, "edge_throttled", device="jetson-yard") == 0
            assert value(s, "edge_power_mode", device="jetson-yard") == 2
            assert not [lbl for lbl, _ in s.get("edge_power_mode", []) if lbl["device"] != "jetson-yard"]
            assert {
                lbl["zone"] for lbl, _ in s["edge_temperature_celsius"] if lbl["device"] == "jetson-yard"
            } == {"CPU-therm", "GPU-therm", "SOC0-therm"}
            assert not [lbl for lbl, _ in s["edge_temperature_celsius"] if lbl["device"] == "x86-lab"]

            detector = {
                "device": "jetson-yard",
                "model": "detector",
                "bundle": "yolo",
                "version": "2.0.0",
                "runtime": "onnxruntime",
                "delegate": "TensorrtExecutionProvider",
            }
            assert value(s, "edge_inference_requests_total", **detector) == 3 * 200
            assert value(s, "edge_inference_errors_total", **detector, kind="client") == 3
            assert value(s, "edge_inference_errors_total", **detector, kind="server") == 0
            last = jetson.telemetry(3, 0.0).models[0]  # regenerated: same seed, same numbers
            assert value(
                s, "edge_inference_latency_quantile_seconds", **detector, quantile="0.99"
            ) == pytest.approx(last.p99_ms / 1000)
            # The fleet-wide histogram: every request of the configuration, no device label.
            config = {k: v for k, v in detector.items() if k != "device"}
            assert value(s, "edge_inference_latency_seconds_count", **config) == 600
            sent_ms = jetson.samples["detector"][:600]
            assert value(s, "edge_inference_latency_seconds_sum", **config) == pytest.approx(
                sum(sent_ms) / 1000
            )
            buckets = sorted(
                (float(lbl["le"]), v)
                for lbl, v in s["edge_inference_latency_seconds_bucket"]
                if all(lbl.get(k) == x for k, x in config.items())
            )
            assert buckets[-1] == (float("inf"), 600)
            for le, n in buckets[:-1]:
                # Each bucket holds the requests at or under its bound, within the sketch's 1%.
                low = sum(1 for ms in sent_ms if ms / 1000 <= le / 1.01)
                high = sum(1 for ms in sent_ms if ms / 1000 <= le * 1.01)
                assert low <= n <= high, (le, low, n, high)
            assert not [lbl for lbl, _ in s["edge_inference_latency_seconds_bucket"] if "device" in lbl]
            assert value(s, "edge_online_accuracy_ratio", **detector) == 0.9
            assert value(s, "edge_acceptance_passed", device="x86-lab", model="default", version="1.0.0") == 1
            assert value(s, "edge_acceptance_accuracy_ratio", device="x86-lab", model="default") == 0.98

            assert value(s, "edge_collector_messages_total", kind="telemetry") >= 10
            assert value(s, "edge_collector_stored_total", kind="telemetry") == 9
            assert value(s, "edge_collector_malformed_total", reason="not_json") == 1
            assert value(s, "edge_collector_dropped_total") == 0
            assert value(s, "edge_collector_connected") == 1

            # The last will: offline. A new version: the old version's series go. A cleared
            # retained state: the device goes.
            base = sum(collector.stats.received.values())
            pub.send("reported", pi.reported(online=False), retain=True)
            x86.models[0].version = "1.1.0"
            pub.send("telemetry", x86.telemetry(4, time.time()))
            pub.publish(topics.reported("jetson-yard"), b"", retain=True)
            wait_received(collector, base + 3)
            s = scrape(port)
            assert value(s, "edge_device_online", **pi_l) == 0
            x86_versions = {
                lbl["version"] for lbl, _ in s["edge_inference_requests_total"] if lbl["device"] == "x86-lab"
            }
            assert x86_versions == {"1.1.0"}
            assert value(s, "edge_inference_requests_total", device="x86-lab") == 200  # a new series starts
            assert not [
                name for name, rows in s.items() for lbl, _ in rows if lbl.get("device") == "jetson-yard"
            ]
    finally:
        server.shutdown()
        server.server_close()
        collector.stop()


def test_listen_addresses_parse_or_fail_in_one_line() -> None:
    assert exporter.parse_listen(":9108") == ("0.0.0.0", 9108)
    assert exporter.parse_listen("127.0.0.1:9200") == ("127.0.0.1", 9200)
    assert exporter.parse_listen("[::1]:9108") == ("::1", 9108)
    for bad in ("nine", ":0", "host:99999", ""):
        with pytest.raises(exporter.UsageError, match="--prometheus"):
            exporter.parse_listen(bad)


def test_the_state_forgets_devices_not_heard_from_within_the_retention() -> None:
    from fleet.state import FleetState

    pi, jetson, x86 = three_devices()
    state = FleetState()
    now = time.time()
    state.add_telemetry([(pi.telemetry(1, now - 900), now - 900), (jetson.telemetry(1, now), now)])
    # x86 is known only by its retained last will, from before the collector started.
    state.set_reported("x86-lab", x86.reported(online=False).model_copy(update={"at": now - 300}), None)
    assert state.forget(cutoff=now - 600) == 1
    assert [s.device for s in state.snapshot()] == ["jetson-yard", "x86-lab"]
    totals = state.snapshot()[0].totals[("detector", "2.0.0", "onnxruntime", "TensorrtExecutionProvider")]
    assert (totals.requests, totals.client_errors, totals.latency_count) == (200, 1, 200)
    state.set_reported("jetson-yard", None, None)  # its retained state was cleared
    assert [s.device for s in state.snapshot()] == ["x86-lab"]
