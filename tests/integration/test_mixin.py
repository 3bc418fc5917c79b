"""The mixin: one config generates the rules, the PrometheusRule and the dashboard;
thresholds change per system and per source."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from grafana.mixin import main, outputs, render_alerts
from grafana.mixin_config import MixinConfigError, load_config, parse_config
from tests.conftest import tool
from tests.integration.grafana_helpers import ALERTS, ROOT, mixin_data

PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
INSTANCE = 'job="import-status",instance="exp:10451"'


def test_generated_files_are_up_to_date() -> None:
    assert main(["--check"]) == 0, "run: python -m grafana.mixin"
    for relative, text in outputs(load_config()).items():
        assert (ROOT / relative).read_text() == text


def test_check_fails_when_a_generated_file_is_edited(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    (tmp_path / "grafana" / "alerts.yaml").write_text("groups: []\n")
    assert main(["--check", "--out", str(tmp_path)]) == 1


def test_prometheus_rule_holds_the_same_groups_as_alerts_yaml() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_every_alert_is_generated_with_its_settings() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert len(rules) == 13
    by_name = {rule["alert"]: rule for rule in rules}
    assert by_name["ImportStatusSourceDown"]["for"] == "10m"
    assert "ImportStatusImportFailed" in by_name
    assert "for" not in by_name["ImportStatusImportFailed"]


def test_runbook_prefix_and_for_are_one_setting_each() -> None:
    data = mixin_data()
    data["runbook_url_prefix"] = "https://wiki.example.com/imports#"
    data["alerts"]["ImportStatusSourceDown"]["for"] = "20m"
    data["alerts"]["ImportStatusSourceDown"]["severity"] = "critical"
    rules = yaml.safe_load(render_alerts(parse_config(data)))["groups"][0]["rules"]
    for rule in rules:
        assert rule["annotations"]["runbook_url"] == (
            "https://wiki.example.com/imports#" + rule["alert"].lower()
        )
    down = next(r for r in rules if r["alert"] == "ImportStatusSourceDown")
    assert down["for"] == "20m"
    assert down["labels"]["severity"] == "critical"
    assert "failing for 20 minutes" in down["annotations"]["description"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds": {"default": {"stuck": "soon"}}}, "thresholds.default.stuck"),
        ({"thresholds": {"systems": {"sap": {}}}}, "thresholds.systems.sap"),
        ({"thresholds": {"sources": [{"match": "source~x", "running": "1h"}]}}, "match"),
        ({"alerts": {"ImportStatusNope": {}}}, "ImportStatusNope"),
        ({"selector": "job=import"}, "selector"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_config_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    data = mixin_data()
    for key, value in change.items():
        if key == "thresholds":
            data["thresholds"] = {**data["thresholds"], **value}
        else:
            data[key] = value
    with pytest.raises(MixinConfigError, match=message.replace(".", r"\.")):
        parse_config(data)


def promtool() -> str:
    path = tool("promtool")
    return path


OVERRIDES = {
    "sources": [
        # Big Elevate feeds may run 8h; one Elevate source's pipeline reports
        # steps through state changes often enough to call it stuck after 10m.
        {"match": 'source=~"elevate-big|elevate-eu"', "running": "8h"},
        {"match": 'source="elevate-steps"', "stuck": "10m"},
        # An archive migration on Rocket.Chat pauses for long: never stuck.
        {"match": 'source="chat-archive"', "stuck": None},
    ]
}


def series(
    source: str, imp: str, system: str, progress: str, duration: str
) -> list[dict[str, str]]:
    labels = f'{INSTANCE},source="{source}",import="{imp}"'
    return [
        {"series": f'import_state{{{labels},state="running"}}', "values": "1x600"},
        {
            "series": f'import_info{{{labels},system="{system}",upstream_state="X",name="n"}}',
            "values": "1x600",
        },
        {"series": f"import_last_progress_timestamp_seconds{{{labels}}}", "values": progress},
        {"series": f"import_duration_seconds{{{labels}}}", "values": duration},
    ]


def firing(alert: str, at: str, *imports: tuple[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {
                "exp_labels": {
                    "severity": "critical" if alert.endswith("Stuck") else "warning",
                    "job": "import-status",
                    "instance": "exp:10451",
                    "source": source,
                    "import": imp,
                    "name": "n",
                }
            }
            for source, imp in imports
        ],
    }


def test_per_source_overrides_beat_the_system_and_the_default(tmp_path: Path) -> None:
    data = mixin_data()
    data["thresholds"] |= OVERRIDES
    for settings in data["alerts"].values():
        settings["for"] = "0s"
    assert main_with(data, tmp_path) == 0
    # Which imports fire is the point here; the texts are tested in alerts_test.yaml.
    generated = tmp_path / "grafana" / "alerts.yaml"
    rules = yaml.safe_load(generated.read_text())
    for rule in rules["groups"][0]["rules"]:
        del rule["annotations"]
    generated.write_text(yaml.safe_dump(rules))
    still, moving = "0x600", "0+60x600"
    tests = {
        "rule_files": ["grafana/alerts.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    *series("elevate-prod", "1", "elevate", still, moving),
                    *series("elevate-big", "2", "elevate", still, moving),
                    *series("elevate-steps", "3", "elevate", still, moving),
                    *series("chat", "c", "rocketchat", still, moving),
                    *series("chat-archive", "c", "rocketchat", still, moving),
                ],
                "alert_rule_test": [
                    # 20m without progress: stuck only where progress is observed
                    # (Rocket.Chat after 30m) or a source says so (10m).
                    firing("ImportStatusImportStuck", "20m", ("elevate-steps", "3")),
                    firing("ImportStatusImportStuck", "40m", ("chat", "c"), ("elevate-steps", "3")),
                    # 3h: Elevate's 2h, but not the big feeds' 8h nor Rocket.Chat's 6h.
                    firing(
                        "ImportStatusImportRunningTooLong",
                        "3h",
                        ("elevate-prod", "1"),
                        ("elevate-steps", "3"),
                    ),
                    firing(
                        "ImportStatusImportRunningTooLong",
                        "9h",
                        ("chat", "c"),
                        ("chat-archive", "c"),
                        ("elevate-big", "2"),
                        ("elevate-prod", "1"),
                        ("elevate-steps", "3"),
                    ),
                ],
            }
        ],
    }
    (tmp_path / "overrides_test.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [promtool(), "test", "rules", "overrides_test.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_label_joins_and_the_rules_stay_valid(tmp_path: Path) -> None:
    data = mixin_data()
    data["cluster_label"] = "cluster"
    data["thresholds"] |= OVERRIDES
    assert main_with(data, tmp_path) == 0
    text = (tmp_path / "grafana" / "alerts.yaml").read_text()
    assert "on(cluster, job, instance, source, import)" in text
    assert "sum by (cluster, job, instance, source)" in text
    result = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "grafana" / "alerts.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_alert_switched_off_everywhere_is_left_out() -> None:
    data = mixin_data()
    data["thresholds"]["default"]["stuck"] = None
    rules = yaml.safe_load(render_alerts(parse_config(data)))["groups"][0]["rules"]
    assert "ImportStatusImportStuck" not in {rule["alert"] for rule in rules}


def main_with(data: dict[str, Any], out: Path) -> int:
    config = out / "mixin.yaml"
    config.write_text(yaml.safe_dump(data))
    return main(["--config", str(config), "--out", str(out)])
