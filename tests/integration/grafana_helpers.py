"""Helpers shared by the alert, dashboard and Prometheus end-to-end tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from grafana.mixin import groups
from grafana.mixin_config import parse_config

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "grafana" / "alerts.yaml"
MIXIN = ROOT / "grafana" / "mixin.yaml"


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def mixin_data() -> dict[str, Any]:
    """grafana/mixin.yaml as shipped, as data to change in a test."""
    data: dict[str, Any] = yaml.safe_load(MIXIN.read_text())
    return data


def shortened_rules(thresholds: dict[str, Any], for_duration: str = "0s") -> dict[str, Any]:
    """The rules generated from the shipped mixin config with every `for:` set to
    ``for_duration``, 1 s evaluation, and ``thresholds`` merged into its
    thresholds (e.g. ``{"systems": {"elevate": {"running": 4}}}``)."""
    data = mixin_data()
    for key, value in thresholds.items():
        if isinstance(value, dict):
            for name, overrides in value.items():
                data["thresholds"][key].setdefault(name, {}).update(overrides)
        else:
            data["thresholds"][key] = value
    for settings in data["alerts"].values():
        settings["for"] = for_duration
    rules = {"groups": groups(parse_config(data))}
    for group in rules["groups"]:
        group["interval"] = "1s"
    return rules


def substitute_variables(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables filled in, ready for Prometheus."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)
