"""The shipped alert rules: promtool accepts and unit-tests them; conventions hold."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import tool
from tests.integration.grafana_helpers import ROOT, load_rules

RUNBOOK = ROOT / "docs" / "runbook.md"


def run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    run(tool("promtool"), "check", "rules", "grafana/alerts.yaml")


def test_promtool_unit_tests_fire_and_stay_quiet() -> None:
    run(tool("promtool"), "test", "rules", "grafana/alerts_test.yaml")


def test_example_prometheus_and_alertmanager_configs_are_valid() -> None:
    run(tool("promtool"), "check", "config", "examples/prometheus.yml")
    run(tool("amtool"), "check-config", "examples/alertmanager.yml")


def test_rules_follow_mixin_conventions() -> None:
    rules = load_rules()
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower().replace(" ", "-"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    names = set()
    for rule in rules:
        name = rule["alert"]
        names.add(name)
        assert re.fullmatch(r"ImportStatus[A-Z][A-Za-z]+", name)
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        annotations = rule["annotations"]
        assert annotations["summary"]
        assert "{{" not in annotations["summary"]
        assert "{{" in annotations["description"]
        anchor = annotations["runbook_url"].rsplit("#", 1)[1]
        assert anchor == name.lower(), name
        assert anchor in anchors, name
    # Every case the issue names is covered.
    for needed in (
        "ImportStatusImportFailed",
        "ImportStatusImportStuck",
        "ImportStatusImportWaitingTooLong",
        "ImportStatusImportRunningTooLong",
        "ImportStatusSourceDown",
        "ImportStatusSourceErrors",
        "ImportStatusDataStale",
        "ImportStatusExporterDown",
        "ImportStatusExporterAbsent",
    ):
        assert needed in names
