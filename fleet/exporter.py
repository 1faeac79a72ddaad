"""Prometheus exposition of the collector's picture of the fleet (``edgectl fleet collect --prometheus``).

A custom collector on its own registry builds every sample at scrape time from
:class:`fleet.state.FleetState`: a device that leaves (its retained state cleared, or not
heard from within the retention) and a bundle version a device no longer runs disappear
from the next scrape instead of lingering as stale label sets.

Names follow Prometheus conventions: base units (seconds, bytes, ratios 0-1), ``_total``
for counters. Labels: ``device``, and on inference series ``model``, ``bundle``, ``version``,
``runtime``, ``delegate``; a device's groups are one ``edge_device_group_info{device, group}``
series each (join on ``device``). Counters count what this collector stored since it started
(``rate()`` handles its restarts), so the counters of several collectors that share the load
add up (``sum``). ``edge_inference_latency_seconds`` is a classic histogram of every request
of the fleet per served configuration (no device label), built from the agents' latency
sketches, for ``histogram_quantile(0.99, sum by (version, le) (rate(..._bucket[5m])))``;
the per-device quantile gauges are the device's own over its last telemetry interval.
Rollout series (``edge_rollout_*{rollout}``) come from the rollout tables of the same database
(:mod:`fleet.rollout.metrics`).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from edgeagent.errors import UsageError
from edgeagent.protocol import ModelTelemetry, Telemetry
from fleet.collector import MALFORMED_REASONS
from fleet.rollout.metrics import METRIC_NAMES as ROLLOUT_METRIC_NAMES
from fleet.rollout.metrics import RolloutMetrics
from fleet.state import DeviceState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

    from fleet.collector import Collector

DEVICE_LABELS = ("device",)
MODEL_LABELS = (*DEVICE_LABELS, "model", "bundle", "version", "runtime", "delegate")
LATENCY_LABELS = ("model", "bundle", "version", "runtime", "delegate")
QUANTILES = (("0.5", "p50_ms"), ("0.9", "p90_ms"), ("0.99", "p99_ms"), ("0.999", "p999_ms"))
MB = 1024 * 1024  # the agent reports memory in MiB

# Every metric name the exporter can produce (the dashboard test checks its queries against this).
METRIC_NAMES = (
    "edge_device_info",
    "edge_device_group_info",
    "edge_device_online",
    "edge_device_last_seen_timestamp_seconds",
    "edge_telemetry_last_timestamp_seconds",
    "edge_inference_requests_total",
    "edge_inference_errors_total",
    "edge_inference_latency_seconds",
    "edge_inference_latency_seconds_bucket",
    "edge_inference_latency_seconds_sum",
    "edge_inference_latency_seconds_count",
    "edge_inference_latency_quantile_seconds",
    "edge_inference_max_latency_seconds",
    "edge_online_accuracy_ratio",
    "edge_prediction_drift_ratio",
    "edge_acceptance_passed",
    "edge_acceptance_accuracy_ratio",
    "edge_process_resident_memory_bytes",
    "edge_process_peak_resident_memory_bytes",
    "edge_process_cpu_ratio",
    "edge_system_cpu_ratio",
    "edge_system_memory_available_bytes",
    "edge_system_memory_total_bytes",
    "edge_system_load1",
    "edge_temperature_celsius",
    "edge_throttled",
    "edge_disk_free_bytes",
    "edge_spool_queued_messages",
    "edge_spool_dropped_total",
    "edge_power_mode",
    "edge_deployment_outcomes_total",
    "edge_deployed_devices",
    "edge_collector_messages_total",
    "edge_collector_stored_total",
    "edge_collector_duplicates_total",
    "edge_collector_malformed_total",
    "edge_collector_dropped_total",
    "edge_collector_queue_depth",
    "edge_collector_connected",
    *ROLLOUT_METRIC_NAMES,
)


class _Add(Protocol):
    def __call__(
        self, name: str, doc: str, labels: tuple[str, ...], values: list[str], v: float | None
    ) -> None: ...


def require_prometheus_client() -> None:
    if importlib.util.find_spec("prometheus_client") is None:
        raise UsageError("--prometheus needs prometheus-client: pip install prometheus-client")


def parse_listen(text: str) -> tuple[str, int]:
    """``:9108``, ``9108``, ``127.0.0.1:9108`` or ``[::1]:9108`` -> (address, port); '' = all."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"--prometheus {text!r}: expected [HOST]:PORT, e.g. :9108") from None
    if not 0 < number < 65536:
        raise UsageError(f"--prometheus {text!r}: port must be 1-65535")
    return host or "0.0.0.0", number  # noqa: S104 - a metrics endpoint is meant to be scraped


class FleetMetrics:
    """A prometheus-client custom collector over a running :class:`~fleet.collector.Collector`."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.rollouts = RolloutMetrics(collector.db)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        devices = self.collector.fleet.snapshot()
        gauges: dict[str, GaugeMetricFamily] = {}
        counters: dict[str, CounterMetricFamily] = {}

        def gauge(name: str, doc: str, labels: tuple[str, ...], values: list[str], v: float | None) -> None:
            if v is None:
                return
            if name not in gauges:
                gauges[name] = GaugeMetricFamily(name, doc, labels=labels)
            gauges[name].add_metric(values, float(v))

        def counter(name: str, doc: str, labels: tuple[str, ...], values: list[str], v: float | None) -> None:
            if v is None:
                return
            if name not in counters:
                counters[name] = CounterMetricFamily(name, doc, labels=labels)
            counters[name].add_metric(values, float(v))

        for state in devices:
            _device_samples(state, gauge, counter)
        yield from gauges.values()
        yield from counters.values()
        yield from _latency(self.collector, devices)
        yield from _deployments(self.collector, devices)
        yield from self._collector_samples()
        yield from self.rollouts.collect()

    def _collector_samples(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.collector.stats
        received = CounterMetricFamily(
            "edge_collector_messages", "Messages the collector received, by kind.", labels=("kind",)
        )
        stored = CounterMetricFamily(
            "edge_collector_stored", "Messages stored, by kind (duplicates left out).", labels=("kind",)
        )
        for kind in ("telemetry", "reported", "events"):
            received.add_metric([kind], stats.received[kind])
            stored.add_metric([kind], stats.stored[kind])
        malformed = CounterMetricFamily(
            "edge_collector_malformed", "Messages refused, by reason.", labels=("reason",)
        )
        for reason in MALFORMED_REASONS:
            malformed.add_metric([reason], stats.malformed[reason])
        yield received
        yield stored
        yield malformed
        yield CounterMetricFamily(
            "edge_collector_duplicates", "Telemetry and events already stored.", value=stats.duplicates
        )
        yield CounterMetricFamily(
            "edge_collector_dropped", "Messages dropped because the queue was full.", value=stats.dropped
        )
        yield GaugeMetricFamily(
            "edge_collector_queue_depth", "Messages waiting for the writer.", value=self.collector.queue_depth
        )
        yield GaugeMetricFamily(
            "edge_collector_connected",
            "1 while connected to the broker.",
            value=int(self.collector.connected),
        )


# Per-device gauges read straight off the newest telemetry: (name, help, value).
_TELEMETRY_GAUGES: tuple[tuple[str, str, Callable[[Telemetry], float | None]], ...] = (
    ("edge_telemetry_last_timestamp_seconds", "End of the newest telemetry interval (device clock).",
     lambda t: t.at),
    ("edge_process_resident_memory_bytes", "Agent process RSS.", lambda t: t.process.rss_mb * MB),
    ("edge_process_peak_resident_memory_bytes", "Agent process peak RSS.",
     lambda t: t.process.peak_rss_mb * MB),
    ("edge_process_cpu_ratio", "Agent process CPU over the last interval, fraction of one core.",
     lambda t: t.process.cpu_percent / 100),
    ("edge_system_cpu_ratio", "Whole-machine CPU busy over the last interval, 0-1.",
     lambda t: t.system.cpu_percent / 100),
    ("edge_system_memory_available_bytes", "MemAvailable.", lambda t: t.system.mem_available_mb * MB),
    ("edge_system_memory_total_bytes", "MemTotal.", lambda t: t.system.mem_total_mb * MB),
    ("edge_system_load1", "1-minute load average.", lambda t: t.system.load1),
    ("edge_disk_free_bytes", "Free space where the agent's store lives.",
     lambda t: t.system.disk_free_mb * MB),
    ("edge_throttled", "1 while the board throttles (firmware flags or a cooling device).",
     lambda t: None if t.system.throttling is None else int(t.system.throttling.throttled_now)),
    ("edge_spool_queued_messages", "Telemetry waiting in the device's on-disk spool.",
     lambda t: t.spool.queued),
    ("edge_power_mode", "Jetson nvpmodel power mode number (nvpmodel -m N); absent elsewhere.",
     lambda t: None if t.system.power_mode is None else t.system.power_mode.id),
)  # fmt: skip

# Per-model gauges of the newest interval: (name, help, value).
_MODEL_GAUGES: tuple[tuple[str, str, Callable[[ModelTelemetry], float | None]], ...] = (
    ("edge_inference_max_latency_seconds", "Slowest request of the last interval.",
     lambda m: None if m.max_ms is None else m.max_ms / 1000),
    ("edge_online_accuracy_ratio", "Top-1 accuracy on labelled predictions since activation.",
     lambda m: m.online_accuracy),
    ("edge_prediction_drift_ratio", "Total variation distance of predicted classes vs the acceptance set.",
     lambda m: m.drift),
)  # fmt: skip


def _device_samples(state: DeviceState, gauge: _Add, counter: _Add) -> None:
    dl = [state.device]
    # A device in no group has one series with group="", so a join on device keeps it when
    # every group is selected (group=~".*").
    for group in state.groups or [""]:
        gauge("edge_device_group_info", "Always 1: one series per group the device is in ('' for none).",
              ("device", "group"), [state.device, group], 1)  # fmt: skip
    r, t = state.reported, state.telemetry
    if r is not None:
        gauge(
            "edge_device_online",
            "1 when the device reports itself online, 0 after its last will.",
            DEVICE_LABELS,
            dl,
            int(r.online),
        )
        gauge(
            "edge_device_info",
            "Always 1; the labels describe the device.",
            (*DEVICE_LABELS, "profile", "agent_version"),
            [*dl, r.profile or "", r.agent_version],
            1,
        )
    gauge(
        "edge_device_last_seen_timestamp_seconds",
        "When the collector last heard from the device.",
        DEVICE_LABELS,
        dl,
        state.last_seen,
    )
    if t is None:
        return
    for name, doc, value in _TELEMETRY_GAUGES:
        gauge(name, doc, DEVICE_LABELS, dl, value(t))
    for zone, celsius in sorted(t.system.temperatures_c.items()):
        gauge(
            "edge_temperature_celsius",
            "Thermal zone temperature.",
            (*DEVICE_LABELS, "zone"),
            [*dl, zone],
            celsius,
        )
    counter(
        "edge_spool_dropped",
        "Telemetry the spool bound dropped (since the spool was created).",
        DEVICE_LABELS,
        dl,
        t.spool.dropped_total,
    )
    for m in t.models:
        ml = [*dl, m.model, state.bundle_of(m.model), m.version, m.runtime, m.delegate]
        totals = state.totals.get((m.model, m.version, m.runtime, m.delegate))
        if totals is not None:
            counter("edge_inference_requests", "Requests answered.", MODEL_LABELS, ml, totals.requests)
            for kind, n in (("client", totals.client_errors), ("server", totals.server_errors)):
                counter(
                    "edge_inference_errors",
                    "Failed requests: client (4xx) or server (5xx).",
                    (*MODEL_LABELS, "kind"),
                    [*ml, kind],
                    n,
                )
        for name, doc, model_value in _MODEL_GAUGES:
            gauge(name, doc, MODEL_LABELS, ml, model_value(m))
    for model, acc in sorted(t.acceptance.items()):
        labels = (*DEVICE_LABELS, "model", "bundle", "version")
        al = [*dl, model, state.bundle_of(model), acc.version or ""]
        if acc.passed is not None:
            gauge(
                "edge_acceptance_passed",
                "1 when the active bundle passed its acceptance gate.",
                labels,
                al,
                int(acc.passed),
            )
        if acc.accuracy is not None:
            gauge(
                "edge_acceptance_accuracy_ratio",
                "Accuracy on the bundle's golden set on the device.",
                labels,
                al,
                acc.accuracy,
            )


def _latency(collector: Collector, devices: list[DeviceState]) -> Iterator[Metric]:
    """The fleet-wide latency histograms, and each device's quantiles of its last interval."""
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    histogram = HistogramMetricFamily(
        "edge_inference_latency_seconds",
        "Inference latency of every request the devices answered since the collector started, per served "
        "configuration (from the agents' latency sketches: 1% error, then these buckets).",
        labels=LATENCY_LABELS,
    )
    for key, totals in sorted(collector.fleet.latency().items()):
        histogram.add_metric(list(key), totals.cumulative(), sum_value=totals.sum_s)
    yield histogram
    quantiles = GaugeMetricFamily(
        "edge_inference_latency_quantile_seconds",
        "Latency quantiles of the device's last telemetry interval (1% relative error).",
        labels=(*MODEL_LABELS, "quantile"),
    )
    for state in devices:
        for m in state.telemetry.models if state.telemetry else ():
            ml = [state.device, m.model, state.bundle_of(m.model), m.version, m.runtime, m.delegate]
            for q, attr in QUANTILES:
                v = getattr(m, attr)
                if v is not None:
                    quantiles.add_metric([*ml, q], v / 1000)
    yield quantiles


def _deployments(collector: Collector, devices: list[DeviceState]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    outcomes = CounterMetricFamily(
        "edge_deployment_outcomes",
        "Deployment outcomes the devices reported since the collector started (result: committed or "
        "failed, code: why).",
        labels=("model", "bundle", "version", "result", "code"),
    )
    for (model, bundle, version, ok, code), n in sorted(collector.fleet.outcomes().items()):
        outcomes.add_metric([model, bundle, version, "committed" if ok else "failed", code], n)
    yield outcomes
    running: Counter[tuple[str, str, str, str]] = Counter()
    for state in devices:
        for model, status in state.reported.models.items() if state.reported else ():
            if status.bundle is not None:
                running[(model, status.bundle.name, status.bundle.version, status.state or "")] += 1
    deployed = GaugeMetricFamily(
        "edge_deployed_devices",
        "Devices whose reported state names this bundle version for a model, by deployment state.",
        labels=("model", "bundle", "version", "state"),
    )
    for labels, n in sorted(running.items()):
        deployed.add_metric(list(labels), n)
    yield deployed


def serve(collector: Collector, listen: str) -> WSGIServer:
    """Serve ``/metrics`` for ``collector`` on ``listen`` (``:9108``) in a daemon thread."""
    require_prometheus_client()
    from prometheus_client import CollectorRegistry, start_http_server

    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetMetrics(collector))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"--prometheus {listen}: cannot listen ({exc.strerror or exc})") from exc
    return server
