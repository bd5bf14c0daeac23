"""The shipped Prometheus rules (deploy/prometheus/): promtool checks and unit-tests them
(a firing and a quiet case per alert, and the tests fail when the rules are broken); they
match the runbook's table, link to its sections, and name only metrics the daemon and the
root service really define."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from root_worker.service.metrics import RootMetrics
from trimmer_daemon.metrics import DaemonMetrics

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "feature-trimmer.rules.yml"
TESTS = PROM / "feature-trimmer.rules.test.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
# metrics the rules may name that no project module defines
EXTERNAL = {"up",  # Prometheus' own
            "feature_trimmer_inspect_status"}  # a textfile collector's (operations.md)
PROMQL_WORDS = {"min", "sum", "by", "on", "rate", "increase", "time", "host", "model",
                "outcome", "job", "state", "vector", "phase"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("FT_REQUIRE_PROMTOOL"),
    reason="promtool is not installed (Debian: apt-get install prometheus)")


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    out = _promtool("test", "rules", str(TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
@pytest.mark.parametrize("broken", ["vector(1) > 0", "vector(0) > 1"],
                         ids=["always_firing", "never_firing"])
def test_the_unit_tests_catch_broken_rules(tmp_path: Path, broken: str) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = broken
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    out = _promtool("test", "rules", str(tmp_path / TESTS.name))
    assert out.returncode != 0
    failed = set(re.findall(r"alertname: (\w+)", out.stdout + out.stderr))
    assert failed == {r["alert"] for r in _rules()}  # every alert's test noticed


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(TESTS.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            cases.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    assert {r["alert"] for r in _rules()} == set(cases)
    assert all(v == {True, False} for v in cases.values()), cases
    severities = {(r["alert"], r["labels"]["severity"]) for r in _rules()}
    fired = {(a["exp_labels"]["alertname"] if "alertname" in a["exp_labels"] else c["alertname"],
              a["exp_labels"]["severity"])
             for t in yaml.safe_load(TESTS.read_text())["tests"]
             for c in t["alert_rule_test"] for a in c["exp_alerts"]}
    assert fired == severities  # each severity of each alert fires in some test


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _runbook_table() -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"\| (Trimmer\w+) \| (.+?) \| (\S*) \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4).strip())
    return rows


def test_rules_match_the_runbook_table_and_link_to_its_sections() -> None:
    text = RUNBOOK.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    table = _runbook_table()
    assert set(table) == {r["alert"] for r in _rules()}
    for rule in _rules():
        name = rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/operations.md#{name.lower()}" and name.lower() in anchors, name
        expr_cell, for_cell, severity_cell = table[name]
        expr = " ".join(rule["expr"].split())
        assert f"`{expr}`" in expr_cell, (name, expr, expr_cell)
        assert rule.get("for", "—") in f"{for_cell} {severity_cell}", name
        assert rule["labels"]["severity"] in severity_cell, name


def _defined_metrics() -> set[str]:
    names = set()
    for registry in (DaemonMetrics().registry, RootMetrics().registry):
        for family in registry.collect():
            for sample in family.samples:
                names.add(sample.name)
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_rules_name_only_metrics_the_project_defines() -> None:
    defined = _defined_metrics() | EXTERNAL
    for rule in _rules():
        expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', "", rule["expr"])
        used = {w for w in re.findall(r"[a-z_][a-z0-9_]*", expr) if w not in PROMQL_WORDS}
        assert used <= defined, (rule["alert"], used - defined)
        assert any(w.startswith("feature_trimmer_") or w == "up" for w in used)
