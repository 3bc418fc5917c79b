"""The Grafana dashboard, built from the mixin config (grafana/mixin.yaml).

`python -m grafana.mixin` writes it to grafana/dashboards/import-status.json
with the alert rules. Plain Python so the dashboard is reviewed as code; tests
fail when the committed JSON differs from what this builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana.mixin_config import MixinConfig, load_config

OUT = Path(__file__).resolve().parent / "dashboards" / "import-status.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
BASE_SEL = 'job=~"$job", instance=~"$instance", source=~"$source"'
STATES = [
    "waiting",
    "blocked",
    "running",
    "succeeded",
    "failed",
    "aborted",
    "not_found",
    "unknown",
    "pending",
]
STATE_COLORS = {
    "pending": "dark-orange",
    "waiting": "yellow",
    "blocked": "orange",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "aborted": "purple",
    "not_found": "gray",
    "unknown": "text",
}


def state_code(sel: str) -> str:
    """One number per state, so a state timeline can colour a single series."""
    return " or ".join(
        f'import_state{{{sel}, state="{state}"}} * {i}' for i, state in enumerate(STATES, 1)
    )


STATE_MAPPINGS = [
    {
        "type": "value",
        "options": {
            str(i): {"text": state, "color": STATE_COLORS[state], "index": i - 1}
            for i, state in enumerate(STATES, 1)
        },
    }
]


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "datasource": DATASOURCE,
        "expr": expr,
        "refId": ref,
        "legendFormat": legend or "__auto",
    }
    if instant:
        out |= {"instant": True, "range": False, "format": "table"}
    return out


def panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    **extra: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    body: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": targets,
    }
    for key, value in extra.items():
        if key == "defaults":
            body["fieldConfig"]["defaults"] |= value
        elif key == "overrides":
            body["fieldConfig"]["overrides"] = value
        else:
            body[key] = value
    return body


def column_unit(name: str, unit: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": "unit", "value": unit}],
    }


def panels(cfg: MixinConfig) -> list[dict[str, Any]]:
    cluster = f'{cfg.cluster_label}=~"$cluster", ' if cfg.cluster_label else ""
    SEL = cluster + BASE_SEL
    table_targets = [
        target(f"import_state{{{SEL}}} == 1", ref="A", instant=True),
        target(
            f"100 * import_items_completed{{{SEL}}} / import_items_expected{{{SEL}}} > -1",
            ref="B",
            instant=True,
        ),
        target(f"import_duration_seconds{{{SEL}}}", ref="C", instant=True),
        target(f"time() - import_state_change_timestamp_seconds{{{SEL}}}", ref="D", instant=True),
        target(f"import_info{{{SEL}}}", ref="E", instant=True),
    ]
    return [
        panel(
            "stat",
            "Imports by state",
            "How many watched imports are in each state now.",
            "none",
            [target(f"count by (state) (import_state{{{SEL}}} == 1)", "{{state}}")],
            (0, 0, 12, 5),
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "value_and_name"},
        ),
        panel(
            "stat",
            "Upstream APIs up",
            "1 when the last background poll of the source reached its API and understood "
            "the answer, 0 when it failed.",
            "none",
            [target(f"import_source_up{{{SEL}}}", "{{source}}")],
            (12, 0, 12, 5),
            defaults={
                "mappings": [
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "down", "color": "red"},
                            "1": {"text": "up", "color": "green"},
                        },
                    }
                ]
            },
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
        ),
        panel(
            "table",
            "Current imports",
            "Every watched import: state, progress (completed of expected, where the "
            "upstream reports counts), duration and time since the state last changed.",
            "none",
            table_targets,
            (0, 5, 24, 9),
            transformations=[
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {
                            "Time": True,
                            "Value #A": True,
                            "Value #E": True,
                            "__name__": True,
                            "job": True,
                            "instance": True,
                        },
                        "renameByName": {
                            "Value #B": "progress",
                            "Value #C": "duration",
                            "Value #D": "since last change",
                            "upstream_state": "upstream status",
                        },
                    },
                },
            ],
            overrides=[
                column_unit("progress", "percent"),
                column_unit("duration", "s"),
                column_unit("since last change", "s"),
            ],
        ),
        panel(
            "state-timeline",
            "State over time",
            "Each import's normalized state as the exporter saw it.",
            "none",
            [target(f"sum by (source, import) ({state_code(SEL)})", "{{source}} {{import}}")],
            (0, 14, 24, 8),
            defaults={"mappings": STATE_MAPPINGS, "color": {"mode": "thresholds"}},
        ),
        panel(
            "timeseries",
            "Progress",
            "Completed items as a percentage of expected items (only imports whose "
            "upstream reports counts, such as Rocket.Chat).",
            "percent",
            [
                target(
                    f"100 * import_items_completed{{{SEL}}} / import_items_expected{{{SEL}}} > -1",
                    "{{source}} {{import}}",
                )
            ],
            (0, 22, 12, 8),
        ),
        panel(
            "timeseries",
            "Import durations",
            "End minus start of finished imports, now minus start of running ones.",
            "s",
            [target(f"import_duration_seconds{{{SEL}}}", "{{source}} {{import}}")],
            (12, 22, 12, 8),
        ),
        panel(
            "timeseries",
            "Time since last progress",
            "Seconds since the state, step or completed count of each import last changed; "
            "a line that keeps rising on a running import is a stuck import.",
            "s",
            [
                target(
                    f"time() - import_last_progress_timestamp_seconds{{{SEL}}}",
                    "{{source}} {{import}}",
                )
            ],
            (0, 30, 12, 8),
        ),
        panel(
            "timeseries",
            "Data freshness",
            "Seconds since a background poll last got an answer about each import. Finished "
            "imports are no longer polled, so theirs rises on purpose.",
            "s",
            [
                target(
                    f"time() - import_last_poll_success_timestamp_seconds{{{SEL}}}",
                    "{{source}} {{import}}",
                )
            ],
            (12, 30, 12, 8),
        ),
        panel(
            "timeseries",
            "Upstream request rate",
            "HTTP requests per second the exporter makes to each upstream API.",
            "reqps",
            [
                target(
                    f"sum by (source) (rate(import_source_requests_total{{{SEL}}}"
                    "[$__rate_interval]))",
                    "{{source}}",
                )
            ],
            (0, 38, 8, 8),
        ),
        panel(
            "timeseries",
            "Upstream errors by reason",
            "Failed polls per second, by source and reason (timeout, connection, "
            "unauthorized, rate_limited, server_error, client_error, invalid_response, "
            "too_large).",
            "reqps",
            [
                target(
                    f"sum by (source, reason) (rate(import_source_errors_total{{{SEL}}}"
                    "[$__rate_interval]))",
                    "{{source}} {{reason}}",
                )
            ],
            (8, 38, 8, 8),
        ),
        panel(
            "timeseries",
            "Upstream request latency",
            "50th and 99th percentile duration of requests to each upstream API.",
            "s",
            [
                target(
                    "histogram_quantile(0.99, sum by (source, le) "
                    f"(rate(import_source_request_duration_seconds_bucket{{{SEL}}}"
                    "[$__rate_interval])))",
                    "{{source}} p99",
                    "A",
                ),
                target(
                    "histogram_quantile(0.5, sum by (source, le) "
                    f"(rate(import_source_request_duration_seconds_bucket{{{SEL}}}"
                    "[$__rate_interval])))",
                    "{{source}} p50",
                    "B",
                ),
            ],
            (16, 38, 8, 8),
        ),
        panel(
            "timeseries",
            "Imports that cannot be read",
            "Polls in a row that failed for each import that is not being read (state "
            "pending if it was never read); the status page and the exporter's log say why. "
            "Empty while every import answers.",
            "none",
            [
                target(
                    f"import_consecutive_poll_failures{{{SEL}}} > 0",
                    "{{source}} {{import}}",
                )
            ],
            (0, 46, 24, 8),
        ),
    ]


def variable(
    name: str, query: str, label: str, multi: bool = True, hide: int = 0
) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"var-{name}"},
        "refresh": 2,
        "includeAll": True,
        # grafana/dashboard-linter: ".*" would also match series without the label.
        "allValue": ".+",
        "multi": multi,
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
        "hide": hide,
    }


def dashboard(cfg: MixinConfig | None = None) -> dict[str, Any]:
    cfg = cfg or load_config()
    board = cfg.dashboard
    cluster = cfg.cluster_label
    # Without a cluster label the variable stays (hidden), so links and
    # provisioning that name it keep working; queries do not use it.
    scope = f'{cluster}=~"$cluster", ' if cluster else ""
    job_filter = f'{{{scope}job=~"$job"}}'
    alerts_expr = (
        f'ALERTS{{{scope}alertname=~"ImportStatus.*", alertstate="firing", '
        'job=~"$job", instance=~"$instance"}'
    )
    return {
        "uid": board.uid,
        "title": board.title,
        "description": "Long-running SaaS data imports watched by import-status-exporter: "
        "state, progress, duration, and the health of the upstream APIs.",
        "tags": board.tags,
        "editable": False,
        "graphTooltip": 1,
        "refresh": board.refresh,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "default", "value": "default"},
                    "hide": 0,
                },
                variable(
                    "cluster",
                    f"label_values(import_exporter_build_info, {cluster or 'cluster'})",
                    "Cluster",
                    hide=0 if cluster else 2,
                ),
                variable(
                    "job",
                    "label_values(import_exporter_build_info"
                    + (f'{{{cluster}=~"$cluster"}}' if cluster else "")
                    + ", job)",
                    "Job",
                ),
                variable(
                    "instance",
                    f"label_values(import_exporter_build_info{job_filter}, instance)",
                    "Instance",
                ),
                variable(
                    "source",
                    f'label_values(import_source_up{{{scope}job=~"$job", instance=~"$instance"}}'
                    ", source)",
                    "Source",
                ),
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Import alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    # Grafana's Prometheus annotations keep the query in target
                    # (older dashboards had expr at the top; Grafana moves it).
                    "target": {"refId": "Anno", "expr": alerts_expr, "interval": "1m"},
                }
            ]
        },
        "links": [
            {
                "title": "Runbook",
                "type": "link",
                "url": cfg.runbook_url_prefix.split("#", 1)[0],
                "icon": "doc",
                "tooltip": "What each ImportStatus alert means and what to do",
                "targetBlank": True,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": False,
                "tags": [],
            },
            {
                "title": "Exporter status page",
                "type": "link",
                "url": board.status_page_url,
                "icon": "external link",
                "tooltip": "The exporter's own page: sources, errors, imports that need attention",
                "targetBlank": True,
                "asDropdown": False,
                "includeVars": False,
                "keepTime": False,
                "tags": [],
            },
        ],
        "panels": [dict(p, id=i) for i, p in enumerate(panels(cfg), 1)],
    }


def render(cfg: MixinConfig | None = None) -> str:
    return json.dumps(dashboard(cfg), indent=2, sort_keys=True) + "\n"


def dashboard_queries(cfg: MixinConfig | None = None) -> list[str]:
    """Every panel query, as written (with Grafana variables)."""
    return [t["expr"] for p in dashboard(cfg)["panels"] for t in p["targets"]]
