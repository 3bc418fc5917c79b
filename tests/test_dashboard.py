"""The Grafana dashboard: generated from code, linted, and every query parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from grafana.dashboard import OUT, dashboard_queries, render
from tests.grafana_helpers import substitute_variables

DASHBOARD: dict[str, Any] = json.loads(OUT.read_text())
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]
DS = {"type": "prometheus", "uid": "${datasource}"}


def test_committed_json_is_the_generator_output() -> None:
    assert OUT.read_text() == render(), "run: python grafana/dashboard.py"


def test_datasource_job_instance_source_variables() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "source"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DS


def test_no_inputs_and_not_editable() -> None:
    text = OUT.read_text()
    assert "__inputs" not in DASHBOARD
    assert "${DS_" not in text
    assert DASHBOARD["editable"] is False
    assert DASHBOARD["title"]
    assert DASHBOARD["uid"]


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_panel_lint(panel: dict[str, Any]) -> None:
    assert panel["title"]
    assert panel["description"]
    assert panel["fieldConfig"]["defaults"]["unit"]
    assert panel["datasource"] == DS
    for target in panel["targets"]:
        assert target["datasource"] == DS
        expr = target["expr"]
        for selector in re.findall(r"\b[a-z_]+\{([^}]*)\}", expr):
            if "import_state" in expr or "import_" in expr:
                assert 'job=~"$job"' in selector
                assert 'instance=~"$instance"' in selector
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", expr


def test_panels_an_operator_needs() -> None:
    kinds = {p["title"]: p["type"] for p in PANELS}
    assert kinds["Imports by state"] == "stat"
    assert kinds["Current imports"] == "table"
    assert kinds["State over time"] == "state-timeline"
    for title in (
        "Progress",
        "Import durations",
        "Upstream request rate",
        "Upstream errors by reason",
        "Upstream request latency",
        "Upstream APIs up",
        "Data freshness",
    ):
        assert title in kinds


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/setup --test installs it)")
    rules = [
        {"record": f"dashboard:check:{i}", "expr": substitute_variables(expr)}
        for i, expr in enumerate(dashboard_queries())
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_provisioning_files_point_at_the_dashboard() -> None:
    root = OUT.parent.parent / "provisioning"
    datasources = yaml.safe_load((root / "datasources" / "prometheus.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((root / "dashboards" / "import-status.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
