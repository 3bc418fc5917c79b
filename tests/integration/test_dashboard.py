"""The Grafana dashboard: generated from code, linted, and every query parses."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from grafana.dashboard import OUT, dashboard, dashboard_queries, render
from grafana.mixin_config import parse_config
from tests.conftest import tool
from tests.integration.grafana_helpers import mixin_data, substitute_variables

DASHBOARD: dict[str, Any] = json.loads(OUT.read_text())
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]
DS = {"type": "prometheus", "uid": "${datasource}"}


def test_committed_json_is_the_generator_output() -> None:
    assert OUT.read_text() == render(), "run: python -m grafana.mixin"


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
    promtool = tool("promtool")
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


TYPECHECK = OUT.parent.parent / "typecheck"


def tsc_check(tmp_path: Path, board: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """tsc --noEmit of the dashboard assigned to @grafana/schema's Dashboard type."""
    modules = TYPECHECK / "node_modules"
    tsc = modules / ".bin" / "tsc"
    if not (tsc.exists() and (modules / "@grafana" / "schema").is_dir()):
        pytest.skip("@grafana/schema and typescript are not installed (scripts/setup --test)")
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "tsconfig.json").write_text((TYPECHECK / "tsconfig.json").read_text())
    source = (TYPECHECK / "prelude.ts").read_text() + json.dumps(board, indent=2) + ";\n"
    (tmp_path / "dashboard.ts").write_text(source)
    return subprocess.run(
        [str(tsc), "-p", str(tmp_path)], capture_output=True, text=True, timeout=120
    )


def test_dashboard_type_checks_against_grafana_schema(tmp_path: Path) -> None:
    result = tsc_check(tmp_path, DASHBOARD)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_check_catches_a_wrong_dashboard(tmp_path: Path) -> None:
    wrong = dict(DASHBOARD, panelz=[])
    result = tsc_check(tmp_path, wrong)
    assert result.returncode != 0
    assert "panelz" in result.stdout


def test_multi_value_variables_match_any_value_not_none() -> None:
    for var in DASHBOARD["templating"]["list"]:
        if var.get("multi"):
            assert var["allValue"] == ".+", var["name"]


def test_cluster_variable_hidden_until_a_cluster_label_is_configured() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["cluster"]["hide"] == 2
    assert "cluster" not in " ".join(dashboard_queries())
    data = mixin_data()
    data["cluster_label"] = "k8s_cluster"
    board = dashboard(parse_config(data))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["cluster"]["hide"] == 0
    assert "k8s_cluster" in variables["cluster"]["query"]["query"]
    assert 'k8s_cluster=~"$cluster"' in variables["job"]["query"]["query"]
    for panel in board["panels"]:
        for target in panel["targets"]:
            assert 'k8s_cluster=~"$cluster"' in target["expr"], target["expr"]


def test_links_to_runbook_and_status_page_and_alert_annotations() -> None:
    links = {link["title"]: link["url"] for link in DASHBOARD["links"]}
    assert links["Runbook"].endswith("/docs/runbook.md")
    assert links["Exporter status page"] == "http://${instance}/"
    (alerts,) = DASHBOARD["annotations"]["list"]
    assert alerts["datasource"] == DS
    assert 'alertname=~"ImportStatus.*"' in alerts["target"]["expr"]
    assert alerts["target"]["expr"].startswith("ALERTS{")


def test_title_uid_tags_refresh_come_from_the_mixin_config() -> None:
    data = mixin_data()
    data["dashboard"] |= {"title": "Imports (prod)", "uid": "imp-prod", "tags": ["x"]}
    data["dashboard"]["refresh"] = "1m"
    board = dashboard(parse_config(data))
    assert (board["title"], board["uid"], board["tags"], board["refresh"]) == (
        "Imports (prod)",
        "imp-prod",
        ["x"],
        "1m",
    )
