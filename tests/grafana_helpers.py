"""Helpers shared by the alert, dashboard and Prometheus end-to-end tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "grafana" / "alerts.yaml"

# Each alert's threshold is one literal number in its expression.
THRESHOLDS = {
    "ImportStatusImportStuck": "1800",
    "ImportStatusImportWaitingTooLong": "3600",
    "ImportStatusImportRunningTooLong": "21600",
}


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def shortened_rules(thresholds: dict[str, str], for_duration: str = "0s") -> dict[str, Any]:
    """The shipped rules with only their `for:` and named thresholds shortened."""
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = for_duration
            old = THRESHOLDS.get(rule["alert"])
            if old is not None and rule["alert"] in thresholds:
                pattern = rf"> {old}\b"
                assert re.search(pattern, rule["expr"]), rule["alert"]
                rule["expr"] = re.sub(pattern, f"> {thresholds[rule['alert']]}", rule["expr"])
    return data


def substitute_variables(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables filled in, ready for Prometheus."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)
