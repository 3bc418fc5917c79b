"""The mixin's configuration (grafana/mixin.yaml): read, checked, with defaults.

Kept apart from the generators so the rules and the dashboard both import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG = Path(__file__).resolve().parent / "mixin.yaml"

ALERTS = (
    "ImportStatusImportFailed",
    "ImportStatusImportStuck",
    "ImportStatusImportWaitingTooLong",
    "ImportStatusImportRunningTooLong",
    "ImportStatusImportUnreadable",
    "ImportStatusImportStateUnknown",
    "ImportStatusRegisteredImportNotFound",
    "ImportStatusSourceDown",
    "ImportStatusSourceErrors",
    "ImportStatusDataStale",
    "ImportStatusExporterDown",
    "ImportStatusExporterAbsent",
    "ImportStatusStoreWriteFailing",
)
THRESHOLD_KEYS = ("stuck", "running", "waiting", "unknown", "not_found", "unreadable")
SYSTEMS = ("elevate", "zilliant", "rocketchat")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_MATCHER = re.compile(r'^\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"[^"\\\n]*"\s*$')


class MixinConfigError(ValueError):
    pass


def seconds(value: Any, where: str) -> int:
    """A Prometheus-style duration (or a bare number of seconds) in seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION.match(str(value)) if isinstance(value, str) and value else None
    if match is None:
        raise MixinConfigError(f"{where}: must be a duration like 30m, not {value!r}")
    d, h, m, s = (int(part or 0) for part in match.groups())
    return ((d * 24 + h) * 60 + m) * 60 + s


def duration(value: int) -> str:
    """Seconds as the shortest Prometheus duration (5400 -> 1h30m)."""
    if value == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if value >= size:
            out += f"{value // size}{unit}"
            value %= size
    return out


def spoken(value: int) -> str:
    """Seconds as words for an alert description (600 -> 10 minutes)."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if value >= size and value % size == 0:
            count = value // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{value} seconds"


@dataclass(frozen=True)
class Scope:
    """Thresholds for the imports one matcher selects (None: the default scope)."""

    matcher: str | None
    values: dict[str, int | None]
    kind: str = "default"
    """"source", "system" or "default"."""


@dataclass(frozen=True)
class AlertSettings:
    for_seconds: int
    severity: str


@dataclass(frozen=True)
class DashboardSettings:
    title: str
    uid: str
    tags: list[str]
    refresh: str
    status_page_url: str


@dataclass(frozen=True)
class MixinConfig:
    selector: str
    cluster_label: str
    runbook_url_prefix: str
    dashboard: DashboardSettings
    alerts: dict[str, AlertSettings]
    source_errors_ratio: float
    source_errors_window: int
    stale_poll_intervals: int
    stale_min: int
    scopes: list[Scope] = field(default_factory=list)
    """Most specific first: sources in order, then systems, then the default."""

    def runbook_url(self, alert: str) -> str:
        return self.runbook_url_prefix + alert.lower()

    def scoped(self, key: str) -> list[Scope]:
        """The scopes that set ``key``, most specific first."""
        return [scope for scope in self.scopes if key in scope.values]


def _thresholds(raw: Any, where: str) -> dict[str, int | None]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MixinConfigError(f"{where}: must be a mapping")
    out: dict[str, int | None] = {}
    for key, value in raw.items():
        if key == "match":
            continue
        if key not in THRESHOLD_KEYS:
            raise MixinConfigError(
                f"{where}.{key}: unknown threshold ({', '.join(THRESHOLD_KEYS)})"
            )
        if value is None:
            out[key] = None
        elif key == "unreadable":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MixinConfigError(f"{where}.{key}: must be a number of polls >= 1")
            out[key] = value
        else:
            out[key] = seconds(value, f"{where}.{key}")
    return out


def _alerts(alerts_raw: dict[str, Any]) -> dict[str, AlertSettings]:
    alerts: dict[str, AlertSettings] = {}
    for name in ALERTS:
        settings = alerts_raw.get(name) or {}
        severity = settings.get("severity", "warning")
        if severity not in ("critical", "warning", "info"):
            raise MixinConfigError(f"alerts.{name}.severity: critical, warning or info")
        alerts[name] = AlertSettings(
            seconds(settings.get("for", "0s"), f"alerts.{name}.for"), severity
        )
    for name in alerts_raw:
        if name not in ALERTS:
            raise MixinConfigError(f"alerts.{name}: no such alert")
    return alerts


def _scopes(thresholds: dict[str, Any]) -> list[Scope]:
    """Per-source overrides first, then per-system ones, then the default."""
    scopes: list[Scope] = []
    for i, entry in enumerate(thresholds.get("sources") or []):
        where = f"thresholds.sources[{i}]"
        matcher = entry.get("match") if isinstance(entry, dict) else None
        if not isinstance(matcher, str) or not _MATCHER.match(matcher):
            raise MixinConfigError(f'{where}.match: a PromQL label matcher like source=~"a|b"')
        scopes.append(Scope(matcher.strip(), _thresholds(entry, where), "source"))
    for system, entry in (thresholds.get("systems") or {}).items():
        if system not in SYSTEMS:
            raise MixinConfigError(f"thresholds.systems.{system}: one of {', '.join(SYSTEMS)}")
        scopes.append(
            Scope(
                f'system="{system}"', _thresholds(entry, f"thresholds.systems.{system}"), "system"
            )
        )
    default = _thresholds(thresholds.get("default"), "thresholds.default")
    missing = [key for key in THRESHOLD_KEYS if key not in default]
    if missing:
        raise MixinConfigError(f"thresholds.default: missing {', '.join(missing)}")
    scopes.append(Scope(None, default))
    return scopes


def parse_config(data: dict[str, Any]) -> MixinConfig:
    """The mixin config from its YAML mapping; MixinConfigError names the bad field."""
    known = {
        "selector",
        "cluster_label",
        "runbook_url_prefix",
        "dashboard",
        "alerts",
        "source_errors_ratio",
        "source_errors_window",
        "stale_poll_intervals",
        "stale_min",
        "thresholds",
    }
    unknown = set(data) - known
    if unknown:
        raise MixinConfigError(f"unknown field(s): {', '.join(sorted(unknown))}")
    selector = str(data.get("selector", 'job="import-status"'))
    for part in filter(None, (p.strip() for p in selector.split(","))):
        if not _MATCHER.match(part):
            raise MixinConfigError(f"selector: {part!r} is not a PromQL label matcher")
    cluster = str(data.get("cluster_label") or "")
    if cluster and not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", cluster):
        raise MixinConfigError("cluster_label: must be a label name")
    board = data.get("dashboard") or {}
    alerts = _alerts(data.get("alerts") or {})
    scopes = _scopes(data.get("thresholds") or {})
    return MixinConfig(
        selector=selector,
        cluster_label=cluster,
        runbook_url_prefix=str(
            data.get(
                "runbook_url_prefix",
                "https://github.com/import-status-exporter/import-status-exporter/blob/main/docs/runbook.md#",
            )
        ),
        dashboard=DashboardSettings(
            title=str(board.get("title", "Import status")),
            uid=str(board.get("uid", "import-status")),
            tags=[str(tag) for tag in board.get("tags", ["import-status-exporter", "imports"])],
            refresh=str(board.get("refresh", "30s")),
            status_page_url=str(board.get("status_page_url", "http://${instance}/")),
        ),
        alerts=alerts,
        source_errors_ratio=float(data.get("source_errors_ratio", 0.5)),
        source_errors_window=seconds(
            data.get("source_errors_window", "5m"), "source_errors_window"
        ),
        stale_poll_intervals=int(data.get("stale_poll_intervals", 3)),
        stale_min=seconds(data.get("stale_min", "5m"), "stale_min"),
        scopes=scopes,
    )


def load_config(path: Path = CONFIG) -> MixinConfig:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise MixinConfigError(f"{path}: must be a mapping")
    return parse_config(data)
