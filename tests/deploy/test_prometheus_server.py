"""A real Prometheus (Debian's) scrapes a live broker on loopback; PromQL over its HTTP API
must see what the broker reports, and every dashboard and rule expression must evaluate."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pasid_client import Client

from tests.deploy.conftest import PrometheusTools
from tests.deploy.dashboards import RULES, concrete, dashboard_exprs, rule_exprs
from tests.harness import BrokerProcess, wait_until

# /metrics names tenants on the brokers of these tests (by default only over mutual TLS):
# they read the top clients and holders.
pytestmark = pytest.mark.broker_args("--metrics-tenants", "on")

JOB = "pasid-broker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def scalar(self, expr: str) -> float | None:
        """The value of a one-series vector query; None while there is no such series."""
        res = self.query(expr)
        if not res:
            return None
        assert len(res) == 1, res
        return float(res[0]["value"][1])


@pytest.fixture
def prometheus(
    prometheus_tools: PrometheusTools, broker: BrokerProcess, tmp_path: Path
) -> Iterator[Prometheus]:
    target = urllib.parse.urlparse(broker.metrics_url).netloc
    port = _free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [
                prometheus_tools.prometheus,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout=60, interval=0.1, what="prometheus to be ready")
        yield Prometheus(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_prometheus_sees_what_the_broker_reports(
    prometheus: Prometheus, broker: BrokerProcess, client: Client
) -> None:
    in_use = f'pasid_broker_pasids_in_use{{job="{JOB}"}}'
    with client.session("vm-a") as a, client.session("vm-b") as b:
        a.alloc(count=7)
        b.alloc(count=3)
        expected = client.info().in_use
        assert expected == 10
        wait_until(
            lambda: prometheus.scalar(in_use) == expected,
            timeout=30,
            interval=0.2,
            what=f"Prometheus to see in_use == {expected}",
        )
        assert prometheus.scalar(f'up{{job="{JOB}"}}') == 1
        util = prometheus.scalar(
            f'pasid_broker_pasids_in_use{{job="{JOB}"}}'
            f' / pasid_broker_pasids_capacity{{job="{JOB}"}}'
        )
        assert util == pytest.approx(10 / client.info().capacity)
        top = prometheus.query(f'topk(1, pasid_broker_top_client_pasids{{job="{JOB}"}})')
        assert top[0]["metric"]["client"] == "vm-a" and top[0]["value"][1] == "7"

        a.free()  # the series must follow, not just once agree
        expected = client.info().in_use
        assert expected == 3
        wait_until(
            lambda: prometheus.scalar(in_use) == expected,
            timeout=30,
            interval=0.2,
            what=f"Prometheus to see in_use == {expected}",
        )
    wait_until(
        lambda: (
            prometheus.scalar(
                f'pasid_broker_sets_reclaimed_total{{job="{JOB}", reason="client_exit"}}'
            )
            == 2
        ),
        timeout=30,
        interval=0.2,
        what="Prometheus to see both sets reclaimed",
    )
    assert prometheus.scalar(f'pasid_broker_pasids_allocated_total{{job="{JOB}"}}') == 10


def test_rules_and_dashboard_queries_evaluate_on_real_data(
    prometheus: Prometheus, client: Client
) -> None:
    with client.session("vm") as s:
        s.alloc(count=4)
        wait_until(
            lambda: prometheus.scalar(f'pasid_broker_pasids_in_use{{job="{JOB}"}}') == 4,
            timeout=30,
            interval=0.2,
            what="a scrape with data",
        )

    # The alert rules loaded and have been evaluated without error.
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else None

    rules = wait_until(evaluated, timeout=30, interval=0.2, what="rules to be evaluated")
    assert len(rules) == len(rule_exprs()) == 13
    for r in rules:
        assert r["health"] == "ok", r

    # An evaluation before the first scrape sees no `up` yet, so the absent() alert is
    # pending for a moment: every alert must be inactive once evaluations see the data.
    def quiet() -> list[dict[str, Any]] | None:
        now = evaluated() or []
        return None if not now or any(r["state"] != "inactive" for r in now) else now

    try:
        wait_until(quiet, timeout=30, interval=0.2, what="every alert to be inactive")
    except AssertionError:
        active = [(r["name"], r["state"]) for r in evaluated() or [] if r["state"] != "inactive"]
        raise AssertionError(f"alerts active on a healthy broker: {active}") from None
    # Every dashboard target is valid PromQL that returns data for a live broker, once
    # there are enough scrapes for rate() over the panels' window.
    wait_until(
        lambda: (prometheus.scalar(f'count_over_time(up{{job="{JOB}"}}[1m])') or 0) >= 3,
        timeout=30,
        interval=0.2,
        what="three scrapes",
    )
    empty = []
    for expr in dashboard_exprs():
        res = prometheus.query(concrete(expr))  # asserts status success
        if not res:
            empty.append(expr)
    # The global quota line is empty by design when no global quota is set.
    allowed_empty = [e for e in empty if 'quota="global"' in e]
    assert empty == allowed_empty, f"dashboard queries with no data: {empty}"
