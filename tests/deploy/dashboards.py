"""PromQL found in deploy/: the dashboard's targets and the alert rules' expressions."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.harness import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "pasid-broker.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "pasid-broker.rules.yml"

# Grafana's variables, as a live query would see them for one broker.
GRAFANA_VARS = {"$job": "pasid-broker", "$instance": ".*", "$__rate_interval": "1m"}
_PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "topk", "min", "max", "and",
    "or", "unless", "without", "on", "ignoring", "le", "absent", "humanizePercentage",
}  # fmt: skip


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs() -> list[str]:
    out = []
    for p in dashboard()["panels"]:
        out += [t["expr"] for t in p.get("targets", [])]
    return out


def rule_exprs() -> list[str]:
    # The rules file is YAML; PyYAML is not a dependency, so read the `expr:` blocks
    # (single-line or `|` blocks) with a small parser fit for this one file.
    lines = RULES.read_text().splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        if m.group(2).strip() != "|":
            out.append(m.group(2).strip())
            continue
        indent = len(m.group(1))
        block = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            block.append(lines[i].strip())
            i += 1
        out.append(" ".join(b for b in block if b))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (identifiers outside {...} and strings)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r'"[^"]*"', "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare))
    return {n for n in names if n not in _PROMQL_WORDS and not n.startswith("$")}


def concrete(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    return expr
