"""Every alert links its runbook section, every link lands on a heading, and every runbook
section belongs to an alert. No promtool needed: the rules are read as YAML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.harness import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules" / "pasid-broker.rules.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    inside_code = False
    out = set()
    for line in markdown.splitlines():
        if line.startswith("```"):
            inside_code = not inside_code
        elif not inside_code and (m := re.match(r"#{1,6} (.+)", line)):
            out.add(anchor(m.group(1)))
    return out


def alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_anchor_matches_github_rules() -> None:
    assert anchor("PasidBrokerDown") == "pasidbrokerdown"
    assert anchor("Store commits: slow (p99)") == "store-commits-slow-p99"
    assert anchors("# A\n```\n## not a heading\n```\n## B c\n") == {"a", "b-c"}


def test_every_alert_has_a_runbook_url_with_an_anchor_that_exists() -> None:
    found = anchors(RUNBOOK.read_text())
    rules = alerts()
    assert len(rules) >= 10
    for rule in rules:
        url = rule.get("annotations", {}).get("runbook_url")
        assert url, f"{rule['alert']} has no runbook_url"
        path, _, frag = url.partition("#")
        assert (ROOT / path).resolve() == RUNBOOK.resolve(), url
        assert frag == rule["alert"].lower(), url
        assert frag in found, f"{rule['alert']}: no heading for #{frag} in docs/runbook.md"


def test_every_runbook_section_is_an_alert() -> None:
    names = {r["alert"] for r in alerts()}
    sections = re.findall(r"^## (\S+)\s*$", RUNBOOK.read_text(), re.M)
    assert sorted(sections) == sorted(names)


def test_the_sections_refusals_name_exist() -> None:
    """A refused start names its section ("see docs/runbook.md, section X"): issue 22."""
    faults = re.findall(r"^### (.+?)\s*$", RUNBOOK.read_text(), re.M)
    assert {"Corruption", "Restore"} <= set(faults)
    # One section for each storage fault issue 22 lists (what the operator sees, what to do).
    assert {
        "A failed fsync (exit status 3)",
        "A device failing its writes",
        "A filesystem turned read-only",
        "Acknowledgements lost with page-cache durability",
        "A full filesystem",
        "A slow disk (readiness NOT_SERVING)",
        "A frozen broker (SIGSTOP, a debugger, a stalled host)",
        "A memory limit (OOM kills, a restart loop)",
    } <= set(faults)
    # Every section the daemon's own messages name is there, under that exact name.
    named = set()
    for src in (ROOT / "broker").rglob("*.py"):
        named |= set(re.findall(r'docs/runbook\.md, section "([^"]+)"', src.read_text()))
    assert named and named <= set(faults), named - set(faults)


def test_an_absent_rule_watches_for_the_target_itself() -> None:
    absent = [r for r in alerts() if "absent(" in r["expr"]]
    assert [r["alert"] for r in absent] == ["PasidBrokerTargetMissing"]
    assert 'job="pasid-broker"' in absent[0]["expr"]


def test_runbook_links_between_sections_resolve() -> None:
    text = RUNBOOK.read_text()
    found = anchors(text)
    for frag in re.findall(r"\]\(#([^)]+)\)", text):
        assert frag in found, f"#{frag}"
    for rel in re.findall(r"\]\(([\w./-]+\.md)\)", text):
        assert (Path(RUNBOOK.parent) / rel).exists(), rel
