"""deploy/grafana: the dashboard loads in Grafana (structure, datasource as a variable), and
every expression in it and in the alert rules names only metrics the broker exports.

No Grafana server here: the structure is checked here, the model against Grafana's own
schema in test_grafana_schema.py, and the PromQL is run against a real Prometheus in
test_prometheus_server.py.
"""

from __future__ import annotations

import re

import pytest
from pasid_client import Client

from tests.deploy.dashboards import dashboard, dashboard_exprs, metric_names, rule_exprs
from tests.harness import BrokerProcess
from tests.metrics.scrape import scrape

# /metrics names tenants on these tests' brokers, as the dashboard's top-holders panel
# needs (docs/observability.md); by default only over mutual TLS.
pytestmark = pytest.mark.broker_args("--metrics-tenants", "on")

# Metrics Prometheus itself adds to every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["title"] and d["uid"] == "pasid-broker"
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert "id" not in d or d["id"] is None  # importable anywhere
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = set()
    for p in d["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        assert p["type"] in {"stat", "timeseries", "bargauge", "table", "gauge", "row"}
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], f"{p['title']} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"].strip()
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${DS_PROMETHEUS}"
    # Nothing hard-wired to one Prometheus: no datasource uid but the variable.
    text = str(d)
    assert not re.search(r"'uid': '(?!\$\{DS_PROMETHEUS\}|pasid-broker|-- Grafana --)", text)
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for must in ("utilisation", "rates", "latency", "top holders"):
        assert must in titles, must


def test_dashboard_and_rules_use_only_exported_metrics(
    broker: BrokerProcess, client: Client
) -> None:
    # Exercise the paths that create labelled series, then scrape what really exists.
    with client.session("vm") as s:
        s.alloc(count=2)
        s.free()
    exported = scrape(broker.metrics_url).names() | PROMETHEUS_SYNTHETIC
    used: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        for e in exprs:
            for name in metric_names(e):
                used.setdefault(name, set()).add(where)
    assert len(rule_exprs()) == 13
    missing = {n: sorted(w) for n, w in used.items() if n not in exported}
    assert not missing, f"not exported by the broker: {missing}"
    assert "pasid_broker_pasids_in_use" in used and "up" in used
