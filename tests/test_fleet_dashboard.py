"""The shipped Grafana dashboard against the essentials of Grafana's dashboard JSON model
(schemaVersion 39: no schema package for it installs offline, so the parts Grafana's import
relies on are written out here as a JSON Schema), and against what it draws: every variable
defined is used and every one used is defined, each query's unit matches its metric (no spool
count on a bytes axis, no throttling flag on a degrees axis), per-device panels are top-k,
and deployments are marked by an annotation."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from fleet import exporter

DASHBOARD = Path(__file__).parents[1] / "fleet" / "assets" / "grafana-dashboard.json"

_DS = {"type": "object", "required": ["type", "uid"]}
_GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
_TARGET = {
    "type": "object",
    "required": ["refId", "expr"],
    "properties": {
        "refId": {"type": "string", "pattern": "^[A-Z]$"},
        "expr": {"type": "string", "minLength": 1},
        "legendFormat": {"type": "string"},
        "datasource": _DS,
    },
}
# Grafana's unit ids this dashboard may use (public/app/features/.../valueFormats categories).
UNITS = {"none", "short", "s", "ms", "bytes", "celsius", "percentunit", "ops", "reqps"}
PANEL_TYPES = ["row", "stat", "timeseries", "gauge", "table", "bargauge", "text", "heatmap"]
VARIABLE_TYPES = ["query", "custom", "datasource", "constant", "interval", "textbox", "adhoc"]
_VARIABLE = {
    "type": "object",
    "required": ["name", "type"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "type": {"enum": VARIABLE_TYPES},
        "multi": {"type": "boolean"},
        "includeAll": {"type": "boolean"},
    },
}
_PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": PANEL_TYPES},
        "title": {"type": "string", "minLength": 1},
        "gridPos": _GRID,
        "datasource": _DS,
        "targets": {"type": "array", "items": _TARGET},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults"],
            "properties": {"defaults": {"type": "object", "properties": {"unit": {"enum": sorted(UNITS)}}}},
        },
    },
}
_ANNOTATION = {"type": "object", "required": ["name", "datasource", "enable"]}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time", "annotations"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {"type": "object", "required": ["from", "to"]},
        "refresh": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "annotations": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"items": _ANNOTATION}},
        },
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"items": _VARIABLE}}},
        "panels": {"type": "array", "minItems": 1, "items": _PANEL},
    },
}
BUILTINS = {"__rate_interval", "__interval", "__range", "__all"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries(doc: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    return [(p, t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def test_it_follows_the_dashboard_json_model(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, SCHEMA)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"{p['title']}: a panel without a query"


def test_variables_are_defined_used_and_the_group_comes_from_a_query(doc: dict[str, Any]) -> None:
    text = json.dumps({k: v for k, v in doc.items() if k != "templating"})
    text += json.dumps([v.get("query") for v in doc["templating"]["list"]])
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)) - BUILTINS
    defined = {v["name"] for v in doc["templating"]["list"]}
    assert used == defined, f"used but not defined: {used - defined}; defined but unused: {defined - used}"
    assert "__inputs" not in doc or all(f"${{{i['name']}}}" in text for i in doc["__inputs"])
    group = next(v for v in doc["templating"]["list"] if v["name"] == "group")
    assert group["type"] == "query" and group["multi"] and group["includeAll"]
    assert "edge_device_group_info" in json.dumps(group["query"])


def test_every_query_uses_exported_metrics_in_their_own_unit(doc: dict[str, Any]) -> None:
    wrong = []
    for panel, expr in _queries(doc):
        metrics = re.findall(r"\bedge_[a-z0-9_]+", expr)
        assert set(metrics) <= set(exporter.METRIC_NAMES), (panel["title"], metrics)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if unit not in expected_units(expr):
            wrong.append(f"{panel['title']}: {expr} drawn in {unit!r}")
    assert not wrong, "\n".join(wrong)


def expected_units(expr: str) -> set[str]:
    """The units a query's values are in, from its metric names and functions."""
    metric = next(m for m in re.findall(r"\bedge_[a-z0-9_]+", expr) if m != "edge_device_group_info")
    if "histogram_quantile" in expr:
        return {"s", "ms"}
    if re.search(r"rate\(.*\)\)?\s*/\s*sum.*rate\(", expr):  # a ratio of two rates
        return {"s", "ms"} if metric.endswith("_seconds_sum") else {"percentunit"}
    if metric.endswith("_total"):
        return {"ops", "reqps"} if "rate(" in expr else {"none", "short"}
    if expr.startswith("count("):
        return {"none", "short"}
    for suffix, units in (("_bytes", {"bytes"}), ("_celsius", {"celsius"}), ("_ratio", {"percentunit"}),
                          ("_seconds", {"s", "ms"})):  # fmt: skip
        if metric.endswith(suffix):
            return units
    return {"none", "short"}  # counts: devices, flags, messages


def test_per_device_panels_draw_the_top_k_not_every_device(doc: dict[str, Any]) -> None:
    for panel, expr in _queries(doc):
        if panel["type"] == "timeseries" and re.search(r"\{\{device\}\}", json.dumps(panel["targets"])):
            assert re.match(r"(topk|bottomk)\(\d+,", expr), f"{panel['title']}: one series per device"


def test_latency_per_version_and_deployment_markers(doc: dict[str, Any]) -> None:
    exprs = [e for _p, e in _queries(doc)]
    for q in ("0.99", "0.5"):
        assert any(e.startswith(f"histogram_quantile({q}, sum by (model, version, le)") for e in exprs)
    markers = [a for a in doc["annotations"]["list"] if "edge_deployment_outcomes_total" in a.get("expr", "")]
    assert len(markers) == 1 and markers[0]["enable"]
