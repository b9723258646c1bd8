"""deploy/prometheus: the scrape config and alert rules, checked and unit-tested by promtool."""

from __future__ import annotations

import subprocess

from pasid_client import Client

from tests.deploy.conftest import PrometheusTools
from tests.harness import ROOT, BrokerProcess
from tests.metrics.scrape import scrape

PROM = ROOT / "deploy" / "prometheus"


def _promtool(tools: PrometheusTools, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tools.promtool, *args], capture_output=True, text=True, cwd=PROM, timeout=120
    )


def test_promtool_check_rules(prometheus_tools: PrometheusTools) -> None:
    r = _promtool(prometheus_tools, "check", "rules", "rules/pasid-broker.rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 13 rules found" in r.stdout + r.stderr


def test_promtool_check_config(prometheus_tools: PrometheusTools) -> None:
    r = _promtool(prometheus_tools, "check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules(prometheus_tools: PrometheusTools) -> None:
    r = _promtool(prometheus_tools, "test", "rules", "tests/pasid-broker.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_rule_tests_can_fail(prometheus_tools: PrometheusTools, tmp_path: object) -> None:
    # The unit tests must notice a broken threshold: move the utilisation alert to 96 %.
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "rules").mkdir()
    (d / "tests").mkdir()
    rules = (PROM / "rules" / "pasid-broker.rules.yml").read_text()
    assert "> 0.9\n" in rules
    (d / "rules" / "pasid-broker.rules.yml").write_text(rules.replace("> 0.9\n", "> 0.96\n"))
    (d / "tests" / "t.yml").write_text((PROM / "tests" / "pasid-broker.test.yml").read_text())
    r = subprocess.run(
        [prometheus_tools.promtool, "test", "rules", "tests/t.yml"],
        capture_output=True,
        text=True,
        cwd=d,
        timeout=120,
    )
    assert r.returncode != 0 and "PasidUtilisationHigh" in r.stdout + r.stderr


def test_promtool_check_metrics_on_a_live_scrape(
    prometheus_tools: PrometheusTools, broker: BrokerProcess, client: Client
) -> None:
    # promtool's linter: naming conventions (_total, base units), HELP text, types.
    with client.session("vm") as s:
        s.alloc(count=2)
        text = scrape(broker.metrics_url).text
    r = subprocess.run(
        [prometheus_tools.promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    # and the linter does complain about a badly named counter
    bad = "# HELP x_seconds_count c\n# TYPE x_seconds_count counter\nx_seconds_count 1\n"
    r = subprocess.run(
        [prometheus_tools.promtool, "check", "metrics"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and '"_total" suffix' in r.stdout + r.stderr
